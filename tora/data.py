"""Evaluation data sets as `Problem` records.

A built-in set NAME is read from the first of: `$TORA_DATA_DIR/NAME/test.jsonl`,
`../shared/data/NAME/test.jsonl` beside the checkout (or beside the current
directory), and the copy shipped inside the package (`tora/datasets/`, the
MIT-licensed sets only; asdiv, mawps and the competition sets aime24, amc23,
minerva_math and olympiadbench are not shipped, see `_NOT_SHIPPED`).
`source_path` says which file that is, so a run can record it. Question text
and reference answer are built the way ToRA builds them (its `parse_question`
and `parse_ground_truth`: one builder per set below). Any other JSONL file
works with named question/answer/id fields. Bad data raises `DataError`
naming file, line and field.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tora.errors import DataError
from tora.fences import boxed_contents
from tora.jsonl import QUESTION_FIELDS, iter_objects
from tora.record.schema import Problem

Row = dict[str, Any]


PACKAGED = Path(__file__).resolve().parent / "datasets"


def data_dirs() -> list[Path]:
    """Where built-in sets are looked for, in order (the folders need not exist)."""
    env = os.environ.get("TORA_DATA_DIR")
    local = [Path(__file__).resolve().parents[1].parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return [*([Path(env)] if env else []), *local, PACKAGED]


def _text(path: Path, line: int, row: Row, field: str) -> str:
    value = row.get(field)
    if value is None:
        raise DataError(path, line, field, "missing")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(path, line, field, f"expected text or a number, got {type(value).__name__}")
    text = _number_text(value) if isinstance(value, int | float) else value
    if not text.strip():
        raise DataError(path, line, field, "empty")
    return text


def _number_text(value: float) -> str:
    """145.0 -> "145"; other floats keep their shortest exact form."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _level(value: Any) -> Any:
    """MATH writes "Level 3", MATH-500 writes 3: both become 3 so per-level tables line up."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", str(value))
    return int(m.group(1)) if m else value


def _row_id(path: Path, line: int, row: Row, field: str) -> str:
    value = row.get(field)
    if value is None or isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(path, line, field, "missing or not a string/integer id")
    return str(value)


# Each built-in set: file (relative to the data folder) and a row -> Problem builder.


def _gsm8k(path: Path, line: int, row: Row) -> Problem:
    solution = _text(path, line, row, "answer")
    if "####" not in solution:
        raise DataError(path, line, "answer", "no '#### <answer>' at the end")
    return Problem(
        id=_row_id(path, line, row, "idx"),
        text=_text(path, line, row, "question"),
        answer=solution.split("####")[-1].strip(),
        source="gsm8k",
    )


def _math(path: Path, line: int, row: Row) -> Problem:
    solution = _text(path, line, row, "solution")
    boxed = boxed_contents(solution)
    if not boxed:
        raise DataError(path, line, "solution", "no \\boxed{} answer")
    meta: dict[str, Any] = {}
    if row.get("level") is not None:
        meta["level"] = _level(row["level"])
    if isinstance(row.get("type"), str):
        meta["type"] = row["type"]
    return Problem(
        id=_row_id(path, line, row, "idx"),
        text=_text(path, line, row, "problem"),
        answer=boxed[-1].strip(),
        source="math",
        meta=meta,
    )


def _math500(path: Path, line: int, row: Row) -> Problem:
    meta: dict[str, Any] = {}
    if row.get("level") is not None:
        meta["level"] = _level(row["level"])
    if isinstance(row.get("subject"), str):
        meta["subject"] = row["subject"]
    if "subject" in meta:
        meta["type"] = meta["subject"]  # the key MATH uses, so per-type tables line up
    return Problem(
        id=_row_id(path, line, row, "unique_id"),
        text=_text(path, line, row, "problem"),
        answer=_text(path, line, row, "answer").strip(),
        source="math500",
        meta=meta,
    )


def _gsm_hard(path: Path, line: int, row: Row) -> Problem:
    return Problem(
        id=_row_id(path, line, row, "idx"),
        text=_text(path, line, row, "input"),
        answer=_text(path, line, row, "target"),
        source="gsm-hard",
    )


def _svamp(path: Path, line: int, row: Row) -> Problem:
    body = _text(path, line, row, "Body").strip()
    if not body.endswith("."):
        body += "."
    meta: dict[str, Any] = {key: row[key] for key in ("Type", "Equation", "ID") if key in row}
    if "Type" in meta:
        meta["type"] = meta.pop("Type")
    return Problem(
        id=_row_id(path, line, row, "idx"),
        text=body + " " + _text(path, line, row, "Question").strip(),
        answer=_text(path, line, row, "Answer"),
        source="svamp",
        meta=meta,
    )


def _asdiv(path: Path, line: int, row: Row) -> Problem:
    answer = re.sub(r"\s*\([^()]*\)\s*$", "", _text(path, line, row, "answer")).strip()
    if not answer:
        raise DataError(path, line, "answer", "empty once the unit is removed")
    meta = {"type": row["solution_type"]} if isinstance(row.get("solution_type"), str) else {}
    return Problem(
        id=_row_id(path, line, row, "idx"),
        text=_text(path, line, row, "body").strip() + " " + _text(path, line, row, "question").strip(),
        answer=answer,
        source="asdiv",
        meta=meta,
    )


def _mawps(path: Path, line: int, row: Row) -> Problem:
    meta = {"type": row["type"]} if isinstance(row.get("type"), str) else {}
    return Problem(
        id=_row_id(path, line, row, "idx"),
        text=_text(path, line, row, "input"),
        answer=_text(path, line, row, "target"),
        source="mawps",
        meta=meta,
    )


# The competition sets, read as Qwen2.5-Math's evaluation reads them (../shared/data/README.md).


def _competition(source: str) -> Callable[[Path, int, Row], Problem]:
    """aime24 and amc23: `problem` / `answer` (amc23 writes 27.0 for 27)."""

    def build(path: Path, line: int, row: Row) -> Problem:
        return Problem(id=_row_id(path, line, row, "id"), text=_text(path, line, row, "problem"),
                       answer=_text(path, line, row, "answer").strip(), source=source)

    return build


def _minerva_math(path: Path, line: int, row: Row) -> Problem:
    problem = _math(path, line, row)
    problem.source = "minerva_math"
    return problem


def _olympiadbench(path: Path, line: int, row: Row) -> Problem:
    """`question` / `final_answer[0]` without its $...$; the `unit` is not part of the answer."""
    answers = row.get("final_answer")
    if not isinstance(answers, list) or not answers or not isinstance(answers[0], str) or not answers[0].strip("$ "):
        raise DataError(path, line, "final_answer", "expected a list whose first item is the answer text")
    meta: dict[str, Any] = {key: row[key] for key in ("answer_type", "unit") if row.get(key)}
    if isinstance(row.get("subfield"), str):
        meta["type"] = row["subfield"]
    return Problem(id=_row_id(path, line, row, "id"), text=_text(path, line, row, "question"),
                   answer=answers[0].strip().strip("$").strip(), source="olympiadbench", meta=meta)


_BUILDERS: dict[str, tuple[str, Callable[[Path, int, Row], Problem]]] = {
    "gsm8k": ("gsm8k/test.jsonl", _gsm8k),
    "math": ("math/test.jsonl", _math),
    "math500": ("math500/test.jsonl", _math500),
    "gsm-hard": ("gsm-hard/test.jsonl", _gsm_hard),
    "svamp": ("svamp/test.jsonl", _svamp),
    "asdiv": ("asdiv/test.jsonl", _asdiv),
    "mawps": ("mawps/test.jsonl", _mawps),
    "aime24": ("aime24/test.jsonl", _competition("aime24")),
    "amc23": ("amc23/test.jsonl", _competition("amc23")),
    "minerva_math": ("minerva_math/test.jsonl", _minerva_math),
    "olympiadbench": ("olympiadbench/test.jsonl", _olympiadbench),
}
DATASETS: tuple[str, ...] = tuple(_BUILDERS)


# Sets tora may not redistribute, and why: they are read only from a data folder.
_NOT_SHIPPED = {"asdiv": "CC BY-NC 4.0, non-commercial", "mawps": "no license upstream",
                **dict.fromkeys(("aime24", "amc23", "minerva_math", "olympiadbench"),
                                "competition problems, evaluation data read in place")}


def dataset_path(name: str) -> Path | None:
    """The file a built-in data set reads (the first copy found), or None for a name that is not one.

    Raises `DataError` with what to do when no copy is found.
    """
    return _builtin_path(name) if name in _BUILDERS else None


def _builtin_path(name: str) -> Path:
    relative = _BUILDERS[name][0]
    for folder in data_dirs():
        if (folder / relative).is_file():
            return (folder / relative).resolve()
    why = f"it is not shipped with tora ({_NOT_SHIPPED[name]})" if name in _NOT_SHIPPED else "no copy found"
    raise DataError(name, None, None, f"data set not found: {why}; put its file at $TORA_DATA_DIR/{relative} "
                                      f"(looked in {', '.join(str(d) for d in data_dirs())})")


def source_path(name_or_path: str | Path) -> Path:
    """The file `load_problems(name_or_path)` reads: a built-in set's copy, else the file itself."""
    name = str(name_or_path)
    if name in _BUILDERS and not Path(name).is_file():
        return _builtin_path(name)
    path = Path(name_or_path)
    if not path.is_file():
        raise DataError(path, None, None, f"no such file, and not a data set name (known: {', '.join(DATASETS)})")
    return path.resolve()


def _rows(path: Path) -> Iterator[tuple[int, Row]]:
    return iter_objects(path)


_ANSWER_FIELDS = ("answer", "target", "gt", "reference")
_ID_FIELDS = ("id", "idx", "unique_id")


def _user_file(
    path: Path, question_field: str | None, answer_field: str | None, id_field: str | None, limit: int | None
) -> list[Problem]:
    problems: list[Problem] = []
    for line_no, row in _rows(path):
        # Unnamed fields are guessed from common names on each row; named ones must be present.
        q_field = question_field or next((f for f in QUESTION_FIELDS if f in row), QUESTION_FIELDS[0])
        a_field = answer_field or next((f for f in _ANSWER_FIELDS if f in row), None)
        i_field = id_field or next((f for f in _ID_FIELDS if f in row), None)
        problems.append(
            Problem(
                id=_row_id(path, line_no, row, i_field) if i_field else f"{path.stem}-{line_no}",
                text=_text(path, line_no, row, q_field),
                answer=_text(path, line_no, row, a_field).strip() if a_field else None,
                source=str(path),
                meta={k: _level(v) if k == "level" else v for k, v in row.items() if k in ("level", "type", "subject")},
            )
        )
        if limit is not None and len(problems) >= limit:
            break
    return problems


def load_problems(
    name_or_path: str | Path,
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Problems of a built-in set (by name) or of a JSONL file (by path), in file order."""
    if limit is not None and limit < 0:
        raise DataError(name_or_path, None, None, "limit must be >= 0")
    name = str(name_or_path)
    path = source_path(name_or_path)
    if name in _BUILDERS and not Path(name).is_file():
        if question_field or answer_field or id_field:
            raise DataError(name, None, None, "field options apply to JSONL files, not to built-in data sets")
        build = _BUILDERS[name][1]
        problems: list[Problem] = []
        for line_no, row in _rows(path):
            if limit is not None and len(problems) >= limit:
                break
            problem = build(path, line_no, row)
            problem.split = "test"  # every built-in set is a test split
            problems.append(problem)
        return problems
    return _user_file(path, question_field, answer_field, id_field, limit)


def problem_from_text(text: str, answer: str | None = None, source: str = "cli") -> Problem:
    """A problem typed by a user or sent by a client: its id is a digest of the
    whitespace-normalised text, so the same question gets the same id."""
    digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()[:12]
    return Problem(id=f"adhoc-{digest}", text=text.strip(), answer=answer, source=source)
