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
   and `wanted(job)` when a drawn job's slot comes up (False withdraws it:
   the problem filled up meanwhile);
3. `recorded(result)` after each result is fsynced in the worker's shard:
   returns records to keep now (the per-problem finalisation hook);
4. `end(problem)` once every job drawn for it has come back or was withdrawn.

`pending(problem, records, kept)` is asked on the driver, before leasing:
False means the problem is complete and is not leased at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tora.backends.base import Backend
from tora.curation import KeepRule, Ledger, Work
from tora.engine import SamplingParams, SolveConfig
from tora.record import Problem, Trajectory
from tora.scheduler import Graded, Job, origin_for, sample_config


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

    def wanted(self, job: Job) -> bool:
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
                yield Job(problem, k, sample_config(self.config, k, self.samples), self.origin)

    def wanted(self, job: Job) -> bool:
        return True

    def recorded(self, result: Graded) -> list[Trajectory]:
        return []

    def end(self, problem: Problem) -> list[Trajectory]:
        self._done.pop(problem.id, None)
        return []


@dataclass
class CuratePlan:
    """`tora curate`: a problem's samples, kept by `tora.curation`'s rules (`KeepRule`, dedupe, cap,
    seeded rank, stop when full), decided where they all are. One `Ledger` and `Work` per worker,
    holding only the problems it is leased (dropped as they end)."""

    samples: int
    config: SolveConfig
    rule: KeepRule
    cap: int | None = None
    seed: int = 0
    stop_when_full: bool = False
    retry_errors: bool = False
    greedy_first: bool = False
    _backend: Backend | None = None
    _work: Work | None = None

    def _fresh(self) -> Work:
        ledger = Ledger(key=lambda t: (t.problem.id, t.sample_index), group=lambda t: t.problem.id,
                        eligible=self.rule.keeps, cap=self.cap, seed=self.seed)
        return Work(ledger, {}, retry_errors=self.retry_errors, stop_when_full=self.stop_when_full)

    def _load(self, work: Work, problem: Problem, records: Sequence[Trajectory], kept: Sequence[Trajectory]) -> None:
        # As `load_finished` reads them: the latest record of each sample, interrupted ones not counted.
        work.units[problem.id] = [(problem.id, k) for k in range(self.samples)]
        # `tora correct`'s kept continuations of the problem count as seen for duplicates, as in one process.
        work.ledger.load([t for t in records if t.result.finish != "interrupted" and t.sample_index < self.samples],
                         [t for t in kept if t.origin != "teacher_corrected"], seen=kept)

    def start(self, backend: Backend) -> None:
        self._backend = backend
        self._work = self._fresh()

    def pending(self, problem: Problem, records: Sequence[Trajectory], kept: Sequence[Trajectory]) -> bool:
        work = self._fresh()
        self._load(work, problem, records, kept)
        return not work.final(problem.id) or bool(work.ledger.settle(problem.id))

    def _state(self) -> Work:
        if self._work is None:
            raise RuntimeError("CuratePlan.start() was not called")  # the worker's contract
        return self._work

    def begin(self, problem: Problem, records: Sequence[Trajectory], kept: Sequence[Trajectory]) -> list[Trajectory]:
        work = self._state()
        self._load(work, problem, records, kept)
        # Final already (a kill cut its kept set short, or it filled up): settled again, idempotently.
        return work.settle_closed(problem.id) if work.final(problem.id) else []

    def jobs(self, problem: Problem) -> Iterator[Job]:
        work, backend = self._state(), self._backend
        assert backend is not None
        greedy = SolveConfig(sampling=SamplingParams(), limits=self.config.limits, render=self.config.render)
        for _, k in work.pending(problem.id):
            cfg = greedy if self.greedy_first and k == 0 else sample_config(self.config, k, self.samples)
            yield Job(problem, k, cfg, origin_for(backend, cfg))

    def wanted(self, job: Job) -> bool:
        return self._state().open(job.problem.id)

    def recorded(self, result: Graded) -> list[Trajectory]:
        t = result.trajectory
        return self._state().note(t, (t.problem.id, t.sample_index)) or []

    def end(self, problem: Problem) -> list[Trajectory]:
        work = self._state()
        kept = [] if problem.id in work.closed else work.settle_closed(problem.id)
        work.units.pop(problem.id, None)
        work.ledger.records.pop(problem.id, None)  # its content hashes stay: later problems are deduplicated too
        work.ledger.kept.pop(problem.id, None)
        return kept
