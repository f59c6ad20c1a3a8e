"""Which records an export or a report reads.

A run folder means its `curated.jsonl` (a curation run's kept trajectories)
when it has one, else its `trajectories.jsonl`; a file means itself. Records
are read through the schema (`tora.record.read_trajectories`), so a bad line
is an error naming the file, line and field.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tora.errors import UsageError
from tora.record import Trajectory, read_trajectories
from tora.run_dir import TRAJECTORIES

CURATED = "curated.jsonl"


@dataclass(frozen=True)
class Source:
    path: Path  # the records file read
    run_dir: Path | None  # the folder it was named by, if any

    @property
    def others(self) -> list[Path]:
        """The run folder's other records file (a curated file's parents live in trajectories.jsonl)."""
        if self.run_dir is None:
            return []
        return [p for p in (self.run_dir / CURATED, self.run_dir / TRAJECTORIES) if p.is_file() and p != self.path]


def resolve(source: Path) -> Source:
    if source.is_dir():
        for name in (CURATED, TRAJECTORIES):
            if (source / name).is_file():
                return Source(source / name, source)
        raise UsageError(f"{source}: a folder without {CURATED} or {TRAJECTORIES}; name a run folder or a records file")
    if not source.exists():
        raise UsageError(f"{source}: no such file or folder")
    return Source(source, None)


def read(paths: Iterable[Path], *, skip_invalid: bool = False) -> Iterator[Trajectory]:
    for path in paths:
        yield from read_trajectories(path, skip_invalid=skip_invalid)
