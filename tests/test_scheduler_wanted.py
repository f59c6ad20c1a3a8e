"""The scheduler's lazy, withdrawable feed: a job no longer wanted when its slot comes
up is dropped unrun, even if it was already drawn from the feed."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from conftest import write_released

from tora.backends.replay import ReplayBackend
from tora.engine import Episode, KernelSource
from tora.kernels import FreshKernels, SandboxPolicy
from tora.prompts import load_prompt
from tora.record import Problem
from tora.scheduler import Capacity, Job, Scheduler


async def test_jobs_of_a_withdrawn_problem_are_skipped_when_their_slot_comes_up(tmp_path: Path) -> None:
    samples = 6
    path = write_released(tmp_path / "r.jsonl", [
        {"idx": pid, "question": f"Q {pid}?", "code": [f"No code: $\\boxed{{{k}}}$" for k in range(samples)]}
        for pid in ("a", "b")])
    backend = ReplayBackend(path)
    template = load_prompt("tora-gsm8k")

    def make(job: Job, kernels: KernelSource[Any]) -> Episode:
        return Episode(job.problem, backend=backend, template=template, kernels=kernels, sample_index=job.sample_index)

    scheduler = Scheduler(make, FreshKernels(SandboxPolicy()), grader=None, capacity=Capacity(in_flight=1))
    drawn: list[tuple[str, int]] = []
    closed: set[str] = set()

    def feed() -> Any:
        for pid in ("a", "b"):
            for k in range(samples):
                drawn.append((pid, k))
                yield Job(Problem(id=pid, text=f"Q {pid}?"), k)

    ran: list[tuple[str, int]] = []
    async with contextlib.aclosing(scheduler.run(feed(), wanted=lambda j: j.problem.id not in closed)) as results:
        async for result in results:
            ran.append(result.pair)
            if result.pair == ("a", 1):
                closed.add("a")  # "a" is full: its remaining samples must not run
    await scheduler.aclose()
    assert ran[:2] == [("a", 0), ("a", 1)]
    assert [p for p in ran if p[0] == "a"] == [("a", 0), ("a", 1)]
    assert sorted(p for p in ran if p[0] == "b") == [("b", k) for k in range(samples)]
    # Jobs of "a" had been drawn (the window runs ahead of the slots) and were withdrawn, not run.
    assert len([p for p in drawn if p[0] == "a"]) > 2
    assert scheduler.stats.skipped == samples - 2 and scheduler.stats.started == samples + 2
