"""Which format a file is in, and how each format's row becomes records.

Formats (decided from a row's keys):
    prompt_only        {"prompt"}
    prompt_completion  {"prompt", "completion"}
    messages           {"messages": [...]}
    pairwise           {"prompt", "chosen", "rejected"[, "margin"]}
    transcript         {"chosen", "rejected"}: HH text or TRL implicit-prompt message lists
    ranking            {"prompt", "responses": [K], "ranking": [K indices, best first]}
All rows of one file must share a format; the file's format is its rows' majority,
so one odd row is reported as the odd one rather than blaming all the others.
"""

from __future__ import annotations

from collections import Counter

from rlhf.data import fields, hh
from rlhf.data.fields import RowError
from rlhf.data.records import DataError, Prompt

KEYS = {
    "prompt_only": ("prompt",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "pairwise": ("prompt", "chosen", "rejected", "margin"),
    "transcript": ("chosen", "rejected", "margin"),
    "ranking": ("prompt", "responses", "ranking"),
}
# Keys that say which format a row is in ("margin" is optional and says nothing).
FORMAT_KEYS = {k for keys in KEYS.values() for k in keys} - {"margin"}
NAMES = {
    "prompt_only": "prompt-only {prompt}",
    "prompt_completion": "{prompt, completion}",
    "messages": "{messages}",
    "pairwise": "pairwise {prompt, chosen, rejected}",
    "transcript": "HH transcript {chosen, rejected}",
    "ranking": "ranking {prompt, responses, ranking}",
}


def detect(row: dict) -> str | None:
    """The format a row's keys point to (null values count as absent), or None if no known key."""
    keys = {k for k, v in row.items() if v is not None}
    if keys & {"responses", "ranking"}:
        return "ranking"
    if keys & {"chosen", "rejected"}:
        return "pairwise" if "prompt" in keys else "transcript"
    if "messages" in keys:
        return "messages"
    if "completion" in keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompt_only"
    return None


def file_format(name: str, rows: list[tuple[int, dict]], allowed: tuple[str, ...], purpose: str) -> str:
    """The majority format of ``rows``; DataError if there is none or it is not in ``allowed``."""
    votes = Counter(f for f in (detect(row) for _, row in rows) if f is not None)
    if not votes:
        keys = sorted({k for _, row in rows for k in row})
        raise DataError(f"{name}: no known data format (row keys: {keys}); expected one of {expected(allowed)}")
    fmt = votes.most_common(1)[0][0]  # ties go to the format seen first
    if fmt not in allowed:
        raise DataError(f"{name}: rows are {NAMES[fmt]}, which is not {purpose} data; expected one of {expected(allowed)}")
    return fmt


def expected(formats: tuple[str, ...]) -> str:
    return ", ".join(NAMES[f] for f in formats)


def same_format(row: dict, fmt: str) -> None:
    """Raise if ``row`` uses keys of another format than the file's.

    A row that merely lacks some of ``fmt``'s keys passes here, so that it is
    reported as "missing" by the format's own checks.
    """
    foreign = sorted(k for k, v in row.items() if v is not None and k in FORMAT_KEYS and k not in KEYS[fmt])
    if foreign:
        raise RowError(foreign[0], f"row is in {NAMES[detect(row)]} format, but the file is in {NAMES[fmt]} format")


def meta(row: dict) -> dict:
    """The row's scalar fields other than "prompt": ids, categories, and reference replies
    (completion, chosen, HH transcripts) that a judge may compare against. Lists are dropped."""
    scalar = (str, int, float, bool, type(None))
    return {k: v for k, v in row.items() if k != "prompt" and isinstance(v, scalar)}


def sft(row: dict, fmt: str) -> tuple[Prompt, str]:
    """A prompt_completion or messages row -> (prompt, completion)."""
    if fmt == "messages":
        return fields.conversation(fields.get(row, "messages"), "messages")
    prompt = fields.prompt(fields.get(row, "prompt"))
    return prompt, fields.reply(fields.get(row, "completion"), "completion")


def prompt_of(row: dict, fmt: str) -> Prompt:
    """The prompt of a row of any format (for generation: what the policy is asked)."""
    if fmt == "transcript":
        return split_response(fields.get(row, "chosen"), "chosen")[0]
    if fmt == "messages":
        turns = fields.messages(fields.get(row, "messages"), "messages")
        # a chat that ends with the assistant's reply is asked again without that reply
        return turns[:-1] if turns[-1]["role"] == "assistant" and len(turns) > 1 else turns
    return fields.prompt(fields.get(row, "prompt"))


def split_response(value, field: str) -> tuple[list[dict], str]:
    """A transcript side (HH text or message list) -> (prompt messages, final assistant reply)."""
    if isinstance(value, list):
        return fields.conversation(value, field)
    return hh.parse(fields.text(value, field), field)
