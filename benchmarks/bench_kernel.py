"""Kernel figures: round trip, start time, fresh-kernel acquire, provisioning rate.

    .venv/bin/python benchmarks/bench_kernel.py [--rounds 300] [--provision 60]

Prints each figure and the ratios the sandbox issue asks for (round trip
sandboxed/plain goal <= 1.1x; acquire p50 goal <= 10 ms; >= 30 kernels/s).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import statistics
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox import Kernel, KernelPool, SandboxPolicy, start_kernel
from sandbox.tiers import check
from sandbox.zygote import ZygoteLauncher


def tree_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            c = p.cpu_times()
            total += c.user + c.system + c.children_user + c.children_system
        except psutil.Error:
            pass
    return total


class TreeCpu:
    """CPU time of this process and everything it starts, kernels included.

    Pool kernels are not our children (the zygote forks them, and they are
    reaped inside their pid namespaces), so rusage misses them. Where a cgroup
    v1 cpuacct hierarchy is writable (root), this process moves into a group of
    its own, which its descendants inherit. None where that is not possible.
    """

    ROOT = Path("/sys/fs/cgroup/cpuacct")

    def __init__(self) -> None:
        self.group: Path | None = None
        try:
            group = self.ROOT / f"tora-bench-{os.getpid()}"
            group.mkdir(exist_ok=True)
            (group / "cgroup.procs").write_text(str(os.getpid()))
            self.group = group
            atexit.register(self.close)
        except OSError:
            self.group = None

    def seconds(self) -> float | None:
        if self.group is None:
            return None
        return int((self.group / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        if self.group is None:
            return
        try:
            (self.ROOT / "cgroup.procs").write_text(str(os.getpid()))
            self.group.rmdir()
        except OSError:
            pass
        self.group = None


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


async def round_trips(k: Kernel, n: int) -> list[float]:
    for _ in range(20):
        await k.execute("print(1+1)")
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = await k.execute("print(1+1)")
        out.append(time.perf_counter() - t)
        assert r.stdout == "2\n", r
    return out


async def main(rounds: int, provision: int) -> None:
    tree = TreeCpu()
    report = check()
    print(f"tier: {report.tier}  (isolated: {report.isolated}, pids cgroup: {report.pids_cgroup})")

    # Round trip, interleaved so both see the same machine load.
    plain = await start_kernel(SandboxPolicy(isolation="none"))
    async with KernelPool(SandboxPolicy(), size=1) as pool:
        boxed = await pool.acquire()
        rt_plain: list[float] = []
        rt_boxed: list[float] = []
        for _ in range(5):
            rt_plain += await round_trips(plain, rounds // 5)
            rt_boxed += await round_trips(boxed, rounds // 5)
        await pool.release(boxed)
    await plain.shutdown()
    p50p, p50b = statistics.median(rt_plain), statistics.median(rt_boxed)
    print(f"round trip print(1+1) plain ipykernel : p50 {ms(p50p)}  p99 {ms(pct(rt_plain, 0.99))}")
    print(f"round trip print(1+1) sandboxed (pool): p50 {ms(p50b)}  p99 {ms(pct(rt_boxed, 0.99))}")
    print(f"round trip ratio sandboxed/plain p50: {p50b / p50p:.2f}x (goal <= 1.1x)")

    # Start times.
    for label, policy in (("cold plain", SandboxPolicy(isolation="none")), ("cold bwrap", SandboxPolicy())):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            k = await start_kernel(policy)
            times.append(time.perf_counter() - t)
            await k.shutdown()
        print(f"kernel start, {label:10s}: p50 {ms(statistics.median(times))}  max {ms(max(times))}")
    launcher = ZygoteLauncher(SandboxPolicy())
    t = time.perf_counter()
    first = await launcher.spawn()
    print(f"zygote start + first kernel: {ms(time.perf_counter() - t)}")
    await first.destroy()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        s = await launcher.spawn()
        times.append(time.perf_counter() - t)
        await s.destroy()
    print(f"kernel start, zygote fork (one at a time, to handshake): p50 {ms(statistics.median(times))}")

    # Provisioning rate: many kernels requested at once, each ready (handshake done).
    # CPU per kernel (runtime + zygote tree) is the load-independent figure:
    # 2 cores / CPU per kernel is the rate an otherwise idle machine reaches.
    zygote_pid = launcher.zygote_pid
    for batch in (provision,):
        z0, c0, g0 = tree_cpu(zygote_pid), time.process_time(), tree.seconds()
        t = time.perf_counter()
        spawned = await asyncio.gather(*(launcher.spawn() for _ in range(batch)))
        dt = time.perf_counter() - t
        await asyncio.gather(*(s.destroy() for s in spawned))
        g1 = tree.seconds()
        if g0 is not None and g1 is not None:
            cpu, what = g1 - g0, "whole tree: runtime, zygote, kernels, start to teardown"
        else:
            cpu, what = (tree_cpu(zygote_pid) - z0) + (time.process_time() - c0), "runtime + zygote side only"
        print(f"provisioned {batch} fresh sandboxed kernels in {dt:.2f} s: {batch / dt:.1f} kernels/s (goal >= 30)")
        print(
            f"CPU per fresh kernel: {cpu / batch * 1000:.1f} ms ({what});"
            f" {os.cpu_count()} idle cores would provision ~{(os.cpu_count() or 1) * batch / cpu:.0f}/s;"
            f" load average now {os.getloadavg()[0]:.1f}"
        )
    await launcher.close()

    # A fresh kernel always runs at least one cell, and a kernel's first cell costs more
    # than its later ones: CPU per kernel with its first cell, 8 at once through a pool
    # (as `tora eval` and bench_replay_cells use them), teardown included.
    async with KernelPool(SandboxPolicy(), size=8) as pool:
        while pool.ready < 8:
            await asyncio.sleep(0.05)
        g0, slots = tree.seconds(), asyncio.Semaphore(8)
        t = time.perf_counter()

        async def one() -> None:
            async with slots:
                k = await pool.acquire()
                try:
                    await k.execute("print(1+1)")
                finally:
                    await pool.release(k)

        await asyncio.gather(*(one() for _ in range(provision)))
        dt = time.perf_counter() - t
    g1 = tree.seconds()
    cpu_note = f"; CPU per kernel {(g1 - g0) / provision * 1000:.1f} ms" if g0 is not None and g1 is not None else ""
    print(f"{provision} fresh kernels with one print(1+1) each, 8 at once: {provision / dt:.1f} kernels/s{cpu_note}"
          f" (load average now {os.getloadavg()[0]:.1f})")

    # Acquire from a warm pool, the pool refilling in the background.
    async with KernelPool(SandboxPolicy(), size=8) as pool:
        while pool.ready < 8:
            await asyncio.sleep(0.05)
        acq: list[float] = []
        for _ in range(60):
            t = time.perf_counter()
            k = await pool.acquire()
            acq.append(time.perf_counter() - t)
            await k.execute("print(1)")
            await pool.release(k)
            await asyncio.sleep(0.05)  # a trajectory's model time, during which the pool refills
        print(f"fresh-kernel acquire (warm pool): p50 {ms(statistics.median(acq))}  p99 {ms(pct(acq, 0.99))}")
        t = time.perf_counter()
        burst = [await pool.acquire() for _ in range(40)]
        dt = time.perf_counter() - t
        print(f"40 acquires back to back (pool of 8 drained, then refilled on demand): {40 / dt:.1f} kernels/s")
        await asyncio.gather(*(pool.release(k) for k in burst))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--provision", type=int, default=60)
    args = ap.parse_args()
    asyncio.run(main(args.rounds, args.provision))
