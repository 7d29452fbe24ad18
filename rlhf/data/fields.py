"""Checks for single fields of a row. Each returns the clean value or raises RowError.

One RowError per row is enough to point a user at the row; the loaders collect
them across rows so a whole file's problems show up in one run.
"""

from __future__ import annotations

import math

from rlhf.data.records import Prompt

ROLES = ("user", "assistant", "system")


class RowError(Exception):
    """The first problem found in a row: which field, and what is wrong with it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}': {problem}")
        self.field = field
        self.problem = problem


def kind(value) -> str:
    """Type name for messages: 'number' reads better than 'int' for users of JSON."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "text"
    return {list: "list", dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def get(row: dict, field: str):
    """``row[field]``; absent and null both count as missing (CSV/parquet fill gaps with null)."""
    if row.get(field) is None:
        raise RowError(field, "missing")
    return row[field]


def text(value, field: str) -> str:
    """A non-blank string, returned unchanged."""
    if not isinstance(value, str):
        raise RowError(field, f"expected text, got {kind(value)}")
    if not value.strip():
        raise RowError(field, "empty text")
    return value


def messages(value, field: str) -> list[dict]:
    """A non-empty list of {"role", "content"} dicts -> copies with only those two keys."""
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of {{role, content}} messages, got {kind(value)}")
    if not value:
        raise RowError(field, "empty list of messages")
    return [message(m, i, field) for i, m in enumerate(value, 1)]


def message(value, index: int, field: str) -> dict:
    """Message number ``index`` (1-based, for the error text) of a messages list."""
    where = f"message {index}"
    if not isinstance(value, dict):
        raise RowError(field, f"{where}: expected a {{role, content}} object, got {kind(value)}")
    role, content = value.get("role"), value.get("content")
    if role not in ROLES:
        raise RowError(field, f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise RowError(field, f"{where}: content: expected text, got {kind(content)}")
    if not content.strip():
        raise RowError(field, f"{where}: empty content")
    return {"role": role, "content": content}


def prompt(value, field: str = "prompt") -> Prompt:
    """Text or chat messages."""
    if isinstance(value, list):
        return messages(value, field)
    return text(value, field)


def reply(value, field: str) -> str:
    """A completion: text, or a list holding exactly one assistant message (TRL's conversational form)."""
    if not isinstance(value, list):
        return text(value, field)
    turns = messages(value, field)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        roles = [t["role"] for t in turns]
        raise RowError(field, f"expected text or a list of one assistant message, got roles {roles}")
    return turns[0]["content"]


def conversation(value, field: str) -> tuple[list[dict], str]:
    """Messages ending with the assistant's reply -> (the messages before it, the reply text)."""
    turns = messages(value, field)
    last = turns[-1]["role"]
    if last != "assistant":
        raise RowError(field, f"last message must be the assistant's reply, got role '{last}'")
    if len(turns) == 1:
        raise RowError(field, "no messages before the assistant's reply")
    return turns[:-1], turns[-1]["content"]


def margin(row: dict) -> float | None:
    """Optional finite number; absent or null -> None."""
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError("margin", f"expected a number, got {kind(value)} {value!r}")
    if not math.isfinite(value):
        raise RowError("margin", f"expected a finite number, got {value}")
    return float(value)


def different(chosen: str, rejected: str) -> None:
    """A pair whose two sides are the same text teaches nothing and gives a zero-loss gradient."""
    if chosen.strip() == rejected.strip():
        raise RowError("rejected", "identical to 'chosen'")
