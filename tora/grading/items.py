"""Grading whole records: tora trajectories and ToRA's released rows.

The prediction depends on the grader: `tora-compat` reproduces ToRA's figures
and so uses ToRA's extraction on the full completion; `math-verify` uses tora's
structural extraction (or the engine's recorded `final_answer`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from tora.grading.api import DEFAULT_GRADER, DEFAULT_TIMEOUT, GradeResult, check_grader, grade_many
from tora.grading.extract import extract_answer
from tora.grading.tora_compat import tora_extract
from tora.record.schema import Trajectory
from tora.released import ReleasedItem


class Prediction(BaseModel):
    answer: str | None
    extracted_by: str | None


class ItemGrade(BaseModel):
    """One graded completion: what was compared and the verdict."""

    id: str
    sample_index: int = 0
    pred: str | None
    ref: str | None
    extracted_by: str | None
    result: GradeResult
    released_pred: str | None = None  # ToRA's own `pred`, for released rows


def predict(completion: str, grader: str) -> Prediction:
    """The answer a grader reads from a completion."""
    if check_grader(grader) == "tora-compat":
        answer, rule = tora_extract(completion)
        return Prediction(answer=answer or None, extracted_by=rule)
    found = extract_answer(completion)
    return Prediction(answer=found.raw, extracted_by=found.rule)


def trajectory_prediction(trajectory: Trajectory, grader: str) -> Prediction:
    if check_grader(grader) == "math-verify" and trajectory.result.final_answer:
        # The engine already read the answer structurally; keep its reading.
        return Prediction(
            answer=trajectory.result.final_answer, extracted_by=trajectory.result.extracted_by or "boxed"
        )
    return predict(trajectory.completion(), grader)


def grade_trajectories(
    trajectories: Sequence[Trajectory], grader: str = DEFAULT_GRADER, timeout: float = DEFAULT_TIMEOUT
) -> list[ItemGrade]:
    preds = [trajectory_prediction(t, grader) for t in trajectories]
    results = grade_many([(p.answer, t.problem.answer) for p, t in zip(preds, trajectories, strict=True)], grader, timeout)
    return [
        ItemGrade(
            id=t.problem.id,
            sample_index=t.sample_index,
            pred=p.answer,
            ref=t.problem.answer,
            extracted_by=p.extracted_by,
            result=r,
        )
        for t, p, r in zip(trajectories, preds, results, strict=True)
    ]


def grade_trajectory(trajectory: Trajectory, grader: str = DEFAULT_GRADER, timeout: float = DEFAULT_TIMEOUT) -> ItemGrade:
    """Grade one trajectory; the caller copies `pred`, `extracted_by` and `result` into its record.

    Blocking (it may wait on a worker process): call it from a thread in async code.
    """
    return grade_trajectories([trajectory], grader, timeout)[0]


def with_grade(trajectory: Trajectory, graded: ItemGrade) -> Trajectory:
    """A copy of `trajectory` whose `result` carries the verdict (correct, grader, grade_status).

    `final_answer` is left alone: it is the engine's reading of the answer,
    while `graded.pred` may come from ToRA's looser extraction.
    """
    update = {"correct": graded.result.equal, "grader": graded.result.grader, "grade_status": graded.result.status}
    return trajectory.model_copy(update={"result": trajectory.result.model_copy(update=update)})


def grade_released(
    items: Sequence[ReleasedItem], grader: str = DEFAULT_GRADER, timeout: float = DEFAULT_TIMEOUT
) -> list[ItemGrade]:
    """Grade every completion of ToRA-format rows against their `gt`."""
    rows: list[tuple[ReleasedItem, int, Prediction]] = [
        (item, k, predict(completion, grader)) for item in items for k, completion in enumerate(item.code)
    ]
    results = grade_many([(p.answer, item.gt) for item, _, p in rows], grader, timeout)
    return [
        ItemGrade(
            id=str(item.idx),
            sample_index=k,
            pred=p.answer,
            ref=item.gt,
            extracted_by=p.extracted_by,
            result=r,
            released_pred=None if k >= len(item.pred) or item.pred[k] is None else str(item.pred[k]),
        )
        for (item, k, p), r in zip(rows, results, strict=True)
    ]
