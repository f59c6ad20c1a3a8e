"""One worker of a run spread over a cluster: one event loop with its own scheduler, kernels and model.

On Ray a worker is an async actor (`ray.remote(ShardWorker)`): Ray runs its
methods as coroutines on the actor's one event loop, so the leases it holds
share one `Scheduler`, under the worker's own three limits (trajectories in
flight, live kernels, grading processes). Kernels are local processes of the
worker's node, in its own `KernelPool`: never shared across workers. The
model is the worker's own client: loaded in the worker from the spec
(llama.cpp, or a vLLM engine on the node's GPU) or a client of a shared
OpenAI-compatible endpoint (`openai:...`); the worker is handed the spec
string and nothing else.

Every trajectory is appended (fsynced) to the worker's shard under the run
folder before anything else learns of it; see `tora.distributed.shards`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox import SandboxPolicy
from tora.backends.base import Backend, Done, GenerationRequest, StreamEvent
from tora.distributed.plan import Prior, ProblemPlan
from tora.distributed.shards import shard_files
from tora.loop import Loop, ManagedKernels
from tora.prompts import PromptTemplate
from tora.record import Problem, Trajectory, TrajectoryWriter
from tora.scheduler import Capacity, Job, Scheduler, episode_factory


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker builds its own parts from; sent to each one (picklable)."""

    model: str  # the spec the worker loads, and that records name
    template: PromptTemplate
    policy: SandboxPolicy
    grader: str | None
    capacity: Capacity
    run_id: str
    plan: ProblemPlan
    # In-process callers (benchmarks) may build the parts themselves: a paced
    # stand-in for a GPU endpoint, or simulated kernels.
    backend_factory: Callable[[], Backend] | None = None
    kernels_factory: Callable[[], ManagedKernels[Any]] | None = None


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    node: str  # the Ray node id (the host name outside Ray)
    host: str
    pid: int
    backend: str
    model: str


@dataclass(frozen=True)
class WorkerStats:
    """A worker's counters, polled by the driver for its progress table."""

    name: str
    node: str
    host: str
    at: float  # time.time() when taken
    tokens: int  # completion tokens generated so far
    trajectories: int  # recorded so far
    errors: int  # of those, finish == "error"
    correct: int
    in_flight: int
    waiting: int  # jobs drawn from leases, not started yet
    grading: int
    kernels_live: int
    kernels_limit: int
    problems: int  # leased to it and not ended


@dataclass(frozen=True)
class LeaseReport:
    lease: str
    worker: str
    records: int
    kept: int


class MeteredBackend(Backend):
    """The worker's model, counting the tokens it generates (for tokens/s on the driver)."""

    def __init__(self, inner: Backend, counter: Counter[str]) -> None:
        self.inner = inner
        self.name = inner.name
        self.model = inner.model
        self._counter = counter

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        async with contextlib.aclosing(self.inner.stream(request)) as events:  # type: ignore[type-var]
            async for event in events:
                if isinstance(event, Done):
                    self._counter["tokens"] += event.completion_tokens
                yield event

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return self.inner.format_chat(messages)

    def prepare(self, prefix: str) -> None:
        self.inner.prepare(prefix)

    def for_episode(self, problem: Problem, sample_index: int) -> Backend:
        return MeteredBackend(self.inner.for_episode(problem, sample_index), self._counter)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _node() -> str:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except ImportError:
        pass
    return socket.gethostname()


class ShardWorker:
    """Runs leases of problems on one scheduler and appends every record to its own shard."""

    def __init__(self, name: str, run_dir: str, setup: WorkerSetup) -> None:
        self.name = name
        self.run_dir = Path(run_dir)
        self.setup = setup
        self.plan = setup.plan
        self.counts: Counter[str] = Counter()
        self._loop: Loop | None = None
        self._scheduler: Scheduler | None = None
        self._records: TrajectoryWriter | None = None
        self._kept: TrajectoryWriter | None = None
        self._node = ""
        self._host = socket.gethostname()

    async def start(self) -> WorkerInfo:
        """Load the model, start the kernel pool and open the shard; fails here if any of them cannot."""
        from tora.backends.registry import load_backend

        setup = self.setup
        self._node = _node()
        inner = setup.backend_factory() if setup.backend_factory else load_backend(setup.model)
        inner.prepare(setup.template.prefix)
        backend = MeteredBackend(inner, self.counts)
        self.plan.start(backend)
        make_episode = episode_factory(backend, setup.template, setup.model, setup.run_id)
        loop = Loop(make_episode, setup.policy, setup.capacity, grader=setup.grader, backend=backend,
                    kernels=setup.kernels_factory() if setup.kernels_factory else None)
        await loop.start()
        self._loop, self._scheduler = loop, loop.scheduler
        records, _ = shard_files(self.run_dir, self.name)
        self._records = TrajectoryWriter(records)
        return WorkerInfo(self.name, self._node, self._host, os.getpid(), inner.name, inner.model)

    async def _keep(self, kept: Sequence[Trajectory]) -> int:
        if not kept:
            return 0
        if self._kept is None:
            self._kept = TrajectoryWriter(shard_files(self.run_dir, self.name)[1])
        await self._kept.append_all(kept)  # a problem's kept set in one write
        return len(kept)

    async def run_lease(self, lease: str, problems: list[Problem], prior: dict[str, Prior]) -> LeaseReport:
        """Run every job of a lease's problems; returns once each has its record in the shard."""
        scheduler, records = self._scheduler, self._records
        if scheduler is None or records is None:
            raise RuntimeError("ShardWorker.start() was not awaited")  # the driver's contract
        plan = self.plan
        self.counts["problems"] += len(problems)
        kept = recorded = 0
        for p in problems:
            before = prior.get(p.id) or Prior()
            kept += await self._keep(plan.begin(p, before.records, before.kept))
        by_id = {p.id: p for p in problems}
        outstanding: Counter[str] = Counter()
        exhausted: set[str] = set()
        ended: set[str] = set()

        def feed() -> Iterator[Job]:
            for p in problems:
                for job in plan.jobs(p):
                    outstanding[p.id] += 1
                    self.counts["drawn"] += 1
                    yield job
                exhausted.add(p.id)

        async def end(pid: str) -> None:
            nonlocal kept
            ended.add(pid)
            self.counts["problems"] -= 1
            kept += await self._keep(plan.end(by_id[pid]))

        def wanted(job: Job) -> bool:
            if plan.wanted(job):
                return True
            outstanding[job.problem.id] -= 1  # withdrawn: it will yield no result
            self.counts["withdrawn"] += 1
            return False

        async with contextlib.aclosing(scheduler.run(feed(), wanted=wanted)) as results:
            async for result in results:
                t = result.trajectory
                await records.append(t)
                recorded += 1
                self.counts["trajectories"] += 1
                self.counts["errors"] += t.result.finish == "error"
                self.counts["correct"] += result.correct
                kept += await self._keep(plan.recorded(result))
                outstanding[t.problem.id] -= 1
                for pid in [pid for pid in exhausted - ended if outstanding[pid] == 0]:
                    await end(pid)
        for p in problems:
            if p.id not in ended:
                await end(p.id)
        return LeaseReport(lease, self.name, recorded, kept)

    async def stats(self) -> WorkerStats:
        s = self._scheduler
        kernels = s.kernels if s is not None else None
        started = s.stats.started if s is not None else 0
        finished = s.stats.finished if s is not None else 0
        in_flight = s.in_flight if s is not None else 0
        c = self.counts
        return WorkerStats(
            name=self.name, node=self._node, host=self._host, at=time.time(), tokens=c["tokens"],
            trajectories=c["trajectories"], errors=c["errors"], correct=c["correct"], in_flight=in_flight,
            waiting=max(0, c["drawn"] - started - c["withdrawn"]), grading=max(0, started - finished - in_flight),
            kernels_live=kernels.live if kernels else 0, kernels_limit=kernels.limit if kernels else 0,
            problems=c["problems"])

    async def close(self) -> None:
        """Stop the grading workers and kernels, free the model, close the shard."""
        try:
            if self._loop is not None:
                await self._loop.aclose()
        finally:
            for writer in (self._records, self._kept):
                if writer is not None:
                    writer.close()
