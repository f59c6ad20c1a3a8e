"""Where exported rows go: JSONL (a file, replaced atomically, or stdout) and Parquet.

A file is written next to its destination and renamed over it at the end, so
an interrupted export never leaves half a file under the requested name.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tora.errors import RecordError, UsageError


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _publish(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as exc:
        raise RecordError(f"cannot write {path}: {exc.strerror}") from exc


# Characters JSON leaves raw that many line splitters (str.splitlines, some
# editors and JavaScript tools) take for line breaks: written escaped, one
# record stays one line for every reader.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def jsonl_line(row: dict[str, Any]) -> str:
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (JSON's "\ud800" reads into one; UTF-8 cannot hold it): keep it escaped, losslessly.
        line = json.dumps(row)
    return line.translate(_LINE_BREAKS) + "\n"


def write_jsonl(rows: Iterable[dict[str, Any]], out: Path | None) -> int:
    n = 0
    if out is None:
        try:
            for row in rows:
                sys.stdout.write(jsonl_line(row))
                n += 1
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader left (`| head`): stop quietly, and keep Python from
            # failing again when it flushes stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return n
    tmp = _tmp(out)
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(jsonl_line(row))
                n += 1
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RecordError(f"cannot write {out}: {exc.strerror}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _publish(tmp, out)
    return n


def write_parquet(rows: list[dict[str, Any]], out: Path) -> int:
    try:
        import datasets
    except ModuleNotFoundError as exc:
        raise UsageError("the parquet format needs Hugging Face datasets: pip install 'tora-tir[export]'") from exc
    datasets.disable_progress_bars()
    tmp = _tmp(out)
    try:
        datasets.Dataset.from_list(rows).to_parquet(str(tmp))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _publish(tmp, out)
    return len(rows)
