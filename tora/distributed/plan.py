"""A batch verb's work on one problem: what a worker runs for each problem it is leased.

Sharding is by problem, never by sample: every sample of a problem runs on
the worker that holds its lease, so whatever a verb decides per problem
(`tora curate` keeps, deduplicates and caps per problem, and may stop
sampling one early) is decided where all of its records are. A verb gives
the cluster layer a `ProblemPlan`; each worker gets its own copy (Ray
pickles it) and calls, for each problem of a lease:

1. `begin(problem, records, kept)` with what earlier sessions recorded for
   it (all shards and the merged files): returns records to append to the
   kept file now (a curated problem whose kept set a kill cut short);
2. `jobs(problem)`: its jobs still to run, drawn lazily as slots free up (a
   curator can stop yielding once a problem is full);
3. `recorded(result)` after each result is fsynced in the worker's shard:
   returns records to keep now (the per-problem finalisation hook);
4. `end(problem)` once every job drawn for it has come back.

`pending(problem, records, kept)` is asked on the driver, before leasing:
False means the problem is complete and is not leased at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tora.backends.base import Backend
from tora.engine import SolveConfig
from tora.evaluate import origin_for, sample_job
from tora.record import Problem, Trajectory
from tora.scheduler import Graded, Job


@dataclass
class Prior:
    """What earlier sessions recorded for one problem."""

    records: list[Trajectory] = field(default_factory=list)
    kept: list[Trajectory] = field(default_factory=list)


class ProblemPlan(Protocol):
    def start(self, backend: Backend) -> None:
        """Once per worker, with its model loaded."""

    def pending(self, problem: Problem, records: Sequence[Trajectory], kept: Sequence[Trajectory]) -> bool:
        """Whether a worker has anything to do for the problem."""
        ...

    def begin(self, problem: Problem, records: Sequence[Trajectory], kept: Sequence[Trajectory]) -> list[Trajectory]:
        ...

    def jobs(self, problem: Problem) -> Iterator[Job]:
        ...

    def recorded(self, result: Graded) -> list[Trajectory]:
        ...

    def end(self, problem: Problem) -> list[Trajectory]:
        ...


@dataclass
class EvalPlan:
    """`tora eval`: K samples per problem; a sample is done once it has a record that was not interrupted
    (what `tora.evaluate.load_finished` counts), so a resumed or re-leased problem runs only the rest."""

    samples: int
    config: SolveConfig
    origin: str = "greedy"
    _done: dict[str, set[int]] = field(default_factory=dict)

    def start(self, backend: Backend) -> None:
        self.origin = origin_for(backend, self.config)

    def _finished(self, records: Sequence[Trajectory]) -> set[int]:
        return {t.sample_index for t in records if t.result.finish != "interrupted" and t.sample_index < self.samples}

    def pending(self, problem: Problem, records: Sequence[Trajectory], kept: Sequence[Trajectory]) -> bool:
        return len(self._finished(records)) < self.samples

    def begin(self, problem: Problem, records: Sequence[Trajectory], kept: Sequence[Trajectory]) -> list[Trajectory]:
        self._done[problem.id] = self._finished(records)
        return []

    def jobs(self, problem: Problem) -> Iterator[Job]:
        done = self._done.get(problem.id, set())
        for k in range(self.samples):
            if k not in done:
                yield sample_job(problem, k, self.config, self.samples, self.origin)

    def recorded(self, result: Graded) -> list[Trajectory]:
        return []

    def end(self, problem: Problem) -> list[Trajectory]:
        self._done.pop(problem.id, None)
        return []
