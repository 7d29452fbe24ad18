"""Preference rows (pairwise, HH transcript, K-way ranking) -> (prompt, chosen, rejected, margin) tuples."""

from __future__ import annotations

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
    """{"prompt", "responses": [K], "ranking": [best..worst indices]} -> every (better, worse) pair.

    Order: for ranking [r0, r1, r2] the pairs are (r0, r1), (r0, r2), (r1, r2).
    """
    prompt = fields.prompt(fields.get(row, "prompt"))
    texts = responses(fields.get(row, "responses"))
    order = ranking(fields.get(row, "ranking"), len(texts))
    out = []
    for better, worse in combinations(order, 2):
        if texts[better].strip() == texts[worse].strip():
            raise RowError("responses", f"responses {better} and {worse} are identical")
        out.append((prompt, texts[better], texts[worse], None))
    return out


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
