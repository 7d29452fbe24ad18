"""The repository speaks of the project, not of how it was made: no tracked file names numbered work periods,
issue numbers, work branches or the removed logbook. Reasons, measurements and pitfalls live in docs/ (each
figure with the commit it was measured at); history is git's."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROCESS_WORDS = re.compile(
    r"\bsessions? [0-9]"                 # a numbered work period
    r"|\bsession-[0-9]"
    r"|\bissues? #?[0-9]+\b"             # an issue number
    r"|\bbranch [a-z]+[0-9]+\b"          # a work branch
    r"|\b(?:NOTES|PPO_CHECKLIST|PITFALLS)\.md\b",  # files outside the repository, or removed from it
    re.IGNORECASE)
SKIPPED = (".ci/",)
"""CI's own scripts, which may name the machinery they run under."""


def process_words(text: str, name: str = "<text>") -> list[str]:
    """`name:line: text` for every line of `text` that names the development process."""
    return [f"{name}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
            if PROCESS_WORDS.search(line)]


def tracked_texts():
    """(path, text) of every tracked text file but the skipped ones; binary files (a NUL byte, or not UTF-8)
    and files missing from the working tree are left out."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in names.decode().split("\0"):
        if not name or name.startswith(SKIPPED):
            continue
        path = ROOT / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            yield name, data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def test_no_tracked_file_names_the_development_process():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    found = [hit for name, text in tracked_texts() for hit in process_words(text, name)]
    assert not found, ("these lines name the development process (work periods, issue numbers, branches, the "
                       "removed logbook); say what the project does and why, and put measurements in docs/ with "
                       "the commit they were measured at:\n" + "\n".join(found))


@pytest.mark.parametrize("line", [
    "measured in " + "session" + " 14",
    "Sessions" + " 1-6 used another base",
    "see " + "session" + "-12's notes",
    "fixed for " + "issue" + " 17",
    "the case of " + "Issue" + " #3",
    "on " + "branch" + " est15",
    "(" + "NOTES" + ".md, Decisions)",
])
def test_the_check_flags_a_planted_reference(line):
    text = "a clean first line\n" + line + "\nanother clean line\n"
    assert process_words(text, "planted.py") == [f"planted.py:2: {line}"]


@pytest.mark.parametrize("line", [
    "the session fixture builds the demo once",
    "a hub branch, tag or commit of name_or_path",
    "one issue with this approach is memory",
    "measured at commit 3a7f172 on 2 CPU cores",
    "docs/design.md, \"Module layers\"",
])
def test_the_check_leaves_plain_words_alone(line):
    assert process_words(line) == []
