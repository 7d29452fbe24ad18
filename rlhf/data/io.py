"""Reading raw rows from local files or the Hugging Face hub.

Rows come back as ``(row_number, dict)``: the 1-based line number for .jsonl (so
an editor's "go to line" lands on it), the 1-based position for .json lists,
.parquet, .csv (header not counted) and hub datasets. Nothing here knows about
formats; that is formats.py's job.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from rlhf.data.records import DataError, Problem

Row = tuple[int, dict]

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# Suffixes that mark a missing name as a local file rather than a hub dataset.
# Hub names may contain dots ("teknium/OpenHermes-2.5") and one slash, so neither
# "has a dot" nor "has a slash" alone can tell them apart.
PATH_SUFFIXES = LOCAL_SUFFIXES + (".gz", ".tsv", ".txt", ".arrow", ".zip", ".yaml", ".yml")


def read_rows(source: str, split: str | None = None) -> list[Row]:
    """Rows of a local .jsonl/.json/.parquet/.csv file, or of hub dataset ``source``.

    split: the hub split (default "train"); ignored for local files, which hold one split.
    Raises DataError for a missing file, an unreadable file or any malformed JSON line.
    """
    name, rows, problems = read_source(source, split)
    if problems:
        raise DataError.from_problems(problems)
    return rows


def read_source(source: str, split: str | None) -> tuple[str, list[Row], list[Problem]]:
    """(display name, good rows, problems of unreadable rows), so loaders can skip bad lines."""
    source = str(source)  # also accept a pathlib.Path
    path = Path(source).expanduser()
    if path.is_file():
        return source, *read_file(path, source)
    if path.exists():
        raise DataError(f"{source}: is not a file (expected one of {', '.join(LOCAL_SUFFIXES)})")
    if looks_like_path(source):
        raise DataError(f"{source}: file not found")
    return read_hub(source, split or "train")


def looks_like_path(source: str) -> bool:
    """True for names that can only be a local path, never a hub id like ``"org/name"``."""
    if source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1:
        return True
    return any(source.lower().endswith(s) for s in PATH_SUFFIXES)


def read_file(path: Path, name: str) -> tuple[list[Row], list[Problem]]:
    """Dispatch on the file extension."""
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:  # permissions, a dangling mount, ...
        raise DataError(f"{name}: cannot read the file: {e.strerror or e}") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, name)
    if suffix == ".json":
        return read_json(path, name)
    if suffix == ".parquet":
        return numbered(read_parquet(path, name)), []
    if suffix == ".csv":
        return numbered(read_csv(path, name)), []
    raise DataError(f"{name}: unsupported file type '{suffix}' (expected one of {', '.join(LOCAL_SUFFIXES)})")


def read_jsonl(path: Path, name: str) -> tuple[list[Row], list[Problem]]:
    """One JSON object per line; blank lines are skipped but still counted."""
    rows, problems = [], []
    # newline=None: \r\n and \r end lines as they do in open()'s text mode
    with io.StringIO(read_text(path, name), newline=None) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                # without the newline, a truncated line's error column points into the line
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                problems.append(Problem(name, number, None, f"malformed JSON line: {e.msg} at column {e.colno}"))
                continue
            keep_object(rows, problems, name, number, value)
    return rows, problems


def read_json(path: Path, name: str) -> tuple[list[Row], list[Problem]]:
    """A JSON list of objects, or ``{"data": [...]}``."""
    try:
        value = json.loads(read_text(path, name))
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(f"{name}: expected a JSON list of objects or {{\"data\": [...]}}")
    rows, problems = [], []
    for number, item in enumerate(value, 1):
        keep_object(rows, problems, name, number, item)
    return rows, problems


def read_text(path: Path, name: str) -> str:
    """The file as text; a DataError naming the line and byte offset of the first byte that is not UTF-8.
    utf-8-sig: files saved by some editors start with a BOM, which json.loads rejects."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        offset = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(f"{name}: line {line}, byte offset {offset}: not UTF-8 text (byte 0x{data[offset]:02x}: "
                        f"{e.reason}); save the file as UTF-8") from None


def keep_object(rows: list[Row], problems: list[Problem], name: str, number: int, value) -> None:
    """Append ``value`` to rows if it is a JSON object, else record why not."""
    if isinstance(value, dict):
        rows.append((number, value))
    else:
        problems.append(Problem(name, number, None, f"expected a JSON object, got {type(value).__name__}"))


def read_parquet(path: Path, name: str) -> list[dict]:
    """All rows of a parquet file as plain Python dicts (lists of structs become lists of dicts)."""
    import pyarrow.parquet as pq  # lazy: only parquet users pay for the import

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{name}: cannot read parquet file: {e}") from e


def read_csv(path: Path, name: str) -> list[dict]:
    """CSV rows with numbers parsed (so a margin column is numeric) and empty cells as None."""
    import pandas as pd  # lazy: pandas is slow to import and only CSV needs it

    read_text(path, name)  # a clear message for a file that is not UTF-8 (pandas' names no row)
    try:
        records = pd.read_csv(path).to_dict(orient="records")
    except Exception as e:  # pandas raises ParserError, UnicodeDecodeError, EmptyDataError...
        raise DataError(f"{name}: cannot read CSV file: {e}") from e
    # pandas marks empty cells NaN; None makes them read as "missing" rather than "wrong type".
    return [{k: None if is_nan(v) else v for k, v in r.items()} for r in records]


def is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def read_hub(name: str, split: str) -> tuple[str, list[Row], list[Problem]]:
    """A hub dataset split via datasets.load_dataset; shown in messages as ``name[split]``."""
    import datasets  # lazy, and looked up at call time so tests can monkeypatch load_dataset

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split, auth...
        if "Unknown split" in str(e):  # datasets: 'Unknown split "x". Should be one of [...]'
            raise DataError(f"{name}: has no split '{split}': {e}") from None
        raise DataError(f"{name}: not a local file, and loading it from the hub failed: {e}") from e
    return f"{name}[{split}]", numbered(dict(r) for r in dataset), []


def numbered(rows) -> list[Row]:
    """``[(1, row), (2, row), ...]``."""
    return list(enumerate(rows, 1))
