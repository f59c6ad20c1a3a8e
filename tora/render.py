"""Execution result -> the text the model sees inside its ```output block.

Rendering is a named policy because it is part of the training data: a model
trained on one rendering expects it at inference. The policy's name is
recorded on every execution step.

- `tora-compat`: what ToRA showed its models: stdout, else the last line of
  the traceback, else nothing; longer than 400 characters becomes the first
  200 + "..." + the last 200.
- `default`: everything the cell produced (stdout, rich display text,
  stderr, and a compact error), so the model can see partial output before an
  exception; long output keeps its head and tail with the cut marked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from tora.errors import UsageError


class _Err(Protocol):
    ename: str
    evalue: str
    traceback: list[str]


class CellLike(Protocol):
    """What a renderer reads; sandbox.CellResult and the record's ExecutionStep both fit."""

    @property
    def status(self) -> str: ...
    @property
    def stdout(self) -> str: ...
    @property
    def stderr(self) -> str: ...
    @property
    def display(self) -> list[str]: ...
    @property
    def error(self) -> _Err | None: ...
    @property
    def duration_s(self) -> float: ...
    @property
    def truncated(self) -> bool: ...


def _cut(text: str, head: int, tail: int, marker: str) -> str:
    if len(text) <= head + tail:
        return text
    return text[:head] + marker.format(n=len(text) - head - tail) + text[-tail:]


def _last_traceback_line(cell: CellLike) -> str:
    if cell.error is None:
        return ""
    return f"{cell.error.ename}: {cell.error.evalue}".rstrip(": ").strip()


def _status_message(cell: CellLike, timeout_s: float | None) -> str:
    if cell.status == "timeout":
        limit = f" of {timeout_s:g} s" if timeout_s else ""
        return f"TimeoutError: execution exceeded the time limit{limit} and was stopped; variables defined so far may be lost"
    if cell.status == "died":
        return "KernelDied: the Python process died (memory limit or os._exit?); a fresh interpreter replaced it, earlier variables are gone"
    return ""


def render_tora_compat(cell: CellLike, timeout_s: float | None = None) -> str:
    out = cell.stdout.strip()
    if not out:
        out = _last_traceback_line(cell) or _status_message(cell, timeout_s).split(";")[0]
    return _cut(out, 200, 200, "...")


def render_default(cell: CellLike, timeout_s: float | None = None) -> str:
    parts: list[str] = []
    if cell.stdout.strip():
        parts.append(cell.stdout.rstrip())
    parts.extend(d.rstrip() for d in cell.display if d.strip())
    if cell.stderr.strip() and cell.status == "ok":
        parts.append(cell.stderr.rstrip())
    if cell.error is not None:
        # The innermost frame is where the model's bug is; the full IPython
        # traceback mostly repeats the cell back and wastes context.
        parts.append(_last_traceback_line(cell))
    status = _status_message(cell, timeout_s)
    if status:
        parts.append(status)
    text = "\n".join(parts)
    return _cut(text, 1500, 500, "\n... [{n} characters cut] ...\n")


RENDERERS: dict[str, Callable[[CellLike, float | None], str]] = {
    "default": render_default,
    "tora-compat": render_tora_compat,
}


def get_renderer(name: str) -> Callable[[CellLike, float | None], str]:
    try:
        return RENDERERS[name]
    except KeyError:
        raise UsageError(f"unknown render policy {name!r}; choose one of: {', '.join(RENDERERS)}") from None


def observation(rendered: str, after: str, *, opened: bool = False) -> str:
    """The exact text appended to the context: an ```output block on its own line.

    `opened`: the model's own text already opened the block (on the token
    path its sampled "```output" is kept, see `tora.record.schema`): the
    observation is the rest of the block, from the next line.
    """
    lead = "" if not after or after.endswith("\n") else "\n"
    if opened:
        return f"{lead}{rendered}\n```\n"
    return f"{lead}```output\n{rendered}\n```\n"
