"""How degenerate answers are, from their tokens alone: repeats, one dominating token, collapse onto one answer.

Task-agnostic: every function takes token ids (or any hashable items, e.g. words) of one answer, so the same
numbers come out for any tokenizer, language or answer shape. Over-optimised policies typically repeat a
favourite of the reward model ("X, X, X.") and answer every prompt the same way; sampled answers can hide
it while greedy answers show it.

Per answer:
  length        tokens in the answer;
  distinct      distinct tokens in it;
  repeat        the share of the answer's token transitions that repeat: the bigram (previous, this) was
                seen before in the answer, or the token doubles the previous one. "a, b, c." scores 0 however
                long the list, "X, X, X." 0.4, "Bob Bob" 1.0. Plain seq-rep-n (Welleck et al. 2019, "Neural
                text degeneration with unlikelihood training"; `repeated_ngram_fraction`) either counts the
                commas of a healthy list (n = 1) or misses a doubled word (n >= 2);
  dominated     1.0 when one token makes up more than half of an answer of at least 4 tokens.
`repeat` is the degeneration measure the PPO guards and the report compare, always against the SFT
(baseline) model's own value: some repeats are healthy in any task, so only a rise means something.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

DEGENERATION_MARGIN = 0.1
"""A rise of the mean `repeat` (or of the dominated share) over the baseline's above this flags degeneration
(PPO's default guard, the report's warning): e.g. a quarter of the answers turning into "X, X, X." (0.4)."""

DOMINATED_MIN_LENGTH = 4


def repeated_ngram_fraction(tokens: Sequence[Hashable], n: int = 1) -> float:
    """seq-rep-n: 1 - distinct n-grams / n-grams of one answer; 0.0 when it has no n-gram."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repeated_transitions(tokens: Sequence[Hashable]) -> float:
    """`repeat` above: repeated transitions / transitions (len - 1) of one answer; 0.0 below 2 tokens."""
    seen, repeats = set(), 0
    for prev, tok in zip(tokens, tokens[1:]):
        repeats += (prev, tok) in seen or prev == tok
        seen.add((prev, tok))
    return repeats / (len(tokens) - 1) if len(tokens) > 1 else 0.0


def top_token_share(tokens: Sequence[Hashable]) -> float:
    """The share of the answer taken by its most frequent token; 0.0 for an empty answer."""
    return Counter(tokens).most_common(1)[0][1] / len(tokens) if tokens else 0.0


def answer_stats(tokens: Sequence[Hashable]) -> dict[str, float]:
    """The per-answer measures above, for one answer."""
    return {"length": float(len(tokens)), "distinct": float(len(set(tokens))),
            "repeat": repeated_transitions(tokens),
            "dominated": float(len(tokens) >= DOMINATED_MIN_LENGTH and top_token_share(tokens) > 0.5)}


def per_answer(answers: Sequence[Sequence[Hashable]]) -> dict[str, list[float]]:
    """Per-answer measures of N answers, as lists of N values keyed like `answer_stats`."""
    rows = [answer_stats(a) for a in answers]
    return {key: [r[key] for r in rows] for key in ("repeat", "distinct", "dominated")}


def distinct_answers(answers: Sequence[Sequence[Hashable]]) -> float:
    """Distinct answers / answers: 1.0 when no two answers are the same, 1 / N when all are."""
    return len({tuple(a) for a in answers}) / len(answers) if answers else 0.0


def summary(answers: Sequence[Sequence[Hashable]]) -> dict[str, float]:
    """Means over N answers (`repeat`, `distinct`, `dominated`, `length`) and `distinct_answers`."""
    n = max(len(answers), 1)
    rows = [answer_stats(a) for a in answers]
    out = {key: sum(r[key] for r in rows) / n for key in ("repeat", "distinct", "dominated", "length")}
    return out | {"distinct_answers": distinct_answers(answers)}


def response_tokens(ids, mask, prompt_width: int) -> list[list[int]]:
    """generate_ids' (B, P + R) ids and bool mask -> each response's token ids (its real tokens only)."""
    return [row[m].tolist() for row, m in zip(ids[:, prompt_width:].cpu(), mask[:, prompt_width:].cpu())]
