"""The engine side of `tora serve`: one scheduler, one kernel pool, one record file.

Every choice of every request is one trajectory on the scheduler, so the
server's concurrency is the scheduler's: `in_flight` trajectories run, the
rest wait for a slot, and at most `max_queued` wait (beyond that a request is
refused with 429 rather than left to pile up). A trajectory whose client went
away is cancelled like any other: the engine interrupts its cell, the kernel
goes back, and the partial trajectory is recorded with finish `interrupted`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from tora.backends.base import Backend
from tora.engine import Episode, KernelSource, SolveConfig
from tora.events import Event
from tora.loop import Loop, LoopSettings
from tora.prompts import PromptTemplate
from tora.record import Problem, Trajectory, TrajectoryWriter
from tora.scheduler import Job, episode_factory, origin_for


class Runner:
    def __init__(self, backend: Backend, template: PromptTemplate, settings: LoopSettings, *, spec: str,
                 writer: TrajectoryWriter | None, max_queued: int, run_id: str) -> None:
        self.backend = backend
        self.template = template
        self.config = settings.config
        self.spec = spec
        self.writer = writer
        self.run_id = run_id
        self.capacity = settings.capacity
        self._new_episode = episode_factory(backend, template, spec, run_id)
        self.loop = Loop(self._make_episode, settings.policy, settings.capacity, grader=None, backend=backend)
        self.scheduler = self.loop.scheduler
        self.max_admitted = settings.capacity.in_flight + max_queued
        self.admitted = 0  # trajectories running or waiting for a slot
        self.recorded = 0
        # Episodes by id(job), so that a cancelled one's partial trajectory can be recorded.
        self._episodes: dict[int, Episode] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def _make_episode(self, job: Job, kernels: KernelSource[Any]) -> Episode:
        episode = self._new_episode(job, kernels)
        self._episodes[id(job)] = episode
        return episode

    async def start(self) -> None:
        await self.loop.start()

    @property
    def queued(self) -> int:
        return self.admitted - self.scheduler.in_flight

    def admit(self, n: int) -> bool:
        """Take `n` places in the queue, or none if they would overflow it."""
        if self.admitted + n > self.max_admitted:
            return False
        self.admitted += n
        return True

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run one admitted trajectory's coroutine as a task that `close` cancels if it
        is still running then; its place in the queue is given back when it ends,
        even if it is cancelled before it starts."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self.admitted -= 1

    async def solve(self, problem: Problem, config: SolveConfig, sample_index: int,
                    on_event: Callable[[Event], None] | None) -> Trajectory:
        """One trajectory, run and recorded (also when it is cancelled part way)."""
        job = Job(problem, sample_index, config, origin_for(self.backend, config))
        try:
            graded = await self.scheduler.trajectory(job, on_event)
        except asyncio.CancelledError:
            episode = self._episodes.get(id(job))
            if episode is not None and episode.trajectory is not None:
                # Shielded: a second cancellation must not lose the record.
                await asyncio.shield(self._record(episode.trajectory))
            raise
        finally:
            self._episodes.pop(id(job), None)
        await self._record(graded.trajectory)
        return graded.trajectory

    async def _record(self, trajectory: Trajectory) -> None:
        if self.writer is not None:
            await self.writer.append(trajectory)
        self.recorded += 1

    def interrupt(self) -> None:
        """Cancel every running trajectory (the server is stopping)."""
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        self.interrupt()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        await self.loop.aclose()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "in_flight": self.scheduler.in_flight,
            "queued": self.queued,
            "kernels_live": self.scheduler.kernels.live,
            "kernels_peak": self.scheduler.kernels.peak,
            "trajectories": self.recorded,
        }
