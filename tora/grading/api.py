"""`grade` and `grade_many`: one entry point for both graders.

Plain numbers (most GSM8K-style answers) are decided in the calling process
with exact arithmetic, in the way each grader would decide them; everything
else goes to a shared worker pool where a hang costs one timeout, not the batch.
A result is never a silent False: a side that does not parse is `unparsed`, a
pair no exact or safe numeric comparison decides is `unsure`, a comparison out
of time is `timeout`, a crash is `error`; each has `equal=None` (see
`tora.grading.verdict`, and `tora.grading.exact` for what "exact" means).
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tora.grading.extract import is_plain_number, normalize_answer
from tora.grading.pool import ProcessPool
from tora.grading.tora_compat import quick_equal, tora_strip
from tora.grading.verdict import GRADE_STATUSES, GradeStatus, Verdict

GraderName = Literal["math-verify", "tora-compat"]
GRADERS: tuple[GraderName, ...] = ("math-verify", "tora-compat")
DEFAULT_GRADER: GraderName = "math-verify"
DEFAULT_TIMEOUT = 5.0


class GradeResult(BaseModel):
    """The verdict on one (prediction, reference) pair."""

    model_config = ConfigDict(frozen=True)

    equal: bool | None
    status: GradeStatus
    grader: GraderName
    detail: str | None = None

    @property
    def correct(self) -> bool:
        return self.equal is True


def check_grader(name: str) -> GraderName:
    for grader in GRADERS:
        if name == grader:
            return grader
    raise ValueError(f"unknown grader {name!r}; choose one of: {', '.join(GRADERS)}")


# --- fast paths (in process, no sympy) ---------------------------------------


def _digits(s: str) -> int:
    return sum(ch.isdigit() for ch in s)


def _mv_fast(pred: str, ref: str) -> bool | None:
    """Math-Verify's verdict on two plain numbers, or None when only Math-Verify can tell.

    Math-Verify compares integers exactly, of any size, and, when a decimal
    is involved, to 6 places and a relative 1e-4 (`exact.decimals_match`):
    equal values are equal under either rule, and values 1e-6 or more apart
    are unequal under both. Closer pairs, and decimals beyond a float's 15
    digits, go to the real thing. A percentage `P\\%` reads as P and as P/100,
    and the pair is equal if any reading of one side equals one of the other.
    """
    preds, refs = _readings(pred), _readings(ref)
    if preds is None or refs is None:
        return None
    verdicts = {_compare(a, b) for a in preds for b in refs}
    if True in verdicts:
        return True
    return None if None in verdicts else False


def _readings(answer: str) -> list[tuple[Decimal, bool]] | None:
    """(value, is an integer) for each reading of a plain number (two for a percentage), else None."""
    normal = normalize_answer(answer)
    if not is_plain_number(normal):
        return None
    try:
        value = Decimal(normal)
    except InvalidOperation:
        return None
    integer = "." not in normal
    if not integer and _digits(normal) > 15:
        return None
    return [(value, integer), (value / 100, False)] if "%" in answer else [(value, integer)]


def _compare(a: tuple[Decimal, bool], b: tuple[Decimal, bool]) -> bool | None:
    (x, x_int), (y, y_int) = a, b
    if x == y:
        return True
    if (x_int and y_int) or abs(x - y) >= Decimal("1e-6"):
        return False
    return None


def _fast(grader: GraderName, pred: str, ref: str) -> GradeResult | None:
    if not pred.strip():
        # No answer is a wrong answer, not a parse failure.
        return GradeResult(equal=False, status="ok", grader=grader, detail="empty prediction")
    if not ref.strip():
        return GradeResult(equal=None, status="unparsed", grader=grader, detail="empty reference")
    verdict = _mv_fast(pred, ref) if grader == "math-verify" else quick_equal(pred, ref)
    if verdict is None:
        return None
    return GradeResult(equal=verdict, status="ok", grader=grader)


# --- the shared pool ---------------------------------------------------------

_pool: ProcessPool[tuple[str, str, str, float], Verdict] | None = None
_pool_lock = threading.Lock()
_workers: int | None = None  # None: min(4, cores)


def use_workers(n: int) -> None:
    """Size the shared grading pool (takes effect when it is next started)."""
    global _workers
    if n != _workers:
        shutdown()
        _workers = n


def _get_pool() -> ProcessPool[tuple[str, str, str, float], Verdict]:
    global _pool
    with _pool_lock:
        if _pool is None:
            from tora.grading.worker import run_task

            _pool = ProcessPool(run_task, _workers, preload=["tora.grading._preload"])
            atexit.register(shutdown)
        return _pool


def shutdown() -> None:
    """Stop the grading workers (also done at exit)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


# --- entry points ------------------------------------------------------------


def _prepare(grader: GraderName, pred: str | None, ref: str | None) -> tuple[str, str]:
    pred, ref = (pred or "").strip(), (ref or "").strip()
    if grader == "tora-compat":
        # ToRA cleans predictions and ground truths alike before comparing.
        return tora_strip(pred), tora_strip(ref)
    return pred, ref


def grade_many(
    pairs: Sequence[tuple[str | None, str | None]],
    grader: str = DEFAULT_GRADER,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[GradeResult]:
    """Grade (prediction, reference) pairs; results in input order.

    `timeout` bounds each slow-path comparison; one that runs over is reported
    as `timeout` and does not delay the others beyond it.
    """
    name = check_grader(grader)
    results: list[GradeResult | None] = []
    slow: list[int] = []
    tasks: list[tuple[str, str, str, float]] = []
    # The worker's own deadline fires first; the pool's outer one is the backstop.
    inner = max(0.05, timeout * 0.8)
    for pred, ref in pairs:
        p, r = _prepare(name, pred, ref)
        fast = _fast(name, p, r)
        results.append(fast)
        if fast is None:
            slow.append(len(results) - 1)
            tasks.append((name, p, r, inner))
    if tasks:
        outcomes = _get_pool().map(tasks, timeout)
        for index, outcome in zip(slow, outcomes, strict=True):
            if outcome.status == "ok" and outcome.value is not None:
                equal, status, detail = outcome.value
                results[index] = GradeResult(equal=equal, status=status, grader=name, detail=detail)
            else:
                results[index] = GradeResult(equal=None, status=check_status(outcome.status), grader=name, detail=outcome.error)
    return [r for r in results if r is not None]


def check_status(status: str) -> GradeStatus:
    for known in GRADE_STATUSES:
        if status == known:
            return known
    return "error"


def grade(pred: str | None, ref: str | None, grader: str = DEFAULT_GRADER, timeout: float = DEFAULT_TIMEOUT) -> GradeResult:
    """Grade one prediction against one reference answer."""
    return grade_many([(pred, ref)], grader, timeout)[0]
