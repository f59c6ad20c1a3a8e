"""Kernel fork (`KernelPool.fork`) against re-running the same cells in a fresh kernel, side by side.

    python benchmarks/bench_fork.py [--forks 40] [--json out.json]

A source kernel runs a 4-cell prefix (numpy and sympy imported, a few names, a
function, a file written in the work dir). Then, one at a time and with the
pool's background refills settled before each (a steady state: a warm kernel
is ready, as in a service that is not saturated):

1. fork: `await pool.fork(source)` (the new kernel is checked once, then released);
2. re-run: `pool.acquire()` and the 4 cells run in it, the alternative a fork saves;
3. the floor: a `print(1+1)` round trip on a live kernel, and a pool acquire.

Prints p50/p99 of each, the re-run/fork ratio (issue 20's goal: fork <= 10 ms
p50 and >= 10x faster than re-running the prefix), and where a fork's time goes
(each kernel round trip and acquire inside it, by the first line of its cell).
The machine is usually shared: say so with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from sandbox import Kernel, KernelPool, SandboxPolicy

PREFIX = [
    "import numpy as np\nimport sympy as sp",
    "x = sp.symbols('x')\nroots = sp.solve(x**3 - 6*x**2 + 11*x - 6, x)\na = np.arange(1000)\ns = int((a ** 2).sum())",
    "def weight(n):\n    return sum(sp.factorint(n).values())\ntable = {int(r): weight(s + int(r)) for r in roots}",
    "open('notes.txt', 'w').write(str(table))\nprint(len(table), s)",
]
CHECK = "print(len(table), s, weight(12), open('notes.txt').read() == str(table))"


def cpu(kernel: Kernel | None = None) -> float:
    """CPU seconds of a kernel's processes (its init and everything under it), or of this process.

    From each thread's schedstat (nanoseconds; psutil's figures are in 10 ms ticks)."""
    if kernel is None:
        return time.process_time()
    total = 0
    try:
        root = psutil.Process(kernel.info["pid"])
        for p in [root, *root.children(recursive=True)]:
            for task in Path(f"/proc/{p.pid}/task").iterdir():
                total += int((task / "schedstat").read_text().split()[0])
    except (psutil.Error, OSError):
        pass
    return total / 1e9


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def ms(values: list[float]) -> str:
    return f"p50 {pct(values, 0.5) * 1000:7.2f} ms  p99 {pct(values, 0.99) * 1000:7.2f} ms"


class Stages:
    """Each Kernel.execute and KernelPool.acquire while recording, by the first line of its cell."""

    def __init__(self) -> None:
        self.on = False
        self.times: dict[str, list[float]] = defaultdict(list)
        execute, acquire = Kernel.execute, KernelPool.acquire
        stages = self

        async def timed(label: str, work: Awaitable[Any]) -> Any:
            t0 = time.perf_counter()
            try:
                return await work
            finally:
                if stages.on:
                    stages.times[label].append(time.perf_counter() - t0)

        async def timed_execute(self: Kernel, code: str, *args: Any, **kwargs: Any) -> Any:
            first = next((line for line in code.splitlines() if line.strip() and not line.startswith("#")), "")
            return await timed("execute " + first[:48], execute(self, code, *args, **kwargs))

        async def timed_acquire(self: KernelPool, *args: Any, **kwargs: Any) -> Any:
            return await timed("pool.acquire", acquire(self, *args, **kwargs))

        Kernel.execute = timed_execute  # type: ignore[method-assign]
        KernelPool.acquire = timed_acquire  # type: ignore[method-assign]


async def settle(pool: KernelPool) -> None:
    """Until the pool's refills are done (a fork or acquire finds a ready kernel, and no start competes)."""
    while pool.starting or pool.ready < pool.size:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


async def timed_loop(
    n: int,
    pool: KernelPool,
    once: Callable[[], Awaitable[Kernel]],
    source: Kernel | None = None,
    before: Callable[[], Awaitable[Any]] | None = None,
) -> tuple[list[float], list[tuple[float, float, float]]]:
    """Wall seconds of each ``once()``, and the CPU seconds it cost: (this process's, the
    source kernel's, the new kernel's: all it used, its start included)."""
    wall: list[float] = []
    used: list[tuple[float, float, float]] = []
    for _ in range(n):
        if before is not None:
            await before()
        await settle(pool)
        # This process's CPU is read last before and first after: reading a kernel's costs some.
        k0 = cpu(source) if source else 0.0
        r0 = cpu()
        t0 = time.perf_counter()
        kernel = await once()
        wall.append(time.perf_counter() - t0)
        r1 = cpu()
        used.append((r1 - r0, (cpu(source) if source else 0.0) - k0, cpu(kernel)))
        await pool.release(kernel)
    return wall, used


async def run(forks: int) -> dict[str, Any]:
    stages = Stages()
    out: dict[str, Any] = {}
    async with KernelPool(SandboxPolicy(), size=2) as pool:
        source = await pool.acquire()
        for cell in PREFIX:
            r = await source.execute(cell)
            assert r.status == "ok", r
        expected = (await source.execute(CHECK)).stdout

        async def fork() -> Kernel:
            kernel, forked = await pool.fork(source)
            out["method"] = forked.method
            return kernel

        async def recorded_fork() -> Kernel:
            stages.on = True
            try:
                return await fork()
            finally:
                stages.on = False

        async def touch() -> None:
            # Any cell: the source's state may have changed, so the next fork takes a snapshot.
            await source.execute("pass")

        # Warm-up, and a check that the copy is whole.
        new, forked = await pool.fork(source)
        got = (await new.execute(CHECK)).stdout
        assert forked.method == "snapshot" and got == expected, (forked, got, expected)
        await pool.release(new)
        out["fork"], fork_cpu = await timed_loop(forks, pool, recorded_fork, source, before=touch)
        out["stages"] = dict(stages.times)
        # Forks in a row of a source that ran nothing in between (a GRPO group, curate --samples K).
        out["fork_again"], again_cpu = await timed_loop(forks, pool, fork, source)

        async def rerun() -> Kernel:
            kernel = await pool.acquire()
            for cell in PREFIX:
                await kernel.execute(cell)
            return kernel

        out["rerun"], rerun_cpu = await timed_loop(forks, pool, rerun)

        async def acquire() -> Kernel:
            return await pool.acquire()

        out["acquire"], acquire_cpu = await timed_loop(forks, pool, acquire)
        trip_s, trip_cpu = [], []
        for _ in range(max(forks, 100)):
            k0 = cpu(source)
            r0 = cpu()
            t0 = time.perf_counter()
            await source.execute("print(1+1)")
            trip_s.append(time.perf_counter() - t0)
            r1 = cpu()
            trip_cpu.append((r1 - r0, cpu(source) - k0))
        await pool.release(source)
    # A fresh kernel's own start, counted in the CPU of each fork and re-run, is taken out.
    start = pct([sum(c) for c in acquire_cpu], 0.5)
    out.update({
        "round_trip": trip_s,
        "round_trip_cpu_runtime": [c[0] for c in trip_cpu],
        "round_trip_cpu_kernel": [c[1] for c in trip_cpu],
        "fork_cpu": [sum(c) - start for c in fork_cpu],
        "fork_cpu_runtime": [c[0] for c in fork_cpu],
        "fork_cpu_source": [c[1] for c in fork_cpu],
        "fork_cpu_new": [c[2] - start for c in fork_cpu],
        "fork_again_cpu": [sum(c) - start for c in again_cpu],
        "rerun_cpu": [sum(c) - start for c in rerun_cpu],
        "start_cpu": [sum(c) for c in acquire_cpu],
    })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forks", type=int, default=40)
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()
    out = asyncio.run(run(args.forks))
    rerun = pct(out["rerun"], 0.5)
    print(f"fork ({out['method']}, n={args.forks}, the source ran a cell since its last fork): {ms(out['fork'])}  "
          f"re-run/fork {rerun / pct(out['fork'], 0.5):.1f}x")
    print(f"fork again (the source ran nothing since its last fork):  {ms(out['fork_again'])}  "
          f"re-run/fork {rerun / pct(out['fork_again'], 0.5):.1f}x")
    print(f"re-run the 4 cells in a fresh kernel:  {ms(out['rerun'])}")
    print("goals: fork p50 <= 10 ms, re-run/fork >= 10x")
    print(f"CPU (this process + both kernels; a kernel's start, p50 {pct(out['start_cpu'], 0.5) * 1000:.1f} ms, "
          f"taken out): fork {ms(out['fork_cpu'])}; fork again {ms(out['fork_again_cpu'])}; "
          f"re-run {ms(out['rerun_cpu'])}")
    print(f"  a fork's CPU: this process {ms(out['fork_cpu_runtime'])}; source kernel {ms(out['fork_cpu_source'])}; "
          f"new kernel {ms(out['fork_cpu_new'])}")
    print(f"floor: pool.acquire {ms(out['acquire'])}; print(1+1) round trip {ms(out['round_trip'])}, "
          f"CPU: this process {ms(out['round_trip_cpu_runtime'])}, kernel {ms(out['round_trip_cpu_kernel'])}")
    print("inside a fork (the source ran a cell since its last):")
    for label, values in out["stages"].items():
        print(f"  {label:<58} {ms(values)}  (x{len(values) / args.forks:g} per fork)")
    if args.json:
        summary: dict[str, Any] = {k: {"p50_ms": pct(v, 0.5) * 1000, "p99_ms": pct(v, 0.99) * 1000}
                                   for k, v in out.items() if isinstance(v, list)}
        summary["stages"] = {k: {"p50_ms": pct(v, 0.5) * 1000, "p99_ms": pct(v, 0.99) * 1000}
                             for k, v in out["stages"].items()}
        args.json.write_text(json.dumps({"method": out["method"], "forks": args.forks, **summary}, indent=1))


if __name__ == "__main__":
    main()
