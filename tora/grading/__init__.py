"""Answer extraction and grading.

- `extract.extract_answer`: tora's structural extraction (boxed, "the answer
  is", last output, last number) and `normalize_answer`;
- `grade` / `grade_many`: compare predictions with references using
  `math-verify` (default) or `tora-compat` (reproduces ToRA's figures);
- `grade_trajectory` / `grade_trajectories` / `grade_released`: whole records.
"""

from tora.grading.api import (
    DEFAULT_GRADER,
    DEFAULT_TIMEOUT,
    GRADERS,
    GradeResult,
    GraderName,
    check_grader,
    grade,
    grade_many,
    shutdown,
)
from tora.grading.extract import Extraction, extract_answer, normalize_answer
from tora.grading.items import (
    ItemGrade,
    Prediction,
    grade_released,
    grade_trajectories,
    grade_trajectory,
    predict,
    with_grade,
)
from tora.grading.verdict import GradeStatus, Verdict

__all__ = [
    "DEFAULT_GRADER",
    "DEFAULT_TIMEOUT",
    "GRADERS",
    "Extraction",
    "GradeResult",
    "GradeStatus",
    "GraderName",
    "ItemGrade",
    "Prediction",
    "Verdict",
    "check_grader",
    "extract_answer",
    "grade",
    "grade_many",
    "grade_released",
    "grade_trajectories",
    "grade_trajectory",
    "normalize_answer",
    "predict",
    "shutdown",
    "with_grade",
]
