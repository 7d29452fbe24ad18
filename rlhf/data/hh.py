"""Anthropic HH-RLHF transcripts: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` <-> chat messages.

A turn starts only at "\\n\\nHuman:" / "\\n\\nAssistant:" (or at the very start of
the text). The real data has assistant replies that begin with the literal words
"Human: ..." right after "Assistant: "; requiring the blank line keeps those inside
the reply instead of inventing a turn.
"""

from __future__ import annotations

import re

from rlhf.data.fields import RowError

SPEAKERS = {"Human": "user", "Assistant": "assistant", "System": "system"}
TURN = re.compile(r"(?:^|\n\n)(Human|Assistant|System):")


def parse(transcript: str, field: str) -> tuple[list[dict], str]:
    """HH transcript -> (prompt messages before the final Assistant turn, final reply stripped).

    The reply may be "" (the caller decides whether that is an error: it is for a
    preference pair, not when only the prompt is wanted).
    """
    turns = split_turns(transcript, field)
    if turns[-1]["role"] != "assistant":
        raise RowError(field, "transcript has no final '\\n\\nAssistant:' turn")
    prompt = turns[:-1]
    if not prompt:
        raise RowError(field, "transcript has no turns before the final Assistant turn")
    for i, turn in enumerate(prompt, 1):
        if not turn["content"]:
            raise RowError(field, f"turn {i} ({turn['role']}) is empty")
    return prompt, turns[-1]["content"]


def split_turns(transcript: str, field: str) -> list[dict]:
    """All turns as messages with stripped content; raises if the text is not a transcript."""
    # split with one capture group -> [before, speaker1, text1, speaker2, text2, ...]
    parts = TURN.split(transcript)
    if parts[0].strip():
        raise RowError(field, "transcript does not start with a '\\n\\nHuman:' turn")
    if len(parts) == 1:
        raise RowError(field, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns in the text")
    return [
        {"role": SPEAKERS[speaker], "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2])
    ]
