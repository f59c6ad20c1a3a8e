"""The figures a report shows, from the records alone.

Accuracy (overall, per type and level), finish reasons and grade statuses
come from `tora.metrics.compute_metrics`, the function `tora eval` writes
metrics.json with, so the report and metrics.json cannot disagree on the
same records. The rest is counted here: tool calls per trajectory, cell
statuses, exception names (ename), trajectory error kinds, and the grading
problems: trajectories left ungraded (`correct` null: unparsed, timeout) and,
when every grader is run (`compare_graders`), those the graders disagree on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tora.export.view import error_view
from tora.metrics import compute_metrics
from tora.record import ExecutionStep, Problem, Trajectory
from tora.scheduler import Graded


@dataclass(frozen=True)
class Verdict:
    grader: str
    correct: bool | None
    status: str
    pred: str | None


@dataclass
class Summary:
    metrics: dict[str, Any]
    tool_calls: Counter[int]
    cell_status: Counter[str]
    enames: Counter[str]
    error_kinds: Counter[str]
    ungraded: list[int]  # indexes of trajectories with correct null
    graders: list[str]
    verdicts: dict[int, list[Verdict]] = field(default_factory=dict)  # every grader's, when compared
    disagreements: list[int] = field(default_factory=list)


def _executions(t: Trajectory) -> list[ExecutionStep]:
    return [s for s in t.steps if isinstance(s, ExecutionStep)]


def verdict_label(correct: bool | None, status: str | None) -> str:
    if correct is None:
        return status or "ungraded"
    return "correct" if correct else "wrong"


def summarize(records: Sequence[Trajectory], *, compare_graders: bool = False) -> Summary:
    problems: dict[str, Problem] = {}
    for t in records:
        problems.setdefault(t.problem.id, t.problem)
    samples = max((t.sample_index for t in records), default=0) + 1
    graders = sorted({t.result.grader for t in records if t.result.grader})
    graded = [Graded(t, t.result.final_answer, t.result.extracted_by) for t in records]
    metrics = compute_metrics(graded, list(problems.values()), samples=samples, grader=", ".join(graders) or "none")
    cells = [c for t in records for c in _executions(t)]
    errors = (error_view(t) for t in records)
    summary = Summary(
        metrics=metrics,
        tool_calls=Counter(len(_executions(t)) for t in records),
        cell_status=Counter(c.status for c in cells),
        enames=Counter(c.error.ename for c in cells if c.error is not None),
        error_kinds=Counter((e.kind or "unclassified") for e in errors if e is not None),
        ungraded=[i for i, t in enumerate(records) if t.result.correct is None],
        graders=graders,
    )
    if compare_graders and records:
        _compare(records, summary)
    return summary


def _compare(records: Sequence[Trajectory], summary: Summary) -> None:
    from tora.grading import GRADERS, grade_trajectories

    per_grader: dict[str, list[Verdict]] = {}
    for grader in GRADERS:
        items = grade_trajectories(list(records), grader)
        per_grader[grader] = [Verdict(grader, i.result.equal, i.result.status, i.pred) for i in items]
    for i in range(len(records)):
        verdicts = [per_grader[g][i] for g in GRADERS]
        summary.verdicts[i] = verdicts
        if len({v.correct for v in verdicts}) > 1:
            summary.disagreements.append(i)
    summary.graders = list(GRADERS)
