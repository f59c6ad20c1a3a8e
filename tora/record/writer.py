"""Append-only JSONL storage for trajectories.

One record per line, written with a single `write` on an O_APPEND descriptor
and fsynced before `append` returns, so a crash loses at most the record being
written and never one already recorded. Files are never rewritten in place;
the one exception is `repair_tail`, for the verbs that own a run folder: it
moves an incomplete last line (half a record, from a kill mid-write) into a
`.torn` file beside it, so the file is again whole records only.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator, Sequence
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
        self.append_all_sync([trajectory])

    def append_all_sync(self, trajectories: Sequence[Trajectory]) -> None:
        """Several records in one write and one fsync (a curated group is appended whole)."""
        self.append_bytes("".join(t.model_dump_json() + "\n" for t in trajectories).encode())

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
        await self.append_all([trajectory])

    async def append_all(self, trajectories: Sequence[Trajectory]) -> None:
        if not trajectories:
            return
        async with self._lock:
            await asyncio.to_thread(self.append_all_sync, trajectories)

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


def _complete_record(line: bytes) -> bool:
    try:
        raw = json.loads(line)
        if not isinstance(raw, dict):
            return False
        check_version(raw)
        Trajectory.model_validate(raw)
    except (ValueError, ValidationError):
        return False
    return True


def repair_tail(path: Path) -> int:
    """Make a JSONL file end on a whole record again; returns the bytes moved aside.

    A last line without its newline is either a complete record (the kill
    fell between the record and its newline: the newline is added) or half of
    one, which is appended to `<file>.torn` and cut off. Nothing that was a
    complete record is ever removed. Call it only while holding the run's lock.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    try:
        with path.open("r+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            start = max(0, size - (1 << 16))
            while True:
                f.seek(start)
                chunk = f.read(size - start)
                if chunk.endswith(b"\n"):
                    return 0
                cut = chunk.rfind(b"\n")
                if cut >= 0 or start == 0:
                    break
                start = max(0, start - (1 << 20))  # a long record: look further back
            keep = start + cut + 1
            tail = chunk[cut + 1 :]
            if _complete_record(tail):
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
                return 0
            with path.with_name(path.name + ".torn").open("ab") as aside:
                aside.write(tail + b"\n")
                aside.flush()
                os.fsync(aside.fileno())
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
            return len(tail)
    except OSError as exc:
        raise RecordError(f"cannot repair {path}: {exc.strerror}") from exc
