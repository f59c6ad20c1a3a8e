"""Thousands of trajectories in flight on one event loop: throughput, kernels, memory, lag.

    .venv/bin/python benchmarks/bench_scale.py [--jobs 6000] [--in-flight 2000] [--kernels 8]
                                               [--per-token-ms 20] [--code-share 0.05] [--grader math-verify]

A paced replay model (every sequence streams at --per-token-ms, as a batching
server serves many sequences at once) feeds `--jobs` trajectories through
tora's scheduler with `--in-flight` of them running at once; `--code-share`
of them run one real cell, in at most `--kernels` live sandboxed kernels (a
small limit: not thousands of kernels on two cores). Everything is graded.

Printed: trajectories/s, tokens/s, peak trajectories in flight, peak live
kernels, memory per trajectory in flight (resident set growth at the peak
over the trajectories then in flight), and the event loop's lag (how late a
10 ms timer fires: p50, p99, max), with the machine's load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paced import LoopMonitor, PacedReplay, load_average, rss_mb, write_released

from sandbox import KernelPool, SandboxPolicy
from tora.engine import Episode, KernelSource, Limits, SolveConfig
from tora.prompts import load_prompt
from tora.record import Problem
from tora.scheduler import Capacity, Job, Scheduler


def workload(n: int, code_share: float, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    vocab = ["first", "we", "add", "the", "two", "numbers", "and", "then", "halve", "it", "which", "gives"]
    rows = []
    for i in range(n):
        talk = " ".join(rng.choice(vocab) for _ in range(rng.randint(30, 70)))
        if rng.random() < code_share:
            body = f"{talk}\n```python\nprint({i} + 1)\n```\n```output\n{i + 1}\n```\nSo $\\boxed{{{i + 1}}}$."
        else:
            body = f"{talk} So $\\boxed{{{i + 1}}}$."
        rows.append((f"s{i}", f"Scale problem {i}?", body))
    return rows


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = workload(args.jobs, args.code_share, args.seed)
    backend = PacedReplay(write_released(tmp / "w.jsonl", rows), args.per_token_ms / 1000)
    problems = [Problem(id=pid, text=q, answer=str(i + 1)) for i, (pid, q, _) in enumerate(rows)]
    template = load_prompt("tora-gsm8k")
    config = SolveConfig(limits=Limits(timeout_s=10))
    pool = KernelPool(SandboxPolicy(timeout_s=10), size=args.kernels)

    def make(job: Job, kernels: KernelSource[object]) -> Episode:
        return Episode(job.problem, backend=backend, template=template, kernels=kernels, config=config)

    grader = None if args.grader == "none" else args.grader
    scheduler = Scheduler(make, pool, grader=grader,
                          capacity=Capacity(in_flight=args.in_flight, kernels=args.kernels, graders=args.graders))
    await pool.start()
    peak = {"in_flight": 0, "rss": 0.0, "rss_at_peak_in_flight": 0.0}

    def sample() -> None:
        rss = rss_mb()
        peak["rss"] = max(peak["rss"], rss)
        if scheduler.in_flight >= peak["in_flight"]:
            peak["in_flight"] = scheduler.in_flight
            peak["rss_at_peak_in_flight"] = max(peak["rss_at_peak_in_flight"], rss)

    await asyncio.sleep(1.0)  # let the pool fill before the baseline
    baseline = rss_mb()
    monitor = LoopMonitor()
    monitor.start(sample)
    tokens = correct = errors = 0
    t0 = time.monotonic()
    async with contextlib.aclosing(scheduler.run(Job(p) for p in problems)) as results:
        async for result in results:
            tokens += result.trajectory.stats.completion_tokens
            correct += result.correct
            errors += result.trajectory.result.finish == "error"
    wall = time.monotonic() - t0
    await monitor.stop()
    await scheduler.aclose()
    await pool.close()
    per_traj_kb = 1024 * (peak["rss_at_peak_in_flight"] - baseline) / max(1, peak["in_flight"])
    print(f"{args.jobs} trajectories, {args.in_flight} in flight, {args.kernels} live kernels at most, "
          f"{args.per_token_ms:g} ms/token, {100 * args.code_share:g} % with a cell, grader {args.grader}")
    print(f"wall {wall:.1f} s   {args.jobs / wall:.1f} trajectories/s   {tokens / wall:.0f} tokens/s   "
          f"correct {correct}/{args.jobs}   errors {errors}")
    print(f"peak in flight {peak['in_flight']}   peak live kernels {scheduler.kernels.peak}   "
          f"grading batches {scheduler.grading.batches if scheduler.grading else 0}")
    print(f"memory: baseline {baseline:.0f} MB, at peak in flight {peak['rss_at_peak_in_flight']:.0f} MB, "
          f"{per_traj_kb:.1f} KB per trajectory in flight")
    print(f"event-loop lag: {monitor.summary()}")
    print(load_average())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=6000)
    ap.add_argument("--in-flight", type=int, default=2000)
    ap.add_argument("--kernels", type=int, default=8)
    ap.add_argument("--graders", type=int, default=2)
    ap.add_argument("--per-token-ms", type=float, default=20.0)
    ap.add_argument("--code-share", type=float, default=0.05)
    ap.add_argument("--grader", default="math-verify", help="math-verify, tora-compat or none")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(load_average(), flush=True)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
