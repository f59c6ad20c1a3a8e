"""Stand-ins for what a cluster has and this machine does not: GPU endpoints and many cores.

For capacity planning and the scaling benchmark (benchmarks/bench_ray.py):
how many workers an endpoint pool keeps busy, where trajectories/s stops
growing. Benchmark-only: it lives here, beside its one user, not in tora/.

- `Endpoint`: a serving endpoint as a Ray actor. It holds `slots` sequences
  at once (continuous batching) and decodes each at `tokens_per_s`; a
  request waits for a free slot, then for its tokens. So one endpoint's
  throughput grows with concurrency up to `slots` and is flat past it: an
  endpoint that saturates.
- `PacedBackend`: a worker's client of such endpoints. It plays a recorded
  trajectory (the replay backend: the same text, stops and budgets), but a
  call returns only after the endpoint has "generated" its tokens.
- `SleepKernels`: kernels whose cells take `cell_s` and print a fixed line,
  costing no CPU, so that sixteen simulated nodes fit on two cores.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sandbox.result import CellResult
from tora.backends.base import Backend, Done, GenerationRequest, StreamEvent
from tora.backends.replay import ReplayBackend
from tora.record import Problem


class Endpoint:
    """One simulated serving endpoint (use as `ray.remote(Endpoint)`)."""

    def __init__(self, slots: int, tokens_per_s: float) -> None:
        self.slots = slots
        self.tokens_per_s = tokens_per_s
        self._free = asyncio.Semaphore(slots)
        self.busy = 0
        self.served = 0
        self.tokens = 0

    async def generate(self, tokens: int) -> None:
        async with self._free:
            self.busy += 1
            try:
                await asyncio.sleep(tokens / self.tokens_per_s)
            finally:
                self.busy -= 1
        self.served += 1
        self.tokens += tokens

    async def load(self) -> dict[str, int]:
        return {"busy": self.busy, "served": self.served, "tokens": self.tokens}


class PacedBackend(Backend):
    """A replayed model whose every call is paced by one of `endpoints` (Ray actor handles), in turn."""

    name = "replay"

    def __init__(self, path: Path, endpoints: Sequence[Any]) -> None:
        self.replay = ReplayBackend(path)
        self.model = self.replay.model
        self.endpoints = list(endpoints)
        self._turn = itertools.count(os.getpid())  # workers start their turns at different endpoints

    async def pace(self, tokens: int) -> None:
        endpoint = self.endpoints[next(self._turn) % len(self.endpoints)]
        await asyncio.wrap_future(endpoint.generate.remote(tokens).future())

    def for_episode(self, problem: Problem, sample_index: int) -> Backend:
        return _PacedEpisode(self.replay.for_episode(problem, sample_index), self)

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return self.replay.format_chat(messages)

    def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        return self.replay.stream(request)  # says to use for_episode


class _PacedEpisode(Backend):
    name = "replay"

    def __init__(self, recording: Backend, parent: PacedBackend) -> None:
        self.recording = recording
        self.parent = parent
        self.model = parent.model

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return self.parent.format_chat(messages)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        events = [event async for event in self.recording.stream(request)]  # the recording: instant
        await self.parent.pace(sum(e.completion_tokens for e in events if isinstance(e, Done)))
        for event in events:
            yield event


class SleepKernel:
    def __init__(self, cell_s: float) -> None:
        self.cell_s = cell_s

    async def execute(self, code: str, timeout: float | None = None) -> CellResult:
        await asyncio.sleep(self.cell_s)
        return CellResult(status="ok", stdout="simulated\n", duration_s=self.cell_s)

    @property
    def info(self) -> Mapping[str, Any]:
        return {"simulated": True}


class SleepKernels:
    """A kernel source of `SleepKernel`s (starts nothing)."""

    def __init__(self, cell_s: float) -> None:
        self.cell_s = cell_s

    async def start(self) -> None:
        return None

    async def acquire(self) -> SleepKernel:
        return SleepKernel(self.cell_s)

    async def release(self, kernel: SleepKernel) -> None:
        return None

    async def close(self) -> None:
        return None
