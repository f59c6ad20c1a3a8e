"""The structured outcome of running one cell."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

CellStatus = Literal["ok", "error", "timeout", "died"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class CellError(BaseModel):
    model_config = ConfigDict(frozen=True)

    ename: str
    evalue: str
    traceback: list[str] = []


class CellResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: CellStatus
    stdout: str = ""
    stderr: str = ""
    display: list[str] = []
    error: CellError | None = None
    duration_s: float
    truncated: bool = False
    # True when the kernel had to be killed and replaced: the cell's variables,
    # imports and files are gone, which a caller may want to tell the model.
    restarted: bool = False
    # Messages of this cell's output that the runtime dropped (over the size
    # limit for one message, or of the wrong shape); ``truncated`` is set too.
    dropped: int = 0
