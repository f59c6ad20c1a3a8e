"""Who was given which problems: the lease log of a run spread over workers.

RUN_DIR/leases.jsonl, appended (fsynced) by the driver alone. `start` says
where a worker runs (node, host, pid). A lease hands
one worker a batch of problems; it ends `done` (the worker returned: every
job of those problems has its record in the worker's shard) or `lost` (the
worker died, or failed, and was killed so that it can write nothing more).
The problems of a lost lease go to another worker, which is handed the
records the lost one left, so it runs only what has no record yet: a unit of
work is redone once (if it was cut short), never twice.

Completion is never read from this log: it is judged from the valid records
in the shards and the merged files (a log line can be torn with the driver,
and a worker may have recorded more than the driver heard of). The log says
who ran what: how many leases the last session left open, and, for a test or
an audit, that a lost worker's problems were leased again exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from tora.errors import RecordError
from tora.jsonl import iter_objects
from tora.run_dir import LEASES

LeaseState = Literal["start", "lease", "done", "lost"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class LeaseEvent(BaseModel):
    event: LeaseState
    lease: str  # "<session>-<n>": unique within the run ("" on `start`)
    worker: str
    session: int
    problems: list[str] = Field(default_factory=list)  # on `lease`
    reason: str | None = None  # on `lost`
    node: str | None = None  # on `start`: where the worker runs
    host: str | None = None
    pid: int | None = None
    at: str = Field(default_factory=_now)


class LeaseLog:
    """The driver's append-only log; each event is one fsynced write."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LEASES
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RecordError(f"cannot open {self.path} for appending: {exc.strerror}") from exc
        size = os.fstat(self._fd).st_size
        if size and _last_byte(self.path, size) != b"\n":
            os.write(self._fd, b"\n")  # after a torn line, start on a fresh one

    def write(self, event: LeaseEvent) -> None:
        try:
            os.write(self._fd, (event.model_dump_json() + "\n").encode())
            os.fsync(self._fd)
        except OSError as exc:
            raise RecordError(f"cannot append to {self.path}: {exc.strerror}") from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _last_byte(path: Path, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(size - 1)
        return f.read(1)


def read_leases(run_dir: Path) -> Iterator[LeaseEvent]:
    """The valid events of a run's log (a torn line is skipped)."""
    path = Path(run_dir) / LEASES
    if not path.is_file():
        return
    for _, raw in iter_objects(path, skip_invalid=True):
        try:
            yield LeaseEvent.model_validate(raw)
        except ValidationError:
            continue


def open_leases(events: Sequence[LeaseEvent]) -> list[LeaseEvent]:
    """Leases given and never ended: in flight when the session that gave them stopped."""
    ended = {e.lease for e in events if e.event in ("done", "lost")}
    return [e for e in events if e.event == "lease" and e.lease not in ended]


def last_session(events: Sequence[LeaseEvent]) -> int:
    return max((e.session for e in events), default=0)
