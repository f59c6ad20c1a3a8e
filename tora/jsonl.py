"""Reading JSONL input: one JSON object per line, errors that name file and line.

`file_format` is the one place that tells the kinds of JSONL file apart by
their first object: tora trajectories carry `schema_version`; ToRA's released
rows carry `question` and `code`; grading pairs carry `pred` and `ref`; a data
set carries a question field (`QUESTION_FIELDS`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

from tora.errors import DataError

FileFormat = Literal["trajectories", "released", "pairs", "dataset", "unknown"]
# Where data sets keep the question, in the order a user file's fields are guessed.
QUESTION_FIELDS = ("question", "problem", "input", "query")


def iter_objects(path: Path, *, skip_invalid: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line.

    A line that is not a JSON object raises `DataError` naming the file and
    line, unless `skip_invalid` (a resume must survive a torn last line).
    """
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DataError(path, None, None, f"cannot read: {exc.strerror}") from exc
    with handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if skip_invalid:
                    continue
                raise DataError(path, line_no, None, f"not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                if skip_invalid:
                    continue
                raise DataError(path, line_no, None, "expected a JSON object")
            yield line_no, row


def first_object(path: Path) -> tuple[int, dict[str, Any]]:
    for found in iter_objects(path):
        return found
    raise DataError(path, None, None, "empty file: it holds no records")


class Sniffed(NamedTuple):
    format: FileFormat
    line: int  # of the first object, for error messages
    first: dict[str, Any]


def record_format(row: dict[str, Any]) -> FileFormat:
    if "schema_version" in row:
        return "trajectories"
    if "code" in row and "question" in row:
        return "released"
    if "pred" in row and "ref" in row:
        return "pairs"
    if any(field in row for field in QUESTION_FIELDS):
        return "dataset"
    return "unknown"


def file_format(path: Path) -> Sniffed:
    """The kind of file `path` is, from its first object; `DataError` if it holds none."""
    line, first = first_object(path)
    return Sniffed(record_format(first), line, first)
