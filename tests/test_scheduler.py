"""The scheduler against the real kernel pool, with the replay backend as the model."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from conftest import write_released

from sandbox import KernelPool, SandboxPolicy
from tora.backends.replay import ReplayBackend
from tora.engine import Episode, KernelSource, Limits, SolveConfig
from tora.prompts import load_prompt
from tora.record import Problem
from tora.scheduler import Capacity, Graded, Job, Scheduler

pytestmark = pytest.mark.asyncio(loop_scope="module")


def says(n: int, sleep: float = 0.0) -> str:
    pause = f"import time; time.sleep({sleep})\n" if sleep else ""
    return f"```python\n{pause}print({n})\n```\n```output\n{n}\n```\nSo $\\boxed{{{n}}}$."


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def pool() -> AsyncIterator[KernelPool]:
    async with KernelPool(SandboxPolicy(timeout_s=10), size=2) as p:
        yield p


class Counting:
    """A kernel source that records the most kernels out at once."""

    def __init__(self, source: KernelSource[Any]) -> None:
        self.source = source
        self.out = 0
        self.peak = 0
        self.total = 0

    async def acquire(self) -> Any:
        kernel = await self.source.acquire()
        self.out += 1
        self.total += 1
        self.peak = max(self.peak, self.out)
        return kernel

    async def release(self, kernel: Any) -> None:
        self.out -= 1
        await self.source.release(kernel)


def scheduler(tmp_path: Path, rows: list[dict[str, Any]], kernels: KernelSource[Any], capacity: Capacity,
              grader: str | None = "math-verify") -> Scheduler:
    backend = ReplayBackend(write_released(tmp_path / "rec.jsonl", rows))
    template = load_prompt("tora-gsm8k")

    def make(job: Job, source: KernelSource[Any]) -> Episode:
        return Episode(job.problem, backend=backend, template=template, kernels=source, config=job.config,
                       sample_index=job.sample_index)

    return Scheduler(make, kernels, grader=grader, capacity=capacity)


def job(pid: str, answer: str = "1") -> Job:
    return Job(Problem(id=pid, text=f"Q {pid}?", answer=answer), 0, SolveConfig(limits=Limits(timeout_s=10)))


async def collect(s: Scheduler, jobs: list[Job]) -> list[Graded]:
    out = []
    async with contextlib.aclosing(s.run(jobs)) as results:
        async for r in results:
            out.append(r)
    await s.aclose()
    return out


async def test_limits_hold_and_every_job_is_graded(tmp_path: Path, pool: KernelPool) -> None:
    rows = [{"idx": f"p{i}", "question": f"Q p{i}?", "code": [says(i, 0.3)]} for i in range(8)]
    counting = Counting(pool)
    s = scheduler(tmp_path, rows, counting, Capacity(in_flight=4, kernels=2, graders=2))
    results = await collect(s, [job(f"p{i}", str(i if i % 2 else i + 1)) for i in range(8)])
    assert sorted(r.trajectory.problem.id for r in results) == [f"p{i}" for i in range(8)]
    assert {r.trajectory.problem.id for r in results if r.correct} == {f"p{i}" for i in range(8) if i % 2}
    assert counting.peak == 2 and counting.out == 0 and s.kernels.peak == 2
    assert all(r.trajectory.result.grader == "math-verify" for r in results)


async def test_a_trajectory_without_code_never_takes_a_kernel(tmp_path: Path, pool: KernelPool) -> None:
    rows = [{"idx": "a", "question": "Q a?", "code": ["Just $\\boxed{1}$."]},
            {"idx": "b", "question": "Q b?", "code": [says(1)]}]
    counting = Counting(pool)
    results = await collect(scheduler(tmp_path, rows, counting, Capacity(2, 2, 1)), [job("a"), job("b")])
    assert {r.trajectory.problem.id: r.trajectory.stats.tool_calls for r in results} == {"a": 0, "b": 1}
    assert counting.total == 1


async def test_one_failing_item_never_aborts_the_batch(tmp_path: Path, pool: KernelPool) -> None:
    rows = [{"idx": "ok", "question": "Q ok?", "code": [says(1)]}]
    results = await collect(scheduler(tmp_path, rows, pool, Capacity(2, 2, 1)), [job("missing"), job("ok")])
    by_id = {r.trajectory.problem.id: r.trajectory for r in results}
    assert by_id["ok"].result.finish == "answered" and by_id["ok"].result.correct is True
    failed = by_id["missing"].result
    assert failed.finish == "error" and failed.error is not None and failed.error.kind == "backend"
    assert "no recorded trajectory" in failed.error.message


async def test_grading_goes_in_batches(tmp_path: Path, pool: KernelPool) -> None:
    rows = [{"idx": f"p{i}", "question": f"Q p{i}?", "code": [f"$\\boxed{{{i}}}$"]} for i in range(40)]
    s = scheduler(tmp_path, rows, pool, Capacity(in_flight=40, kernels=1, graders=2))
    results = await collect(s, [job(f"p{i}", str(i)) for i in range(40)])
    assert len(results) == 40 and all(r.correct for r in results)
    assert s.grading is not None and s.grading.batches < 40  # answers that finished together went together


async def test_closing_the_run_cancels_what_runs_and_frees_every_kernel(tmp_path: Path, pool: KernelPool) -> None:
    rows = [{"idx": f"p{i}", "question": f"Q p{i}?", "code": [says(i, 30)]} for i in range(4)]
    counting = Counting(pool)
    s = scheduler(tmp_path, rows, counting, Capacity(in_flight=4, kernels=4, graders=1), grader=None)
    stream = s.run([job(f"p{i}") for i in range(4)])
    task = asyncio.ensure_future(stream.__anext__())
    for _ in range(200):
        if counting.out == 4:
            break
        await asyncio.sleep(0.05)
    assert counting.out == 4  # all four are running their 30 s cells
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await stream.aclose()
    assert counting.out == 0 and s.in_flight == 0
