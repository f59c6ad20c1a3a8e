"""Reading JSONL input: one JSON object per line, errors that name file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tora.errors import DataError


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
