"""Training data: JSONL or CSV rows, checked up front, every bad row reported with its line number.

    classify   {"text": "great film", "label": "pos"}          CSV header: text,label
    generate   {"prompt": "Q: 2+2?\\nA:", "completion": " 4"}    CSV header: prompt,completion
    embed      {"text": "how do I reset it", "positive": "..."}  CSV header: text,positive

A file is read completely before training starts, and all of its problems are collected into one
`DataError`, so a user fixes the file once instead of once per crash. Line numbers are the file's own
(1-based; the CSV header is line 1). Blank lines are skipped: a trailing newline is not an error.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TASK_FIELDS", "DataError", "Dataset", "load_rows", "label_names", "MAX_LISTED"]

# The fields each task reads, in order. Extra fields are ignored (users keep ids, sources...).
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "classify": ("text", "label"),
    "generate": ("prompt", "completion"),
    "embed": ("text", "positive"),
}
# Fields that may be empty: a generation prompt can be empty (pure LM on the completion).
_MAY_BE_EMPTY = {("generate", "prompt")}
MAX_LISTED = 20  # a file with 10,000 bad rows still gives a readable error


class DataError(ValueError):
    """One or more bad rows. `problems` holds (line number, message) for every one of them."""

    def __init__(self, path: str | Path, problems: list[tuple[int, str]], header: str | None = None) -> None:
        self.path = str(path)
        self.problems = problems
        lines = [f"  line {n}: {msg}" for n, msg in problems[:MAX_LISTED]]
        if len(problems) > MAX_LISTED:
            lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
        head = header or f"{self.path}: {len(problems)} bad row{'s' if len(problems) != 1 else ''}"
        super().__init__("\n".join([head + ":", *lines]))

    @property
    def line_numbers(self) -> list[int]:
        return [n for n, _ in self.problems]


@dataclass
class Dataset:
    """Validated rows of one file. `lines[i]` is the file line row i came from (for later errors)."""

    path: str
    task: str
    rows: list[dict[str, str]]
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[str]:
        return [r[name] for r in self.rows]


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record or an Exception) for every non-blank record of the file."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except UnicodeDecodeError as exc:
        line, column = raw.count(b"\n", 0, exc.start) + 1, exc.start - raw.rfind(b"\n", 0, exc.start)
        raise DataError(path, [(line, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); save the file "
                                      "as UTF-8")], header=f"{path}: not UTF-8") from None
    if _is_csv(path, text):
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)  # csv's own newline handling
        try:
            if reader.fieldnames is None:  # reads the header line
                return
            yield 1, tuple(reader.fieldnames)  # a tuple (JSON never makes one): the caller checks the header
            for record in reader:
                # line_num is where the record ends: its line, unless a quoted field spans lines.
                # A short row leaves missing fields as None; a long one files extras under the None key.
                yield reader.line_num, ValueError("more fields than the header") if None in record else record
        except csv.Error as exc:  # the rest of the file cannot be trusted to line up, so stop here
            # line_num counts the lines read before the failing one's end was parsed: that line is the next
            yield reader.line_num + 1, ValueError(f"CSV syntax error: {exc}")
        return
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines() breaks on.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})")


def _is_csv(path: Path, text: str) -> bool:
    if path.suffix.lower() == ".csv":
        return True
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return False
    return not text.lstrip().startswith("{")  # unknown extension: JSON lines start with an object


def _check(task: str, record: Any) -> tuple[dict[str, str] | None, str | None]:
    """(normalised row, None) or (None, what is wrong with it)."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    missing = [f for f in TASK_FIELDS[task] if f not in record or record[f] is None]
    if missing:
        return None, f"missing field{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}"
    row: dict[str, str] = {}
    for name in TASK_FIELDS[task]:
        value = record[name]
        if name == "label":
            # Labels may be strings or integers; anything else (float, list, bool...) is ambiguous.
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                return None, f"field 'label' must be a string or an integer, got {type(value).__name__}"
            value = str(value).strip()
        elif not isinstance(value, str):
            return None, f"field {name!r} must be a string, got {type(value).__name__}"
        if not value.strip() and (task, name) not in _MAY_BE_EMPTY:
            return None, f"field {name!r} is empty"
        row[name] = value
    return row, None


def load_rows(path: str | Path, task: str, *, known_labels: list[str] | None = None) -> Dataset:
    """Read and check a whole file. Raises DataError listing every bad row.

    `known_labels`: for an evaluation file, the training labels; a label outside them is a bad row
    (the classifier head has no output for it)."""
    if task not in TASK_FIELDS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_FIELDS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    problems: list[tuple[int, str]] = []
    known = set(known_labels) if known_labels is not None else None
    for number, record in _records(path):
        if isinstance(record, tuple):  # the CSV header
            absent = [f for f in TASK_FIELDS[task] if f not in record]
            if absent:
                raise DataError(path, [(1, f"CSV header {','.join(record)!r} lacks {', '.join(absent)}")],
                                header=f"{path}: bad header (expected {','.join(TASK_FIELDS[task])})")
            continue
        if isinstance(record, Exception):
            problems.append((number, str(record)))
            continue
        row, problem = _check(task, record)
        if row is not None and known is not None and row["label"] not in known:
            row, problem = None, f"label {row['label']!r} does not occur in the training data"
        if problem is not None:
            problems.append((number, problem))
        else:
            rows.append(row)  # type: ignore[arg-type]
            lines.append(number)
    if problems:
        raise DataError(path, problems)
    if not rows:
        raise DataError(path, [(0, f"no rows (expected fields: {', '.join(TASK_FIELDS[task])})")],
                        header=f"{path}: empty")
    return Dataset(str(path), task, rows, lines)


def label_names(data: Dataset) -> list[str]:
    """Sorted label set: numerically when every label is an integer ("2" after "10" would surprise)."""
    labels = set(data.column("label"))
    if all(_is_int(label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
