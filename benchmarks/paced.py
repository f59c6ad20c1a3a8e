"""Helpers for the scheduling benchmarks: a replay model that takes time per token, and
the load figures (event-loop lag, memory) a run is measured by. Not a benchmark itself."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path

from tora.backends.base import Backend, Delta, GenerationRequest, StreamEvent
from tora.backends.replay import ReplayBackend, ReplayEpisode
from tora.record import Problem


class PacedReplay(ReplayBackend):
    """A replay that streams like a served model: `per_token_s` between tokens, every
    request independent of the others (a batching server's view of one sequence)."""

    def __init__(self, path: Path, per_token_s: float) -> None:
        super().__init__(path)
        self.per_token_s = per_token_s
        self.name = "replay"

    def for_episode(self, problem: Problem, sample_index: int) -> Backend:
        return PacedEpisode(self, self.recording(problem, sample_index), self.per_token_s)


class PacedEpisode(ReplayEpisode):
    def __init__(self, parent: ReplayBackend, recording: str, per_token_s: float) -> None:
        super().__init__(parent, recording)
        self.per_token_s = per_token_s

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        async for event in super().stream(request):
            if isinstance(event, Delta):
                await asyncio.sleep(self.per_token_s)
            yield event


def write_released(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """(id, question, completion) rows in ToRA's released format, which replay reads."""
    with path.open("w") as f:
        for pid, question, completion in rows:
            f.write(json.dumps({"idx": pid, "question": question, "code": [completion]}) + "\n")
    return path


def pss_mb(pid: int) -> float:
    """A process's proportional share of memory (pages shared with the zygote split among the sharers)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class LoopMonitor:
    """Event-loop lag (how late a 10 ms sleep wakes) and whatever else is sampled with it."""

    every_s: float = 0.01
    lags: list[float] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self, sample: object = None) -> None:
        self._task = asyncio.create_task(self._run(sample))

    async def _run(self, sample: object) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.every_s)
            self.lags.append(loop.time() - t - self.every_s)
            if callable(sample):
                sample()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def p(self, q: float) -> float:
        if not self.lags:
            return 0.0
        ordered = sorted(self.lags)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> str:
        if not self.lags:
            return "no samples"
        return (f"p50 {1000 * statistics.median(self.lags):.1f} ms, p99 {1000 * self.p(0.99):.1f} ms, "
                f"max {1000 * max(self.lags):.1f} ms")


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} on {os.cpu_count()} cores"


def elapsed(t0: float) -> float:
    return time.monotonic() - t0
