"""Both graders on tricky pairs, the numeric fast path, timeouts and the worker pool."""

from __future__ import annotations

import math
import os
import time
from decimal import Decimal

import pytest

from tora.grading import GRADERS, grade, grade_many
from tora.grading.api import _mv_fast
from tora.grading.math_verify import mv_equal
from tora.grading.pool import ProcessPool

# Equal under both graders.
EQUAL = [
    ("0.5", "\\frac{1}{2}"),
    ("\\frac12", "0.5"),
    ("\\dfrac{1}{2}", "\\frac12"),
    ("\\$18.00", "18"),
    ("10\\text{ cm}", "10"),
    ("1,000", "1000"),
    ("30^\\circ", "30"),
    ("50\\%", "50"),
    ("(1, 2)", "(1,2)"),
    ("[1,2)", "[1, 2)"),
    ("(-\\infty, 3]", "(-\\infty,3]"),
    ("\\pi", "\\pi"),
    ("2\\pi", "\\pi \\cdot 2"),
    ("x = 5", "5"),
    ("y=2x+1", "y=1+2x"),
    ("(x-1)(x+1)", "x^2-1"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt2}"),
    ("\\frac{1}{3}", "0.333333"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
]

# Must not be equal under either grader.
NOT_EQUAL = [
    ("0.33", "\\frac13"),
    ("(1,2)", "[1,2]"),  # open and closed intervals
    ("(1,2)", "(2,1)"),
    ("(1,3)", "(1,2)"),
    ("2", "3"),
    ("-18", "18"),
    ("5", "50"),
    ("\\pi", "3.14"),
    ("\\sqrt{2}", "1.414"),
    ("90^\\circ", "\\frac{\\pi}{2}"),  # degrees are not radians
    ("5 km", "5000"),
    ("x+1", "x-1"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}"),
]

# Where the graders differ by design: ToRA's percentage variants and 1e-4 tolerance.
TORA_ONLY = [
    ("0.5", "50"),  # 50% written as a fraction
    ("50", "0.5"),
    ("18.00009", "18"),
    ("3.14159", "\\pi"),
    ("\\frac{1}{3}", "0.3333"),
]


@pytest.mark.parametrize("grader", GRADERS)
def test_equal_pairs(grader: str) -> None:
    results = grade_many(EQUAL, grader)
    wrong = [(pair, r) for pair, r in zip(EQUAL, results, strict=True) if r.equal is not True]
    assert not wrong


@pytest.mark.parametrize("grader", GRADERS)
def test_unequal_pairs(grader: str) -> None:
    results = grade_many(NOT_EQUAL, grader)
    wrong = [(pair, r) for pair, r in zip(NOT_EQUAL, results, strict=True) if (r.equal, r.status) != (False, "ok")]
    assert not wrong


def test_graders_differ_where_documented() -> None:
    tora = grade_many(TORA_ONLY, "tora-compat")
    mv = grade_many(TORA_ONLY, "math-verify")
    assert [r.equal for r in tora] == [True] * len(TORA_ONLY)
    assert [r.equal for r in mv] == [False] * len(TORA_ONLY)
    # ToRA's clean-up keeps plain unit words; tora's normalisation drops them.
    assert grade("18 dollars", "18", "math-verify").equal is True
    assert grade("18 dollars", "18", "tora-compat").equal is False


def test_result_records_grader_and_order() -> None:
    pairs = [("1", "1"), ("2", "3"), ("\\frac{1}{2}", "0.5"), ("7", "7")]
    for grader in GRADERS:
        results = grade_many(pairs, grader)
        assert [r.equal for r in results] == [True, False, True, True]
        assert {r.grader for r in results} == {grader}


def test_empty_prediction_and_reference() -> None:
    for grader in GRADERS:
        empty = grade(None, "5", grader)
        assert (empty.equal, empty.status, empty.detail) == (False, "ok", "empty prediction")
        no_ref = grade("5", "", grader)
        assert (no_ref.equal, no_ref.status) == (None, "unparsed")


def test_unparsable_prediction_is_reported() -> None:
    r = grade("\\frac{", "5", "math-verify")
    assert (r.equal, r.status) == (None, "unparsed")


def test_unknown_grader() -> None:
    with pytest.raises(ValueError, match="unknown grader"):
        grade("1", "1", "sympy")


@pytest.mark.parametrize("grader", GRADERS)
def test_timeout_is_reported_and_does_not_stall_the_batch(grader: str) -> None:
    pathological = "9^{9^{9^{9}}}"  # sympy tries to build the integer
    pairs = [("1", "1"), (pathological, "5"), ("\\frac{1}{2}", "0.5"), (pathological, "7"), ("(1,2)", "(1,2)")]
    grade_many([("\\frac{1}{3}", "x"), ("(1,3)", "(1,2)")], grader)  # start the workers: not what is timed
    start = time.monotonic()
    results = grade_many(pairs, grader, timeout=1.0)
    elapsed = time.monotonic() - start
    assert [r.status for r in results] == ["ok", "timeout", "ok", "timeout", "ok"]
    assert [r.equal for r in results] == [True, None, True, None, True]
    assert elapsed < 6.0


# --- the numeric fast path must agree with Math-Verify itself ------------------

NUMERIC = [
    ("18", "18"),
    ("18.0", "18"),
    ("18.5", "18.50"),
    ("2,125", "2125"),
    ("1,000,000", "1000000"),
    ("0.1", "0.10000001"),  # within Math-Verify's 6-place rounding: not decided in process
    ("0.1", "0.1001"),
    ("-3", "3"),
    ("7", "7.000001"),
    ("123456789", "123456788"),
    ("0.05", "5"),
    ("1.25", "1.2500000"),
]


@pytest.mark.parametrize(("pred", "ref"), NUMERIC)
def test_fast_path_agrees_with_math_verify(pred: str, ref: str) -> None:
    fast = _mv_fast(pred, ref)
    slow, status, _ = mv_equal(pred, ref)
    assert status == "ok"
    if fast is not None:
        assert fast == slow
    close = abs(Decimal(pred.replace(",", "")) - Decimal(ref.replace(",", ""))) < Decimal("1e-6")
    assert (fast is None) == (close and Decimal(pred.replace(",", "")) != Decimal(ref.replace(",", "")))


def test_numeric_batch_is_fast() -> None:
    pairs = [(str(i), str(i + (i % 3 == 0))) for i in range(3000)]
    for grader in GRADERS:
        start = time.monotonic()
        results = grade_many(pairs, grader)
        rate = len(pairs) / (time.monotonic() - start)
        assert sum(r.correct for r in results) == 2000
        assert rate > 500, f"{grader}: {rate:.0f} grades/s"


# --- the pool itself -------------------------------------------------------------


def test_pool_kills_a_hung_worker_and_goes_on() -> None:
    with ProcessPool(time.sleep, workers=2) as pool:
        pool.map([0.0, 0.0], timeout=60)  # start the workers: not what is timed
        start = time.monotonic()
        out = pool.map([0.01, 60.0, 0.01, 0.01, 60.0, 0.01], timeout=0.5)
        elapsed = time.monotonic() - start
        assert [o.status for o in out] == ["ok", "timeout", "ok", "ok", "timeout", "ok"]
        assert elapsed < 5.0
        assert pool.replaced == 2
        assert [o.status for o in pool.map([0.01, 0.01], timeout=5)] == ["ok", "ok"]


def test_pool_reports_errors_and_dead_workers() -> None:
    with ProcessPool(math.sqrt, workers=1) as pool:
        out = pool.map([4.0, -1.0, 9.0], timeout=5)
        assert [(o.status, o.value) for o in out] == [("ok", 2.0), ("error", None), ("ok", 3.0)]
        assert out[1].error is not None and "ValueError" in out[1].error
    with ProcessPool(os._exit, workers=1) as pool:
        died = pool.map([3], timeout=5)[0]
        assert died.status == "error" and died.error is not None and "worker died" in died.error
