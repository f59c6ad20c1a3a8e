"""`tora correct`'s continuations: prefix state by re-running the cells per continuation vs one
shared kernel forked per continuation (tora.prefix_kernels), side by side in one run.

    .venv/bin/python benchmarks/bench_prefix_kernels.py [--parents 6] [--repeat 3] [--concurrency 4]

Each parent has three cells and seven prefixes (0, 1, 1, 2, 2, 3 and 3 cells); a replayed
teacher continues each with one cell. Two workloads: trivial cells, and a first cell that
computes for ~0.2 s of CPU. Both drivers run the same Episodes through the same Scheduler and
kernel pool; the only difference is `prefix_states`. Printed: wall time of each (median of
--repeat, alternating), the ratio, how the continuations' kernels were made, and the load.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paced import load_average, write_released

from sandbox import KernelPool, SandboxPolicy
from tora.backends.replay import ReplayBackend
from tora.correction import cut_points, prefix_of
from tora.engine import Episode, KernelSource, Limits, SolveConfig
from tora.events import Finished
from tora.prefix_kernels import PrefixKernels
from tora.prompts import load_prompt
from tora.record import Problem, Trajectory
from tora.scheduler import Capacity, Job, Scheduler

HEAVY = "s = sum(i * i for i in range(3_000_000))\n"


def parent_text(i: int, heavy: bool) -> str:
    return (f"Start {i}.\n```python\nimport random\n{HEAVY if heavy else ''}x = random.randint(1, 9)\n"
            "print(x > 0)\n```\n```output\nTrue\n```\n"
            "Next.\n```python\ny = x * 2\nprint(y > 0)\n```\n```output\nTrue\n```\n"
            "More.\n```python\nz = y + 1\nprint(z > 0)\n```\n```output\nTrue\n```\nAnd.\nSo $\\boxed{6}$.")


TEACHER = "Check.\n```python\nprint(z - z)\n```\n```output\n0\n```\nSo $\\boxed{12}$."


async def make_parents(pool: KernelPool, folder: Path, n: int, heavy: bool) -> list[Trajectory]:
    rows = [(f"p{i}", f"What is p{i}?", parent_text(i, heavy)) for i in range(n)]
    backend = ReplayBackend(write_released(folder / f"parents-{heavy}.jsonl", rows))
    parents = []
    for pid, question, _ in rows:
        episode = Episode(Problem(id=pid, text=question, answer="12"), backend=backend,
                          template=load_prompt("tora-gsm8k"), kernels=pool)
        events = [e async for e in episode.run()]
        assert isinstance(events[-1], Finished)
        parents.append(events[-1].trajectory)
    return parents


async def continue_all(pool: KernelPool, parents: list[Trajectory], teacher: ReplayBackend, shared: bool,
                       concurrency: int) -> tuple[float, Counter[str]]:
    stems = PrefixKernels(pool) if shared else None
    config = SolveConfig(limits=Limits(timeout_s=10))

    def make(job: Job, kernels: KernelSource[object]) -> Episode:
        return Episode(job.problem, backend=teacher, template=load_prompt("tora-gsm8k"), kernels=kernels,
                       config=job.config, origin="teacher_corrected", prefix=job.prefix, prefix_states=stems)

    jobs = []
    for parent in parents:
        prefixes = [prefix_of(parent, n) for n in cut_points(parent)]
        if stems is not None:
            stems.expect(parent.id, parent.steps, 10, [len(p.cells) for p in prefixes])
        jobs += [Job(parent.problem, 0, config, "teacher_corrected", p) for p in prefixes]
    scheduler = Scheduler(make, pool, grader=None, capacity=Capacity(in_flight=concurrency, kernels=concurrency))
    t0 = time.perf_counter()
    made: Counter[str] = Counter()
    async for result in scheduler.run(jobs):
        t = result.trajectory
        assert t.result.finish == "answered" and t.steps[-2].stdout in ("0\n", ""), t.steps[-2]  # type: ignore[union-attr]
        made[t.kernel_state.method if t.kernel_state else "fresh"] += 1
    wall = time.perf_counter() - t0
    if stems is not None:
        await stems.aclose()
    await scheduler.aclose()
    return wall, made


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parents", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    print(f"load average before: {load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher_rows = [(f"p{i}", f"What is p{i}?", TEACHER) for i in range(args.parents)]
        teacher = ReplayBackend(write_released(folder / "teacher.jsonl", teacher_rows))
        async with KernelPool(SandboxPolicy(timeout_s=10), size=args.concurrency) as pool:
            for heavy in (False, True):
                parents = await make_parents(pool, folder, args.parents, heavy)
                walls: dict[bool, list[float]] = {False: [], True: []}
                made: dict[bool, Counter[str]] = {}
                for _ in range(args.repeat):
                    for shared in (False, True):
                        wall, made[shared] = await continue_all(pool, parents, teacher, shared, args.concurrency)
                        walls[shared].append(wall)
                rerun, forked = statistics.median(walls[False]), statistics.median(walls[True])
                n = sum(made[True].values())
                print(f"{'0.2 s first cell' if heavy else 'trivial cells'}: {n} continuations of {args.parents} "
                      f"parents: re-run {rerun:.2f} s, shared + fork {forked:.2f} s, ratio {rerun / forked:.2f}x "
                      f"(kernels: {dict(made[True])})")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    asyncio.run(main())
