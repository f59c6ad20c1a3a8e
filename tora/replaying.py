"""Re-execute the code cells of recorded trajectories and compare outputs.

Unlike the replay *backend* (which feeds the model's text back through the
loop), this checks the recorded execution results themselves: each recorded
cell runs again, in order, in a fresh kernel per trajectory (state kept
between its cells unless the record ran each block alone), and the new
output is set against the recorded one.

- tora records: each code step; the new result is rendered with the policy
  the record names and compared exactly with `ExecutionStep.rendered`.
- ToRA's released format: in each completion, the block run before each
  ```output block (the same choice the loop makes); the new result is
  rendered the ToRA way and compared, stripped, with the recorded block text.

No I/O beyond reading the file: `replay_jobs` yields reports, the CLI prints.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tora import fences
from tora.concurrency import bounded_as_completed
from tora.engine import KernelSource
from tora.jsonl import file_format
from tora.record.schema import CodeStep, ExecutionStep, Trajectory
from tora.record.writer import read_trajectories
from tora.released import read_released
from tora.render import CellLike, get_renderer

DEFAULT_TIMEOUT_S = 10.0
CellVerdict = Literal["same", "differ", "error"]


@dataclass(frozen=True)
class Cell:
    index: int  # 0-based position among the trajectory's executed cells
    code: str
    recorded: str
    render_policy: str


@dataclass(frozen=True)
class Job:
    """One recorded trajectory's cells, to run in order in one kernel."""

    id: str
    sample_index: int
    cells: list[Cell]
    fresh_namespace: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    strip: bool = False  # released outputs are compared stripped (ToRA stripped them)


@dataclass(frozen=True)
class CellReport:
    id: str
    sample_index: int
    index: int
    verdict: CellVerdict
    recorded: str
    new: str
    status: str  # the new execution's status, or "infra" when it could not run

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "sample_index": self.sample_index, "cell": self.index, "verdict": self.verdict,
                "status": self.status, "recorded": self.recorded, "new": self.new}


@dataclass
class Summary:
    trajectories: int = 0
    cells: int = 0
    same: int = 0
    differ: int = 0
    errors: int = 0
    wall_s: float = 0.0
    differences: list[CellReport] = field(default_factory=list)

    def add(self, reports: Sequence[CellReport]) -> None:
        self.trajectories += 1
        for r in reports:
            self.cells += 1
            if r.verdict == "same":
                self.same += 1
            elif r.verdict == "differ":
                self.differ += 1
                self.differences.append(r)
            else:
                self.errors += 1
                self.differences.append(r)

    def as_dict(self) -> dict[str, Any]:
        return {"trajectories": self.trajectories, "cells": self.cells, "same": self.same, "differ": self.differ,
                "errors": self.errors, "wall_s": round(self.wall_s, 3),
                "differences": [d.as_dict() for d in self.differences]}


# --- reading -------------------------------------------------------------------


def released_cells(completion: str) -> list[Cell]:
    """The (code, recorded output) pairs of one ToRA-format completion."""
    cells: list[Cell] = []
    pos = 0
    for block in fences.blocks(completion):
        if block.lang != "output":
            continue
        code = fences.code_to_run(completion[pos : block.start], True)
        pos = block.end
        if code is not None:  # an output block with no code before it: nothing was run
            cells.append(Cell(len(cells), code, block.content, "tora-compat"))
    return cells


def trajectory_cells(t: Trajectory) -> list[Cell]:
    cells: list[Cell] = []
    pending: CodeStep | None = None
    for step in t.steps:
        if isinstance(step, CodeStep):
            pending = step
        elif isinstance(step, ExecutionStep) and pending is not None:
            cells.append(Cell(len(cells), pending.content, step.rendered, step.render_policy))
            pending = None
    return cells


def _record_timeout(t: Trajectory) -> float | None:
    limits = t.runtime.kernel.get("limits")
    value = limits.get("timeout_s") if isinstance(limits, dict) else None
    return float(value) if isinstance(value, int | float) else None


def load_jobs(path: Path, *, timeout_s: float | None = None, fresh_namespace: bool | None = None,
              limit: int | None = None) -> list[Job]:
    """Jobs for the first `limit` records of a tora or ToRA-format file.

    `timeout_s` defaults to each record's own cell limit (else 10 s);
    `fresh_namespace` defaults to what the record did (stateful for ToRA rows).
    """
    path = Path(path)
    jobs: list[Job] = []
    if _is_tora_file(path):
        for t in read_trajectories(path):
            if limit is not None and len(jobs) >= limit:
                break
            jobs.append(Job(
                t.problem.id, t.sample_index, trajectory_cells(t),
                fresh_namespace=t.runtime.fresh_namespace if fresh_namespace is None else fresh_namespace,
                timeout_s=timeout_s or _record_timeout(t) or DEFAULT_TIMEOUT_S,
            ))
        return jobs
    for item in read_released(path):
        if limit is not None and len(jobs) >= limit:
            break
        for k, completion in enumerate(item.code):
            jobs.append(Job(str(item.idx), k, released_cells(completion), fresh_namespace=bool(fresh_namespace),
                            timeout_s=timeout_s or DEFAULT_TIMEOUT_S, strip=True))
    return jobs


def _is_tora_file(path: Path) -> bool:
    return file_format(path).format == "trajectories"


# --- running ---------------------------------------------------------------------


def compare(job: Job, cell: Cell, result: CellLike) -> CellReport:
    new = get_renderer(cell.render_policy)(result, job.timeout_s)
    recorded = cell.recorded
    if job.strip:
        new, recorded = new.strip(), recorded.strip()
    verdict: CellVerdict = "same" if new == recorded else "differ"
    return CellReport(job.id, job.sample_index, cell.index, verdict, recorded, new, result.status)


async def run_job(job: Job, kernels: KernelSource[Any]) -> list[CellReport]:
    """Run one trajectory's cells in order; a cell that cannot run at all is an `error`, and so are the rest."""
    reports: list[CellReport] = []
    kernel: Any = None
    try:
        for cell in job.cells:
            try:
                if kernel is None:
                    kernel = await kernels.acquire()
                result = await kernel.execute(cell.code, timeout=job.timeout_s)
            except Exception as exc:  # infrastructure (kernel start, sandbox), not the cell's own error
                note = f"{type(exc).__name__}: {exc}"
                reports += [CellReport(job.id, job.sample_index, c.index, "error", c.recorded, note, "infra")
                            for c in job.cells[cell.index :]]
                break
            reports.append(compare(job, cell, result))
            if job.fresh_namespace:
                await kernels.release(kernel)
                kernel = None
    finally:
        if kernel is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(kernels.release(kernel))
    return reports


async def replay_jobs(jobs: Sequence[Job], kernels: KernelSource[Any],
                      concurrency: int = 4) -> AsyncGenerator[tuple[Job, list[CellReport]], None]:
    """Yield (job, its cell reports) as each trajectory finishes; at most `concurrency` kernels at once."""

    async def one(job: Job) -> tuple[Job, list[CellReport]]:
        return job, await run_job(job, kernels)

    async with contextlib.aclosing(bounded_as_completed(jobs, one, concurrency)) as results:
        async for got in results:
            yield got
