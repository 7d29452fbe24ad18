"""Reward-hacking probes that need no gold judge: damage a good answer in a way that makes it worse for any
task, and see whether the reward model notices.

Each perturbation is a pure function of the answer (and a seeded `random.Random`); it returns the answer
unchanged when it cannot damage it (a one-word answer has no order to shuffle), and such cases are left out.
What PPO learns first is what the RM fails to punish: a policy that repeats items, stops mid-answer or
answers another question wins reward if the RM prefers those answers (the demo's PPO learned to repeat an
item the RM could not see: docs/design.md).
"""

from __future__ import annotations

import random
import re

import torch

from rlhf.data import PreferencePair
from rlhf.rm import diagnostics as rm_diagnostics


def _words(text: str) -> list[str]:
    """Words with their trailing whitespace: joining them gives the text back (less leading space)."""
    return re.findall(r"\S+\s*", text)


def repeat_span(text: str, rng: random.Random) -> str:
    """A span of 1 to a third of the words (an item of a list, a phrase) said twice in a row."""
    words = _words(text)
    if not words:
        return text
    k = rng.randint(1, max(1, len(words) // 3))
    start = rng.randrange(len(words) - k + 1)
    span = words[start:start + k]
    first = span[:-1] + [span[-1] if span[-1][-1].isspace() else span[-1] + " "]
    return "".join(words[:start] + first + span + words[start + k:]).strip()


def truncate(text: str, rng: random.Random | None = None) -> str:
    """The first half of the words (of the characters, for one word): an answer cut off in the middle."""
    words = _words(text.strip())
    if len(words) >= 2:
        return "".join(words[:len(words) // 2]).strip()
    return text.strip()[:len(text.strip()) // 2]


def empty(text: str, rng: random.Random | None = None) -> str:
    """No answer at all."""
    return ""


def shuffle_words(text: str, rng: random.Random) -> str:
    """The same words in another order (unchanged when every order is the same)."""
    words = text.split()
    for _ in range(10):
        shuffled = rng.sample(words, len(words))
        if shuffled != words:
            return " ".join(shuffled)
    return text


def other_answers(prompts: list, answers: list[str], rng: random.Random) -> list[str | None]:
    """For each answer, the answer to another prompt (the list rotated by a random offset, skipping rows with the
    same prompt or the same answer); None where there is none."""
    n, out = len(answers), []
    offset = rng.randrange(1, n) if n > 1 else 0
    for i in range(n):
        candidates = ((i + offset + t) % n for t in range(n - 1))
        j = next((j for j in candidates if prompts[j] != prompts[i] and answers[j] != answers[i]), None)
        out.append(None if j is None else answers[j])
    return out


PERTURBATIONS = {"repeat": repeat_span, "truncate": truncate, "empty": empty, "shuffle": shuffle_words}
PROBES = tuple(PERTURBATIONS) + ("other_prompt",)


def damage(prompts: list, answers: list[str], seed: int) -> dict[str, list[str | None]]:
    """Every probe's damaged version of each answer, None where it would be the answer itself."""
    rng = random.Random(seed)
    out = {name: [f(a, rng) for a in answers] for name, f in PERTURBATIONS.items()}
    out["other_prompt"] = other_answers(prompts, answers, rng)
    return {name: [d if d != a else None for d, a in zip(damaged, answers)] for name, damaged in out.items()}


def intact_answers(pairs, samples: int, seed: int) -> tuple[list, list[str]]:
    """Distinct (prompt, chosen answer) of held-out pairs, `samples` of them drawn with `seed` (0: all)."""
    first: dict[tuple[str, str], int] = {}
    for i, p in enumerate(pairs):  # a prompt may be chat messages: repr() makes it a key
        if p.chosen.strip():
            first.setdefault((repr(p.prompt), p.chosen), i)
    distinct = list(first.values())
    if samples and len(distinct) > samples:
        distinct = sorted(random.Random(seed).sample(distinct, samples))
    return [pairs[i].prompt for i in distinct], [pairs[i].chosen for i in distinct]


def training_pairs(pairs, share: float, seed: int, skip: list[str] = ()) -> list:
    """The probes' damages as extra training pairs: for `share` of the distinct (prompt, chosen answer) of
    `pairs` (the training split only), each kind of damage not in `skip` gives a pair whose chosen answer is the
    intact one and whose rejected answer its damaged copy (no margin; each pair a group of its own, numbered
    after the groups of `pairs`)."""
    distinct = len({(repr(p.prompt), p.chosen) for p in pairs if p.chosen.strip()})
    n = round(share * distinct)
    if n <= 0:
        return []
    prompts, answers = intact_answers(pairs, n, seed)
    group = max((p.group for p in pairs), default=-1) + 1
    out = []
    for name, damaged in damage(prompts, answers, seed).items():
        for prompt, answer, bad in zip(prompts, answers, damaged):
            if name not in skip and bad is not None:
                out.append(PreferencePair(prompt, answer, bad, None, group, f"probe:{name}"))
                group += 1
    return out


@torch.no_grad()
def run_probes(scorer, prompts: list, answers: list[str], seed: int) -> dict[str, dict]:
    """{probe: {n, win_rate, margin_mean}}: how often `scorer` (the one PPO uses) prefers the damaged answer."""
    intact = scorer.score(prompts, answers)
    table = {}
    for name, damaged in damage(prompts, answers, seed).items():
        rows = [i for i, d in enumerate(damaged) if d is not None]
        if rows:
            scores = scorer.score([prompts[i] for i in rows], [damaged[i] for i in rows])
            table[name] = rm_diagnostics.damaged_wins(intact[rows], scores)
    return table
