"""tora's scheduler against ToRA-style synchronous rounds, on one workload, side by side.

    .venv/bin/python benchmarks/bench_scheduling.py [--problems 24] [--per-token-ms 5] [--repeat 2]
                                                    [--embedded 4]

The workload: scripted trajectories of one to four code cells each, most
cells quick, one slow cell per trajectory at a random turn, and one cell
that runs into the time limit; model latency comes from a replay backend
that streams at a fixed time per token (a batching server's view: every
request proceeds on its own), with turns of 20 to 80 tokens.

Both drivers run the same `Episode`s through the same `Scheduler`, backend,
kernel pool and limits (in flight = kernels = problems). The synchronous
driver adds what ToRA's loop does: a barrier at the end of each phase, so
every trajectory waits for the slowest generation of the round before any
cell runs, and for the slowest cell before anyone generates again.

Printed: wall time of each, the ratio (goal >= 1.5x), and the distance of
tora's wall time to the critical-path bound (goal within 10 %): the longest
single trajectory's own work, its tokens times the pace plus its cells'
measured durations, which no scheduler can beat. `--embedded N` adds a small
real run, N GSM8K problems with the embedded model (one local llama.cpp model,
which generates for one trajectory at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paced import PacedReplay, load_average, write_released

from sandbox import KernelPool, SandboxPolicy
from tora.backends.base import Backend
from tora.engine import Episode, KernelLike, KernelSource, Limits, SolveConfig
from tora.events import Event
from tora.prompts import PromptTemplate, load_prompt
from tora.record import ExecutionStep, Problem, TextStep, Trajectory
from tora.render import CellLike
from tora.scheduler import Capacity, Job, Scheduler

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 3.0


# -- the workload ------------------------------------------------------------------------


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["let", "us", "count", "the", "apples", "then", "add", "them", "so", "we", "get"])
                    for _ in range(n))


def workload(n: int, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        cells = rng.randint(1, 4)
        slow_at = rng.randrange(cells)
        parts = []
        for c in range(cells):
            if i == 0 and c == 0:
                sleep = 60.0  # the one that times out
            elif c == slow_at:
                sleep = rng.uniform(0.6, 1.5)
            else:
                sleep = rng.uniform(0.0, 0.1)
            parts.append(f"{words(rng, rng.randint(20, 80))}\n```python\nimport time\ntime.sleep({sleep:.3f})\n"
                         f"print({i * 10 + c})\n```\n```output\n{i * 10 + c}\n```\n")
        parts.append(f"{words(rng, rng.randint(20, 80))} So $\\boxed{{{i}}}$.")
        rows.append((f"p{i}", f"Problem {i}?", "".join(parts)))
    return rows


# -- ToRA's synchronous rounds, as barriers around the same engine -------------------------


class Lockstep:
    """A phase barrier among the trajectories still running (a finished one leaves)."""

    def __init__(self, members: int) -> None:
        self.active = members
        self.arrived = 0
        self.phase = 0
        self.cond = asyncio.Condition()
        self.rounds = 0

    def _release_if_all(self) -> None:
        if self.active and self.arrived >= self.active:
            self.arrived = 0
            self.phase += 1
            self.rounds += 1
            self.cond.notify_all()

    async def sync(self) -> None:
        async with self.cond:
            phase = self.phase
            self.arrived += 1
            self._release_if_all()
            await self.cond.wait_for(lambda: self.phase != phase)

    async def leave(self) -> None:
        async with self.cond:
            self.active -= 1
            self._release_if_all()


class LockstepKernel:
    def __init__(self, kernel: KernelLike, step: Lockstep) -> None:
        self.kernel = kernel
        self.step = step

    @property
    def info(self) -> Mapping[str, Any]:
        return self.kernel.info

    async def execute(self, code: str, timeout: float | None = None) -> CellLike:
        await self.step.sync()  # every generation of the round has ended
        result = await self.kernel.execute(code, timeout=timeout)
        await self.step.sync()  # every cell of the round has ended
        return result


class LockstepKernels:
    def __init__(self, source: KernelSource[Any], step: Lockstep) -> None:
        self.source = source
        self.step = step

    async def acquire(self) -> LockstepKernel:
        return LockstepKernel(await self.source.acquire(), self.step)

    async def release(self, kernel: LockstepKernel) -> None:
        await self.source.release(kernel.kernel)


class LockstepEpisode(Episode):
    step: Lockstep

    async def run(self) -> AsyncGenerator[Event, None]:
        try:
            async for event in super().run():
                yield event
        finally:
            await self.step.leave()


# -- running one driver ----------------------------------------------------------------


async def warm(pool: KernelPool, n: int) -> None:
    await pool.start()
    deadline = time.monotonic() + 120
    while pool.ready < n and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def drive(mode: str, problems: list[Problem], backend: Backend, template: PromptTemplate, pool: KernelPool,
                config: SolveConfig) -> tuple[float, list[Trajectory], int]:
    n = len(problems)
    await warm(pool, n)
    step = Lockstep(n)
    kernels: KernelSource[Any] = LockstepKernels(pool, step) if mode == "sync" else pool

    def make(job: Job, source: KernelSource[Any]) -> Episode:
        cls = LockstepEpisode if mode == "sync" else Episode
        episode = cls(job.problem, backend=backend, template=template, kernels=source, config=config)
        if isinstance(episode, LockstepEpisode):
            episode.step = step
        return episode

    scheduler = Scheduler(make, kernels, grader=None, capacity=Capacity(in_flight=n, kernels=n))
    out: list[Trajectory] = []
    t0 = time.monotonic()
    async with contextlib.aclosing(scheduler.run(Job(p) for p in problems)) as results:
        async for result in results:
            out.append(result.trajectory)
    wall = time.monotonic() - t0
    await scheduler.aclose()
    return wall, out, step.rounds // 2


def own_work(t: Trajectory, per_token_s: float) -> float:
    """What one trajectory costs by itself: its tokens at the pace, plus its cells' measured time."""
    tokens = sum(s.completion_tokens for s in t.steps if isinstance(s, TextStep))
    cells = sum(s.duration_s for s in t.steps if isinstance(s, ExecutionStep))
    return tokens * per_token_s + cells


def breakdown(t: Trajectory, per_token_s: float) -> str:
    """Where the longest trajectory's time went: the gap between its pace and its measured
    generation is the event loop's timer slack on a loaded machine, not waiting on others."""
    text = [s for s in t.steps if isinstance(s, TextStep)]
    tokens = sum(s.completion_tokens for s in text)
    measured = sum(s.t_end - s.t_start for s in text)
    cells = sum(s.duration_s for s in t.steps if isinstance(s, ExecutionStep))
    return (f"{tokens} tokens = {tokens * per_token_s:.2f} s at the pace, generated in {measured:.2f} s; "
            f"cells {cells:.2f} s; wall {t.stats.wall_s:.2f} s")


async def paced(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-sched-"))
    rows = workload(args.problems, args.seed)
    backend = PacedReplay(write_released(tmp / "w.jsonl", rows), args.per_token_ms / 1000)
    problems = [Problem(id=pid, text=q) for pid, q, _ in rows]
    template = load_prompt("tora-gsm8k")
    config = SolveConfig(limits=Limits(timeout_s=TIMEOUT_S, max_tool_calls=4))
    pool = KernelPool(SandboxPolicy(timeout_s=TIMEOUT_S), size=args.problems)
    figures: dict[str, list[float]] = {"tora": [], "sync": [], "bound": []}
    try:
        for r in range(args.repeat):
            for mode in ("tora", "sync") if r % 2 == 0 else ("sync", "tora"):
                wall, trajectories, rounds = await drive(mode, problems, backend, template, pool, config)
                assert all(t.result.finish == "answered" for t in trajectories), [t.result for t in trajectories]
                figures[mode].append(wall)
                if mode == "tora":
                    critical = max(trajectories, key=lambda t: own_work(t, backend.per_token_s))
                    figures["bound"].append(own_work(critical, backend.per_token_s))
                    print(f"    critical trajectory {critical.problem.id}: {breakdown(critical, backend.per_token_s)}")
                extra = f", {rounds} rounds" if mode == "sync" else ""
                print(f"  run {r + 1} {mode:4}: {wall:6.2f} s{extra}", flush=True)
    finally:
        await pool.close()
    tora, sync, bound = (statistics.median(figures[k]) for k in ("tora", "sync", "bound"))
    return {"tora_s": tora, "sync_s": sync, "bound_s": bound, "ratio": sync / tora, "over_bound": tora / bound - 1,
            "runs": figures}


async def embedded(n: int) -> dict[str, Any]:
    from tora.backends.registry import load_backend

    rows = [json.loads(line) for line in (ROOT / "tests" / "data" / "released_gsm8k_head5.jsonl").read_text().splitlines()]
    problems = [Problem(id=str(r["idx"]), text=r["question"]) for r in rows[:n]]
    template = load_prompt("tora-gsm8k")
    backend = load_backend("embedded-tiny")
    backend.prepare(template.prefix)
    config = SolveConfig(limits=Limits(timeout_s=TIMEOUT_S, max_tokens=384, max_tool_calls=3))
    pool = KernelPool(SandboxPolicy(timeout_s=TIMEOUT_S), size=n)
    figures: dict[str, float] = {}
    cells: dict[str, int] = {}
    try:
        for mode in ("sync", "tora"):
            wall, trajectories, _ = await drive(mode, problems, backend, template, pool, config)
            figures[mode] = wall
            cells[mode] = sum(t.stats.tool_calls for t in trajectories)
            print(f"  embedded {mode:4}: {wall:6.2f} s, {cells[mode]} cells", flush=True)
    finally:
        await pool.close()
        await backend.aclose()
    return {"tora_s": figures["tora"], "sync_s": figures["sync"], "ratio": figures["sync"] / figures["tora"],
            "cells": cells}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--per-token-ms", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embedded", type=int, default=0, help="Also run N problems with the embedded model.")
    args = ap.parse_args()
    print(f"scheduling: {args.problems} trajectories, {args.per_token_ms:g} ms/token, cell limit {TIMEOUT_S:g} s; "
          f"{load_average()}", flush=True)
    p = asyncio.run(paced(args))
    print(f"paced replay  tora {p['tora_s']:.2f} s   sync rounds {p['sync_s']:.2f} s   "
          f"ratio {p['ratio']:.2f}x (goal >= 1.5x)")
    print(f"critical path {p['bound_s']:.2f} s   tora over it {100 * p['over_bound']:.1f} % (goal <= 10 %)")
    if args.embedded:
        e = asyncio.run(embedded(args.embedded))
        print(f"embedded      tora {e['tora_s']:.2f} s   sync rounds {e['sync_s']:.2f} s   ratio {e['ratio']:.2f}x")
    print(f"{load_average()}")


if __name__ == "__main__":
    main()
