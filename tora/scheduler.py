"""Many trajectories at once: each its own task, three limits sized independently.

ToRA's scripts run in synchronous rounds: every problem waits for the slowest
generation, then for the slowest cell, and one 5 s timeout stalls the round.
Here each trajectory is its own asyncio task (generate -> execute ->
generate ...), so the model is busy while code runs and a slow cell delays
only its own trajectory. The limits:

- `in_flight`: trajectories running at once (each waits on the model or on
  its kernel). Jobs are started lazily as others finish, so a run of 100k
  jobs holds only `in_flight` tasks, not 100k.
- `kernels`: live kernels. A trajectory takes its kernel at its first code
  block (not at its start) and returns it at its end; while it waits on the
  model it holds only that one kernel.
- `graders`: grading worker processes. A trajectory is graded after it has
  left its in-flight slot, in batches: whatever finished while the previous
  batch was graded goes to the worker pool together.

Jobs are drawn lazily and can be withdrawn: `run(jobs, wanted=...)` asks
`wanted(job)` when the job's slot comes up, just before its trajectory
would start, and drops a job no longer wanted without running it (`tora
curate --stop-when-full` stops sampling a problem once enough are kept,
with no synchronous rounds).

Consumers get `Graded` results as trajectories finish (`run`), or, for one
trajectory at a time with its events (the HTTP server), `submit`. A failing
item becomes a record with `finish="error"` and a typed `result.error`; it
never aborts the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tora.backends.base import Backend
from tora.engine import Brancher, Episode, KernelLike, KernelSource, Prefix, PrefixStates, SolveConfig
from tora.errors import GraderError
from tora.events import Event, Finished
from tora.grading import DEFAULT_TIMEOUT
from tora.grading.items import ItemGrade, grade_trajectories, with_grade
from tora.prompts import PromptTemplate
from tora.record import Problem, Trajectory
from tora.record.schema import ErrorInfo

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """One trajectory to produce: a problem, which sample of it, and how."""

    problem: Problem
    sample_index: int = 0
    config: SolveConfig | None = None  # None: the scheduler's default
    origin: str = "greedy"
    prefix: Prefix | None = None  # continue another trajectory (tora correct, curate's branches)
    # A job that starts from another's prefix (tora.branching): awaited for the job to run, before
    # it takes a slot, so a job waiting on another holds no slot and no kernel.
    resolve: Callable[[Job], Awaitable[Job]] | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str, int]:
        return (self.problem.id, self.sample_index)


def origin_for(backend: Backend, config: SolveConfig) -> str:
    """What a trajectory records as its `origin`: replayed, sampled or greedy."""
    if backend.name == "replay":
        return "replayed"
    return "sampled" if config.sampling.temperature > 0 else "greedy"


def sample_config(config: SolveConfig, k: int, samples: int) -> SolveConfig:
    """Sample k's config: with a seed and several samples, seed + k (distinct, reproducible)."""
    if config.sampling.seed is not None and samples > 1:
        return config.with_seed(config.sampling.seed + k)
    return config


@dataclass(frozen=True)
class Graded:
    """A finished trajectory with its verdict copied into `result`.

    `pred` is the answer the grader read, which is not always the engine's
    `final_answer`: `tora-compat` reads a completion the way ToRA does.
    """

    trajectory: Trajectory
    pred: str | None = None
    extracted_by: str | None = None

    @property
    def pair(self) -> tuple[str, int]:
        return (self.trajectory.problem.id, self.trajectory.sample_index)

    @property
    def correct(self) -> bool:
        return self.trajectory.result.correct is True


def graded(trajectory: Trajectory, item: ItemGrade) -> Graded:
    return Graded(with_grade(trajectory, item), item.pred, item.extracted_by)


@dataclass(frozen=True)
class Capacity:
    in_flight: int = 16
    kernels: int = 8
    graders: int = 2


class LiveKernels:
    """A kernel source bounded to `limit` live kernels; counts what it handed out."""

    def __init__(self, source: KernelSource[Any], limit: int) -> None:
        self.source = source
        self.limit = max(1, limit)
        self._slots = asyncio.Semaphore(self.limit)
        self.live = 0
        self.peak = 0

    async def acquire(self) -> KernelLike:
        kernel: KernelLike = await self.take(self.source.acquire)
        return kernel

    async def take(self, make: Callable[[], Awaitable[T]]) -> T:
        """What `make` returns (a kernel made another way: a fork of a shared prefix's kernel,
        `tora.prefix_kernels`), counted as one of the live kernels; its slot is taken first."""
        await self._slots.acquire()
        try:
            made = await make()
        except BaseException:
            self._slots.release()
            raise
        self.live += 1
        self.peak = max(self.peak, self.live)
        return made

    async def release(self, kernel: KernelLike) -> None:
        try:
            await self.source.release(kernel)
        finally:
            self.live -= 1
            self._slots.release()


class GradingQueue:
    """Grades finished trajectories in batches on a pool of worker processes.

    One batch at a time goes to the pool (from a thread: the pool blocks),
    holding everything that finished while the previous one was graded, so
    N workers grade N answers at once and the event loop never waits.
    """

    def __init__(self, grader: str, workers: int, timeout: float = DEFAULT_TIMEOUT, max_batch: int = 256) -> None:
        self.grader = grader
        self.workers = max(1, workers)
        self.timeout = timeout
        self.max_batch = max_batch
        self._pending: list[tuple[Trajectory, asyncio.Future[Graded]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    async def grade(self, trajectory: Trajectory) -> Graded:
        if self._task is None:
            self._task = asyncio.create_task(self._serve())
        future: asyncio.Future[Graded] = asyncio.get_running_loop().create_future()
        self._pending.append((trajectory, future))
        self._wake.set()
        return await future

    async def _serve(self) -> None:
        from tora.grading.api import use_workers

        use_workers(self.workers)
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                self.batches += 1
                try:
                    items = await asyncio.to_thread(grade_trajectories, [t for t, _ in batch], self.grader,
                                                    self.timeout)
                    results = [graded(t, item) for (t, _), item in zip(batch, items, strict=True)]
                except Exception as exc:  # the grader broke, not the trajectories
                    err = GraderError(f"grading failed: {type(exc).__name__}: {exc}")
                    results = [_grader_failed(t, err) for t, _ in batch]
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _grader_failed(trajectory: Trajectory, exc: GraderError) -> Graded:
    result = trajectory.result.model_copy(
        update={"error": ErrorInfo(kind="grader", message=str(exc)), "correct": None, "grade_status": "error"})
    return Graded(trajectory.model_copy(update={"result": result}))


EpisodeFactory = Callable[[Job, KernelSource[Any]], Episode]


def episode_factory(backend: Backend, template: PromptTemplate, spec: str, run_id: str, *,
                    prefix_states: PrefixStates | None = None, brancher: Brancher | None = None) -> EpisodeFactory:
    """Episodes for jobs, all with one backend, template and run id (and, where the run shares
    prefixes, its prefix kernels and branch points)."""

    def make_episode(job: Job, kernels: KernelSource[Any]) -> Episode:
        return Episode(job.problem, backend=backend, template=template, kernels=kernels, config=job.config,
                       spec=spec, sample_index=job.sample_index, origin=job.origin, run_id=run_id,
                       prefix=job.prefix, prefix_states=prefix_states, brancher=brancher)

    return make_episode


@dataclass
class SchedulerStats:
    started: int = 0
    finished: int = 0
    skipped: int = 0  # withdrawn before they started (`wanted`)
    t0: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.t0
        return self.finished / elapsed if elapsed > 0 else 0.0


class Scheduler:
    """Runs jobs as independent trajectories under the three limits of `Capacity`."""

    def __init__(self, make_episode: EpisodeFactory, kernels: KernelSource[Any], *, grader: str | None,
                 capacity: Capacity | None = None, grade_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.make_episode = make_episode
        self.capacity = capacity or Capacity()
        self.kernels = LiveKernels(kernels, self.capacity.kernels)
        self.grading = GradingQueue(grader, self.capacity.graders, grade_timeout) if grader else None
        self._slots = asyncio.Semaphore(max(1, self.capacity.in_flight))
        self.stats = SchedulerStats()
        self.in_flight = 0

    async def trajectory(self, job: Job, on_event: Callable[[Event], None] | None = None) -> Graded:
        """Run one job to its graded trajectory, feeding its events to `on_event` as they happen."""
        result = await self._trajectory(job, on_event, None)
        assert result is not None  # only a `wanted` check withdraws a job
        return result

    async def _trajectory(self, job: Job, on_event: Callable[[Event], None] | None,
                          wanted: Callable[[Job], bool] | None) -> Graded | None:
        if job.resolve is not None:
            job = await job.resolve(job)
        async with self._slots:
            if wanted is not None and not wanted(job):
                self.stats.skipped += 1
                return None
            self.in_flight += 1
            self.stats.started += 1
            try:
                trajectory = await self._episode(job, on_event)
            finally:
                self.in_flight -= 1
        # The slot is free before grading: the next trajectory starts now.
        result = await self.grading.grade(trajectory) if self.grading else Graded(trajectory)
        self.stats.finished += 1
        return result

    async def _episode(self, job: Job, on_event: Callable[[Event], None] | None) -> Trajectory:
        episode = self.make_episode(job, self.kernels)
        async with contextlib.aclosing(episode.run()) as events:
            async for event in events:
                if on_event is not None:
                    on_event(event)
                if isinstance(event, Finished):
                    return event.trajectory
        raise RuntimeError("the episode ended without a Finished event")  # engine contract broken

    async def run(self, jobs: Iterable[Job], *,
                  wanted: Callable[[Job], bool] | None = None) -> AsyncGenerator[Graded, None]:
        """Yield each job's graded trajectory as soon as it is done, in finishing order.

        At most `in_flight` trajectories run, plus those being graded; jobs are
        drawn from `jobs` only as room frees up. A job for which `wanted`
        says False when its slot comes up is dropped unrun (and yields
        nothing). Closing the generator (or cancelling its consumer) cancels
        every trajectory still running.
        """
        running: set[asyncio.Task[Graded | None]] = set()
        # Finished tasks queue themselves: taking the next one costs the same
        # with 4000 tasks running as with 4 (asyncio.wait would look at all).
        finished: asyncio.Queue[asyncio.Task[Graded | None]] = asyncio.Queue()
        pending = iter(jobs)
        # Keep a few more tasks than slots, so a slot freed by a trajectory
        # that is now being graded is filled at once.
        window = max(1, self.capacity.in_flight) * 2

        def top_up() -> None:
            while len(running) < window:
                job = next(pending, None)
                if job is None:
                    return
                task = asyncio.create_task(self._trajectory(job, None, wanted))
                task.add_done_callback(finished.put_nowait)
                running.add(task)

        try:
            top_up()
            while running:
                task = await finished.get()
                running.discard(task)
                result = task.result()
                top_up()  # before the consumer gets the result: new work starts while it stores this one
                if result is not None:
                    yield result
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running)

    async def aclose(self) -> None:
        if self.grading is not None:
            await self.grading.aclose()
