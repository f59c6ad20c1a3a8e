"""Evaluation runs: the work still to do, what an earlier run finished, re-grading.

The running itself is `tora.scheduler`'s; this module holds what batch
verbs (`tora eval`, `tora curate`) need around it, with no I/O beyond
reading records.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tora.grading import DEFAULT_TIMEOUT, grade_trajectories
from tora.grading.items import trajectory_prediction
from tora.record import Problem, Trajectory, read_trajectories
from tora.scheduler import Graded, graded

Pair = tuple[str, int]  # (problem id, sample index): the unit of work and of resume


def work_list(problems: Sequence[Problem], samples: int, done: Iterable[Pair] = ()) -> list[tuple[Problem, int]]:
    """Every (problem, sample) pair not already done, problem-major so early results span few problems."""
    skip = set(done)
    return [(p, k) for p in problems for k in range(samples) if (p.id, k) not in skip]


# --- resume ------------------------------------------------------------------


def load_finished(path: Path) -> dict[Pair, Trajectory]:
    """Valid records of an earlier run, last one per pair wins.

    A torn last line (kill -9 mid-write) is skipped, not deleted: the writer
    starts the next record on a fresh line. Interrupted trajectories do not
    count as done, so a resumed run redoes them.
    """
    if not path.is_file():
        return {}
    found: dict[Pair, Trajectory] = {}
    for t in read_trajectories(path, skip_invalid=True):
        if t.result.finish != "interrupted":
            found[(t.problem.id, t.sample_index)] = t
    return found


def regrade(trajectories: Sequence[Trajectory], grader: str, timeout: float = DEFAULT_TIMEOUT) -> list[Graded]:
    """Graded views of recorded trajectories; a recorded verdict by the same grader is kept as is."""
    out: list[Graded | None] = []
    todo: list[int] = []
    for t in trajectories:
        if t.result.grader == grader and t.result.grade_status is not None:
            p = trajectory_prediction(t, grader)  # cheap: extraction only, no comparison
            out.append(Graded(t, p.answer, p.extracted_by))
        else:
            todo.append(len(out))
            out.append(None)
    if todo:
        items = grade_trajectories([trajectories[i] for i in todo], grader, timeout)
        for i, item in zip(todo, items, strict=True):
            out[i] = graded(trajectories[i], item)
    return [g for g in out if g is not None]
