"""Preference rows (pairwise, HH transcript, K-way ranking) -> (prompt, chosen, rejected, margin) tuples."""

from __future__ import annotations

import math
from itertools import combinations

from rlhf.data import fields
from rlhf.data.fields import RowError
from rlhf.data.formats import split_response
from rlhf.data.records import Prompt

Pair = tuple[Prompt, str, str, float | None]  # (prompt, chosen, rejected, margin)


def pairs(row: dict, fmt: str) -> list[Pair]:
    """All preference pairs of one row: one for pairwise/transcript rows, K*(K-1)/2 for a ranking."""
    if fmt == "ranking":
        return ranking_pairs(row)
    if fmt == "transcript":
        return [transcript_pair(row)]
    return [pairwise_pair(row)]


def pairwise_pair(row: dict) -> Pair:
    """{"prompt", "chosen", "rejected"[, "margin"]}; chosen/rejected are text or [assistant message]."""
    prompt = fields.prompt(fields.get(row, "prompt"))
    chosen = fields.reply(fields.get(row, "chosen"), "chosen")
    rejected = fields.reply(fields.get(row, "rejected"), "rejected")
    fields.different(chosen, rejected)
    return prompt, chosen, rejected, fields.margin(row)


def transcript_pair(row: dict) -> Pair:
    """{"chosen", "rejected"} full conversations (HH text or message lists) sharing one prompt."""
    prompt, chosen = split_response(fields.get(row, "chosen"), "chosen")
    other, rejected = split_response(fields.get(row, "rejected"), "rejected")
    if other != prompt:
        raise RowError("rejected", "does not share the prompt of 'chosen' (the turns before the final reply differ)")
    # HH has a few transcripts whose last "Assistant:" has nothing after it.
    for field, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply:
            raise RowError(field, "the final Assistant reply is empty")
    fields.different(chosen, rejected)
    return prompt, chosen, rejected, fields.margin(row)


def ranking_pairs(row: dict) -> list[Pair]:
    """{"prompt", "responses": [K], "ranking": [best..worst indices][, "scores": [K ratings]]} -> every
    (better, worse) pair; with scores (an annotator's rating of each answer, higher is better, as in
    UltraFeedback) a pair's margin is the difference of its two ratings.

    Order: for ranking [r0, r1, r2] the pairs are (r0, r1), (r0, r2), (r1, r2).
    """
    prompt = fields.prompt(fields.get(row, "prompt"))
    texts = responses(fields.get(row, "responses"))
    order = ranking(fields.get(row, "ranking"), len(texts))
    rated = scores(row.get("scores"), order)
    out = []
    for better, worse in combinations(order, 2):
        if texts[better].strip() == texts[worse].strip():
            raise RowError("responses", f"responses {better} and {worse} are identical")
        out.append((prompt, texts[better], texts[worse], None if rated is None else rated[better] - rated[worse]))
    return out


def scores(value, order: list[int]) -> list[float] | None:
    """Optional ratings of the K responses: K finite numbers that do not rise along the ranking."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise RowError("scores", f"expected a list of {len(order)} numbers, got {fields.kind(value)}")
    if len(value) != len(order):
        raise RowError("scores", f"wrong length: {len(value)} scores for {len(order)} responses")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise RowError("scores", f"entry {i} is not a finite number: {v!r}")
    for better, worse in zip(order, order[1:]):
        if value[better] < value[worse]:
            raise RowError("scores", f"response {worse} is ranked below response {better} but scored higher "
                                     f"({value[worse]} > {value[better]})")
    return [float(v) for v in value]


def responses(value) -> list[str]:
    """A list of at least 2 completions (text or [assistant message])."""
    if not isinstance(value, list):
        raise RowError("responses", f"expected a list of responses, got {fields.kind(value)}")
    if len(value) < 2:
        raise RowError("responses", f"a ranking needs at least 2 responses, got {len(value)}")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(fields.reply(item, "responses"))
        except RowError as e:
            raise RowError("responses", f"response {i}: {e.problem}") from None
    return out


def ranking(value, k: int) -> list[int]:
    """Response indices best first; must be a permutation of range(k). Says what is wrong if not."""
    if not isinstance(value, list):
        raise RowError("ranking", f"expected a list of response indices, got {fields.kind(value)}")
    should = f"it must list each of 0..{k - 1} once, best first"
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int):
            raise RowError("ranking", f"entry {i!r} is not an integer response index")
        if not 0 <= i < k:
            raise RowError("ranking", f"index {i} is out of range for {k} responses; {should}")
    repeated = sorted(i for i in set(value) if value.count(i) > 1)
    if repeated:
        raise RowError("ranking", f"index {repeated[0]} is a duplicate (listed {value.count(repeated[0])} times); {should}")
    if len(value) != k:
        raise RowError("ranking", f"wrong length: {len(value)} entries for {k} responses; {should}")
    return value
