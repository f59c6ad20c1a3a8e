"""One record file per worker, merged into the run's own files with no duplicates.

Under RUN_DIR (a path the driver and every worker see: on a cluster, a
shared filesystem):

    shards/<worker>.jsonl           every trajectory the worker recorded
    shards/<worker>.curated.jsonl   what it kept (curation runs)
    trajectories.jsonl, curated.jsonl   the merge of the shards

A shard has one writer, its worker (append-only, fsynced, `TrajectoryWriter`),
so workers never contend for a file, and a worker killed mid-write tears only
its own last line. The merge (the driver's as the run goes, or a later resume
on one machine) copies each complete, valid shard line byte for byte into the
run's file, unless that file holds it already:

- by record id: a merge repeated after a kill half-way adds nothing twice;
- by unit of work (`(problem id, sample index)` by default): a unit that
  already has a settled record (any finish but `error` or `interrupted`) gets
  no second one. Two settled records of one unit come only from two workers
  that both ran it (one presumed lost that was still running); the first
  merged wins, so the merged file holds what one process would have written.

Records of a unit after an error or an interruption stay: a resume in one
process leaves the same history (the later record supersedes the earlier).
Shards are never rewritten or deleted: everything a worker recorded stays.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from tora.record import Trajectory, TrajectoryWriter, read_trajectories
from tora.record.schema import check_version
from tora.run_dir import CURATED, SHARDS, TRAJECTORIES

RECORDS_SUFFIX = ".jsonl"
KEPT_SUFFIX = ".curated.jsonl"
_CHUNK = 8 << 20  # bytes read, and written to a merged file, at a time

UnitOf = Callable[[Trajectory], Hashable]
Observer = Callable[[Trajectory, bool], None]  # (record, is it a kept one)


def default_unit(t: Trajectory) -> Hashable:
    return (t.problem.id, t.sample_index)


def settled(t: Trajectory) -> bool:
    """A record that ends its unit of work: a later one of the same unit is a duplicate run."""
    return t.result.finish not in ("error", "interrupted")


def shard_files(run_dir: Path, worker: str) -> tuple[Path, Path]:
    """(records, kept) shard paths of one worker."""
    base = Path(run_dir) / SHARDS
    return base / f"{worker}{RECORDS_SUFFIX}", base / f"{worker}{KEPT_SUFFIX}"


def has_shards(run_dir: Path) -> bool:
    folder = Path(run_dir) / SHARDS
    return folder.is_dir() and any(p.stat().st_size > 0 for p in folder.glob(f"*{RECORDS_SUFFIX}"))


def parse_record(line: bytes) -> Trajectory | None:
    """A valid record, or None for a line that is not one (torn by a kill, or foreign)."""
    try:
        raw = json.loads(line)
        if not isinstance(raw, dict):
            return None
        check_version(raw)
        return Trajectory.model_validate(raw)
    except (ValueError, ValidationError):
        return None


def complete_lines(path: Path, offset: int) -> Iterator[tuple[bytes, int]]:
    """(line, offset after it) for each complete line from `offset` on.

    A last line without its newline is left alone: its writer may still be
    writing it, and if it was killed, the line is torn.
    """
    with path.open("rb") as f:
        f.seek(offset)
        held = b""
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return
            data = held + chunk
            start = 0
            while (end := data.find(b"\n", start)) >= 0:
                offset += end + 1 - start
                yield data[start : end + 1], offset
                start = end + 1
            held = data[start:]


@dataclass
class MergeCounts:
    added: int = 0  # records appended to trajectories.jsonl
    kept: int = 0  # records appended to curated.jsonl
    duplicates: int = 0  # already there (same id), or a second settled record of a unit
    invalid: int = 0  # complete lines that are not records (torn by a kill)

    def __iadd__(self, other: MergeCounts) -> MergeCounts:
        self.added += other.added
        self.kept += other.kept
        self.duplicates += other.duplicates
        self.invalid += other.invalid
        return self


class _Target:
    """One merged file: what it holds, and its writer."""

    def __init__(self, path: Path, unit: UnitOf | None) -> None:
        self.path = path
        self.unit = unit  # None: duplicates are judged by id alone (kept files)
        self.ids: set[str] = set()
        self.units: set[Hashable] = set()
        self._writer: TrajectoryWriter | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0

    def note(self, t: Trajectory) -> None:
        self.ids.add(t.id)
        if self.unit is not None and settled(t):
            self.units.add(self.unit(t))

    def is_new(self, t: Trajectory) -> bool:
        if t.id in self.ids:
            return False
        return self.unit is None or not settled(t) or self.unit(t) not in self.units

    def add(self, line: bytes) -> None:
        self._buffer.append(line)
        self._buffered += len(line)
        if self._buffered >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            self._writer = TrajectoryWriter(self.path)  # starts on a fresh line after a torn one
        self._writer.append_bytes(b"".join(self._buffer))
        self._buffer, self._buffered = [], 0

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ShardMerge:
    """Merges a run folder's shards into its files, incrementally.

    `load` reads what the merged files hold; each `merge` then reads only
    what the shards gained since the last one. `observe(record, kept)` sees
    every valid record of the merged files, those loaded and those added
    (the driver keeps the records of the problems it may lease again).
    Only one process may merge into a run folder at a time: the driver of
    the run, or the verb resuming it.
    """

    def __init__(self, run_dir: Path, *, unit: UnitOf = default_unit, observe: Observer | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.observe = observe
        self._records = _Target(self.run_dir / TRAJECTORIES, unit)
        self._kept = _Target(self.run_dir / CURATED, None)
        self._offsets: dict[Path, int] = {}
        self.total = MergeCounts()

    def load(self) -> None:
        for target, kept in ((self._records, False), (self._kept, True)):
            if target.path.is_file():
                for t in read_trajectories(target.path, skip_invalid=True):
                    target.note(t)
                    if self.observe is not None:
                        self.observe(t, kept)

    def merge(self) -> MergeCounts:
        """Bring every shard line not yet merged into the run's files; fsynced when it returns."""
        counts = MergeCounts()
        folder = self.run_dir / SHARDS
        if folder.is_dir():
            # Records first: a kept record is merged after the record it copies.
            for suffix, target, kept in ((RECORDS_SUFFIX, self._records, False), (KEPT_SUFFIX, self._kept, True)):
                for path in sorted(folder.glob(f"*{suffix}")):
                    if suffix == RECORDS_SUFFIX and path.name.endswith(KEPT_SUFFIX):
                        continue
                    self._merge_file(path, target, kept, counts)
                target.flush()
        self.total += counts
        return counts

    def _merge_file(self, path: Path, target: _Target, kept: bool, counts: MergeCounts) -> None:
        offset = self._offsets.get(path, 0)
        for line, end in complete_lines(path, offset):
            offset = end
            if not line.strip():
                continue
            t = parse_record(line)
            if t is None:
                counts.invalid += 1
            elif not target.is_new(t):
                counts.duplicates += 1
            else:
                target.note(t)
                target.add(line)
                if kept:
                    counts.kept += 1
                else:
                    counts.added += 1
                if self.observe is not None:
                    self.observe(t, kept)
        self._offsets[path] = offset

    def close(self) -> None:
        self._records.close()
        self._kept.close()


def merge_shards(run_dir: Path, *, unit: UnitOf = default_unit) -> MergeCounts:
    """One whole merge of a run folder's shards (a resume on one machine starts with it)."""
    merge = ShardMerge(run_dir, unit=unit)
    try:
        merge.load()
        return merge.merge()
    finally:
        merge.close()
