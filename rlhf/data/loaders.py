"""load_sft / load_preferences / load_prompts: read, detect the format, validate every row, build records.

All rows are checked before anything is returned, so one run shows every bad row
of a file instead of failing on the first one hours into training.
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from collections.abc import Callable

from rlhf.data import formats
from rlhf.data.fields import RowError
from rlhf.data.io import read_source
from rlhf.data.pairs import pairs
from rlhf.data.render import check_prompt_lengths
from rlhf.data.records import (
    DataError,
    PreferencePair,
    Problem,
    PromptExample,
    SFTExample,
    describe,
    in_order,
    source_of,
)

SFT_FORMATS = ("prompt_completion", "messages")
PREFERENCE_FORMATS = ("pairwise", "transcript", "ranking")
PROMPT_FORMATS = ("prompt_only",) + SFT_FORMATS + PREFERENCE_FORMATS
# How many problems the skip_invalid warning shows; the rest are in the count.
WARN_LISTED = 3

# (row, format, row index, source) -> records of that row
Convert = Callable[[dict, str, int, str], list]


def load_sft(source: str, split: str | None = None, skip_invalid: bool = False) -> list[SFTExample]:
    """SFT examples from {"prompt", "completion"} or {"messages": [..., assistant reply]} rows.

    Preference data works too, its preferred answer as the demonstration (the chosen answer of a pair or
    HH transcript, the best-ranked answer of a ranking): the usual way to SFT on HH-RLHF.
    """

    def convert(row, fmt, index, where):
        if fmt in PREFERENCE_FORMATS:
            prompt, chosen, _, _ = pairs(row, fmt)[0]  # a ranking's first pair is (best, second best)
            return [SFTExample(prompt, chosen, where)]
        prompt, completion = formats.sft(row, fmt)
        return [SFTExample(prompt, completion, where)]

    return load(source, split, skip_invalid, SFT_FORMATS + PREFERENCE_FORMATS, "SFT", convert)


def load_preferences(source: str, split: str | None = None, skip_invalid: bool = False) -> list[PreferencePair]:
    """Preference pairs from pairwise, HH transcript or K-way ranking rows (rankings expand to K*(K-1)/2 pairs)."""

    def convert(row, fmt, index, where):
        return [PreferencePair(p, c, r, m, index, where) for p, c, r, m in pairs(row, fmt)]

    return load(source, split, skip_invalid, PREFERENCE_FORMATS, "preference", convert)


def load_prompts(source: str, split: str | None = None, skip_invalid: bool = False) -> list[PromptExample]:
    """Prompts of rows of any format; only the prompt is validated (other fields may be anything)."""

    def convert(row, fmt, index, where):
        return [PromptExample(formats.prompt_of(row, fmt), where, formats.meta(row))]

    return load(source, split, skip_invalid, PROMPT_FORMATS, "prompt", convert)


def as_chat(records: list, mode: str) -> list:
    """`records` with each plain-text prompt made a user turn ([{"role": "user", "content": text}]) when `mode` is
    chat: it then goes through the model's chat template (its default system prompt included), as the chat
    prompts of the same data would. raw: as they are (trl's convention: text is the model's input verbatim)."""
    if mode != "chat":
        return records
    return [dataclasses.replace(r, prompt=[{"role": "user", "content": r.prompt}]) if isinstance(r.prompt, str) else r
            for r in records]


def text_prompts_line(records: list, tokenizer, mode: str) -> str | None:
    """One line saying what the plain-text prompts among `records` (as loaded, before `as_chat`) are to a model
    whose tokenizer has a chat template; None when there are none or it has no template."""
    text = sum(isinstance(r.prompt, str) for r in records)
    if not text or not getattr(tokenizer, "chat_template", None):
        return None
    how = ("as a user turn through the model's chat template (model.text_prompts=chat)" if mode == "chat" else
           "as they are, without the model's chat template (model.text_prompts=raw; chat: as a user turn)")
    return f"{text} of {len(records)} prompts are plain text: {how}"


def for_model(records: list, tokenizer, mode: str, max_prompt_length: int, stage: str, source: str = "") -> list:
    """`records` as the model reads them: one line saying what their plain-text prompts are (`text_prompts_line`,
    printed as "[stage] source: ..."), those prompts made user turns when `mode` is chat (`as_chat`), and every
    rendered prompt checked against max_prompt_length (DataError naming the rows)."""
    if line := text_prompts_line(records, tokenizer, mode):
        print(f"[{stage}] " + (f"{source}: " if source else "") + line)
    records = as_chat(records, mode)
    check_prompt_lengths(records, tokenizer, max_prompt_length)
    return records


def load(source, split, skip_invalid: bool, allowed: tuple[str, ...], purpose: str, convert: Convert) -> list:
    """Shared loop: every row -> records or a Problem; then raise, or warn and skip with skip_invalid."""
    name, rows, problems = read_source(source, split)
    if not rows:
        raise DataError.from_problems(problems) if problems else DataError(f"{name}: no rows")
    fmt = formats.file_format(name, rows, allowed, purpose)
    records = []
    for index, (number, row) in enumerate(rows):
        try:
            formats.same_format(row, fmt)
            records += convert(row, fmt, index, source_of(name, number))
        except RowError as e:
            problems.append(Problem(name, number, e.field, e.problem))
    return finish(name, records, problems, skip_invalid, total=len(rows) + count_unread(problems, rows))


def count_unread(problems: list[Problem], rows: list) -> int:
    """Rows that never became dicts (malformed JSON): problems whose row is not among ``rows``."""
    read = {number for number, _ in rows}
    return len({p.row for p in problems if p.row not in read})


def finish(name: str, records: list, problems: list[Problem], skip_invalid: bool, total: int) -> list:
    """Return records; with problems raise, unless skip_invalid and some rows survived (then warn)."""
    if not problems:
        return records
    if not skip_invalid or not records:
        raise DataError.from_problems(problems)
    rows = "row" if len(problems) == 1 else "rows"
    listed = describe(in_order(problems), WARN_LISTED)
    # stacklevel 4: point at the code that called load_sft / load_preferences / load_prompts
    warnings.warn(f"{name}: skipped {len(problems)} invalid {rows} of {total}:\n{listed}", stacklevel=4)
    return records


def hold_out(items: list, fraction: float, seed: int, groups: list | None = None) -> tuple[list, list]:
    """(held out, rest): `fraction` of the groups (at least one), drawn with `seed`, each group whole, both
    lists in the items' order. `groups` gives each item's group (a preference pair's prompt, so that no prompt
    is on both sides); None: each item is its own group."""
    groups = list(range(len(items))) if groups is None else groups
    distinct = sorted(set(groups))
    random.Random(seed).shuffle(distinct)
    held = set(distinct[:max(1, int(len(distinct) * fraction))])
    return ([x for x, g in zip(items, groups) if g in held], [x for x, g in zip(items, groups) if g not in held])
