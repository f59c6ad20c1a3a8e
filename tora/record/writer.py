"""Append-only JSONL storage for trajectories.

One record per line, written with a single `write` on an O_APPEND descriptor
and fsynced before `append` returns, so a crash loses at most the record being
written and never one already recorded. Files are never rewritten in place.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from tora.errors import DataError, RecordError
from tora.jsonl import iter_objects
from tora.record.schema import Trajectory, check_version


class TrajectoryWriter:
    """Appends trajectories to one JSONL file; safe to share between tasks."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = asyncio.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RecordError(f"cannot open {self.path} for appending: {exc.strerror}") from exc
        self._heal_torn_tail()

    def _heal_torn_tail(self) -> None:
        # A crash mid-write can leave a last line without its newline; start on
        # a fresh line so the next record is not glued to the torn one.
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                os.write(self._fd, b"\n")

    def append_sync(self, trajectory: Trajectory) -> None:
        self.append_bytes((trajectory.model_dump_json() + "\n").encode())

    def append_bytes(self, data: bytes) -> None:
        """Whole serialised records (lines already ending in a newline), in one write and one fsync.

        The merge of shard files copies records byte for byte through this.
        """
        try:
            while data:
                data = data[os.write(self._fd, data) :]
            os.fsync(self._fd)
        except OSError as exc:
            raise RecordError(f"cannot append to {self.path}: {exc.strerror}") from exc

    async def append(self, trajectory: Trajectory) -> None:
        async with self._lock:
            await asyncio.to_thread(self.append_sync, trajectory)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_trajectories(path: Path, *, skip_invalid: bool = False) -> Iterator[Trajectory]:
    """Yield the records of a JSONL file.

    A malformed line raises `DataError` naming file, line and field, unless
    `skip_invalid` (used by resume, which must survive a torn last line).
    """
    for lineno, raw in iter_objects(path, skip_invalid=skip_invalid):
        try:
            check_version(raw)
            yield Trajectory.model_validate(raw)
        except ValidationError as exc:
            if skip_invalid:
                continue
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise DataError(path, lineno, field, err["msg"]) from exc
        except ValueError as exc:
            if skip_invalid:
                continue
            raise DataError(path, lineno, "schema_version", str(exc)) from exc
