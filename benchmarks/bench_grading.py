"""Grading throughput: grades per second on ToRA-Code-34B's 1319 GSM8K predictions.

For each grader: extraction rate, grading rate on the numeric predictions
(fast path, in process), the same through the worker pool (the slow path that
non-numeric answers take), MATH-500 references through the pool, and a batch
salted with pathological inputs, time-boxed, to show it does not stall.

    .venv/bin/python benchmarks/bench_grading.py [--timeout 2]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from tora.data import load_problems
from tora.grading import GRADERS, api, grade_many, predict, shutdown
from tora.grading.worker import run_task
from tora.released import read_released

ROOT = Path(__file__).resolve().parents[1]
RELEASED = ROOT.parent / "shared/data/released/tora-code-34b-v1.0/gsm8k/test_tora_-1_seed0_t0.0_s0_e1319.jsonl"

PATHOLOGICAL = [
    "9^{9^{9^{9}}}",
    "10^{10^{10^{10}}}",
    "(x+1)^{100000}",
    "x" * 5000,
    "\\sqrt{" * 500 + "2" + "}" * 500,
    "\\frac{" * 300 + "1" + "}" * 300,
]


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s ({n} in {seconds:.2f} s)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout", type=float, default=2.0, help="per-item timeout for the pathological batch")
    args = parser.parse_args()

    items = list(read_released(RELEASED))
    print(f"data: {RELEASED.name}, {len(items)} rows")
    for grader in GRADERS:
        start = time.perf_counter()
        preds = [predict(item.code[0], grader).answer for item in items]
        print(f"[{grader}] extraction: {rate(len(items), time.perf_counter() - start)}")
        pairs = [(p, item.gt) for p, item in zip(preds, items, strict=True)]

        shutdown()  # cold: any pool start-up is counted
        start = time.perf_counter()
        results = grade_many(pairs, grader)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        results = grade_many(pairs, grader)
        warm = time.perf_counter() - start
        correct = sum(r.correct for r in results)
        print(f"[{grader}] grade_many, cold: {rate(len(pairs), cold)}")
        print(f"[{grader}] grade_many, warm: {rate(len(pairs), warm)}  accuracy {correct}/{len(pairs)} = {100 * correct / len(pairs):.1f}")

        # Every item through the pool, as a non-numeric answer would go.
        from tora.grading.api import _get_pool

        tasks = [(grader, p or "", r or "", 4.0) for p, r in pairs]
        pool = _get_pool()
        start = time.perf_counter()
        outcomes = pool.map(tasks, timeout=5.0)
        print(f"[{grader}] worker pool, every item: {rate(len(tasks), time.perf_counter() - start)} "
              f"statuses {dict(Counter(o.status for o in outcomes))}")

        start = time.perf_counter()
        for task in tasks[:200]:
            run_task(task)
        print(f"[{grader}] one process, no pool, full comparison: {rate(200, time.perf_counter() - start)}")

    math500 = [(p.answer, p.answer) for p in load_problems("math500")]
    for grader in GRADERS:
        start = time.perf_counter()
        results = grade_many(math500, grader)
        print(f"[{grader}] MATH-500 references against themselves: {rate(len(math500), time.perf_counter() - start)} "
              f"{dict(Counter(r.status for r in results))}")

    def pool_replacements() -> int:
        """Workers killed and replaced (timeouts, crashes) so far: the pool's own count."""
        return api._pool.replaced if api._pool is not None else 0

    for grader in GRADERS:
        normal = [(str(i), str(i)) for i in range(200)] + [("\\frac{1}{2}", "0.5"), ("(1,2)", "(1,2)")] * 20
        batch = [(p, "5") for p in PATHOLOGICAL] + normal
        before = pool_replacements()
        start = time.perf_counter()
        results = grade_many(batch, grader, timeout=args.timeout)
        elapsed = time.perf_counter() - start
        statuses = Counter(r.status for r in results[: len(PATHOLOGICAL)])
        normal_ok = sum(r.correct for r in results[len(PATHOLOGICAL) :])
        print(
            f"[{grader}] {len(PATHOLOGICAL)} pathological + {len(normal)} normal, timeout {args.timeout:g} s: "
            f"{elapsed:.2f} s; pathological {dict(statuses)}; normal correct {normal_ok}/{len(normal)}; "
            f"workers replaced {pool_replacements() - before}"
        )
    shutdown()


if __name__ == "__main__":
    main()
