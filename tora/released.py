"""Reader for ToRA's released output format.

One JSON object per problem: `idx`, `question`, `gt`, `code` (a list of
completions, each the model's text with ```output blocks inline) and `pred`
(ToRA's extracted predictions, one per completion).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tora.errors import DataError
from tora.jsonl import iter_objects


class ReleasedItem(BaseModel):
    idx: int | str
    question: str
    gt: str | None = None
    code: list[str]
    pred: list[Any] = Field(default_factory=list)
    line: int = 0
    raw: dict[str, Any] = Field(default_factory=dict, exclude=True)


def read_released(path: Path) -> Iterator[ReleasedItem]:
    for lineno, raw in iter_objects(path):
        for field in ("idx", "question", "code"):
            if field not in raw:
                raise DataError(path, lineno, field, "missing (ToRA released format needs idx, question, code)")
        code = raw["code"]
        if isinstance(code, str):
            code = [code]
        if not isinstance(code, list) or not all(isinstance(c, str) for c in code):
            raise DataError(path, lineno, "code", "must be a list of completion strings")
        gt = raw.get("gt")
        pred = raw.get("pred") or []
        yield ReleasedItem(
            idx=raw["idx"],
            question=str(raw["question"]),
            gt=None if gt is None else str(gt),
            code=code,
            pred=pred if isinstance(pred, list) else [pred],
            line=lineno,
            raw=raw,
        )
