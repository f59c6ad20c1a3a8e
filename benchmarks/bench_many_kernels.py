"""Many live pool kernels in one runtime: provisioning, a cell in each at once, memory, teardown.

    .venv/bin/python benchmarks/bench_many_kernels.py [--kernels 1000] [--max-starting 4]

A pool kernel is two processes (its pid namespace's init and the kernel)
sharing most pages with the zygote; this prints what N of them cost: PSS per
kernel, the runtime's RSS and open files, and how long starting, one cell in
each (all at once) and tearing down take. It refuses to start more kernels
than the free memory holds (override with --force).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paced import pss_mb

from sandbox import KernelPool, SandboxPolicy

# Measured here: ~16 MB PSS per pool kernel; ask for some headroom.
ESTIMATE_MB = 20


async def main(n: int, max_starting: int) -> None:
    me = psutil.Process()
    async with KernelPool(SandboxPolicy(), size=max_starting, max_starting=max_starting) as pool:
        t = time.perf_counter()
        kernels = await asyncio.gather(*(pool.acquire() for _ in range(n)))
        dt = time.perf_counter() - t
        print(
            f"{n} live pool kernels provisioned in {dt:.1f} s: {n / dt:.1f} kernels/s (max_starting={max_starting})"
        )
        t = time.perf_counter()
        results = await asyncio.gather(*(k.execute(f"print({i})") for i, k in enumerate(kernels)))
        dt = time.perf_counter() - t
        wrong = sum(r.stdout != f"{i}\n" for i, r in enumerate(results))
        print(f"one cell in each, all at once: {dt:.2f} s ({wrong} wrong results)")
        total = 0.0
        for k in kernels:
            init = psutil.Process(k.info["pid"])
            total += sum(pss_mb(p.pid) for p in [init, *init.children(recursive=True)])
        print(
            f"kernels: {total:.0f} MB PSS in all, {total / n:.1f} MB per kernel;"
            f" runtime: RSS {me.memory_info().rss / 2**20:.0f} MB, {me.num_fds()} open files"
        )
        t = time.perf_counter()
        await asyncio.gather(*(pool.release(k) for k in kernels))
    print(
        f"released and reaped (pool closed) in {time.perf_counter() - t:.1f} s; load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=int, default=1000)
    ap.add_argument("--max-starting", type=int, default=4)
    ap.add_argument("--force", action="store_true", help="start them even if free memory looks too small")
    args = ap.parse_args()
    free_mb = psutil.virtual_memory().available / 2**20
    if args.kernels * ESTIMATE_MB > 0.8 * free_mb and not args.force:
        sys.exit(
            f"{args.kernels} kernels need ~{args.kernels * ESTIMATE_MB} MB; {free_mb:.0f} MB are free."
            " Use fewer --kernels, or --force."
        )
    asyncio.run(main(args.kernels, args.max_starting))
