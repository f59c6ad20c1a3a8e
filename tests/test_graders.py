"""Both graders on tricky pairs (exactness above all), the numeric fast path, LaTeX parsing,
timeouts and the worker pool."""

from __future__ import annotations

import math
import os
import time

import pytest

from tora.grading import GRADERS, grade, grade_many
from tora.grading.api import _mv_fast
from tora.grading.math_verify import _parse, mv_equal
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


# Exactness: (pred, ref, math-verify's verdict, tora-compat's verdict); "unsure" is (None, "unsure").
# Exact values are equal only when proven: floating point cannot tell most of these apart.
FACT100 = str(math.factorial(100))
TRICKY = [
    # big integers, factorials
    ("100000000000000000001", "100000000000000000000", False, False),  # equal as floats
    ("123456", "123457", False, False),  # within ToRA's float tolerance (1e-4)
    ("10^{20}+1", "10^{20}", False, False),
    ("2^{100}", "1267650600228229401496703205376", True, True),
    ("2^{100}", "1267650600228229401496703205377", False, False),
    ("100!", FACT100, True, True),
    ("101!", FACT100, False, False),
    # tiny rationals
    ("\\frac{1}{100!}", "\\frac{1}{101!}", False, False),  # Math-Verify itself says equal
    ("-\\frac{1}{100!}", "\\frac{1}{100!}", False, False),
    ("\\frac{1}{10^{20}}", "\\frac{1}{10^{20}+1}", False, False),  # Math-Verify and ToRA say equal
    ("1+10^{-20}", "1", False, False),
    ("10^{-20}", "0", False, False),
    ("\\frac{2}{4}", "\\frac{1}{2}", True, True),
    # exact expressions equal only within 1e-9 (or far closer)
    ("\\frac{10^{10}+1}{10^{10}}", "1", False, False),
    ("\\sqrt{10^{18}+1}", "10^9", False, False),  # 5e-10 apart
    ("e^{\\pi\\sqrt{163}}", "640320^3+744", False, False),  # 7.5e-13 apart, relative 3e-30
    ("\\pi", "\\frac{355}{113}", False, False),
    # radicals and trigonometry equal exactly
    ("\\sqrt{8}", "2\\sqrt{2}", True, True),
    ("\\sqrt{2}+\\sqrt{3}", "\\sqrt{5+2\\sqrt{6}}", True, True),
    ("\\cos\\frac{\\pi}{5}", "\\frac{1+\\sqrt{5}}{4}", True, True),
    # equal (it is 1/2), equal to 50 digits, but sympy cannot prove it: neither grader guesses
    ("\\cos\\frac{\\pi}{7}+\\cos\\frac{3\\pi}{7}+\\cos\\frac{5\\pi}{7}", "\\frac{1}{2}", "unsure", "unsure"),
    # decimals are approximations: Math-Verify's 6 places (and relative 1e-4), ToRA's relative 1e-4
    ("1.0000000001", "1", True, True),
    ("\\frac{1}{3}", "0.3333333333", True, True),
    ("\\frac{1}{7}", "0.142857", True, True),
    ("\\frac{1}{7}", "0.1428", False, False),
    ("3.14159265358979", "\\pi", True, True),
    ("0.1+0.2", "0.3", True, True),
    ("0.0000001", "0", False, False),  # both round to 0 at 6 places
    ("0.0000001", "0.0000002", False, False),  # Math-Verify itself says equal
    ("0.0000001", "\\frac{1}{10^{8}}", False, False),
    ("0.0000001", "\\frac{1}{10^{7}}", True, True),
    # percentages
    ("50\\%", "0.5", True, True),
    ("50\\%", "50", True, True),
    ("5\\%", "0.5", False, False),
    ("12.5\\%", "\\frac{1}{8}", True, False),  # ToRA reads a percentage only against a plain number
    # intervals
    ("(0,\\frac{1}{100!})", "(0,\\frac{1}{101!})", False, False),
    ("[0,\\frac{1}{10^{20}}]", "[0,\\frac{1}{10^{20}+1}]", False, False),  # ToRA: equal (per-end tolerance)
    ("(1,\\sqrt{8}]", "(1,2\\sqrt{2}]", True, False),  # ToRA splits only (..) and [..] element-wise
    ("(1,\\sqrt{8}]", "[1,2\\sqrt{2}]", False, False),
    # sets
    ("\\{1,2\\}", "\\{2,1\\}", True, True),
    ("\\{1,2\\}", "\\{1,3\\}", False, False),
    ("\\{\\frac{1}{100!}\\}", "\\{\\frac{1}{101!}\\}", False, False),  # Math-Verify itself says equal
    ("\\{\\sqrt{8},1\\}", "\\{1,2\\sqrt{2}\\}", True, False),  # ToRA has no sets: compared as text
    # equations, matrices
    ("x=\\frac{1}{100!}", "\\frac{1}{101!}", False, False),
    ("\\begin{pmatrix}\\frac{1}{100!}\\\\1\\end{pmatrix}", "\\begin{pmatrix}\\frac{1}{101!}\\\\1\\end{pmatrix}", False, False),
    ("\\sqrt{x^2}", "x", False, False),  # |x| is not x
]


def _expected(verdict: bool | str) -> tuple[bool | None, str]:
    return (None, "unsure") if verdict == "unsure" else (bool(verdict), "ok")


@pytest.mark.parametrize("grader", GRADERS)
def test_exactness_pairs(grader: str) -> None:
    results = grade_many([(p, r) for p, r, _, _ in TRICKY], grader, timeout=20)
    column = 2 if grader == "math-verify" else 3
    wrong = [
        (row[0], row[1], row[column], (res.equal, res.status))
        for row, res in zip(TRICKY, results, strict=True)
        if (res.equal, res.status) != _expected(row[column])
    ]
    assert not wrong


def test_latex_parsing_works() -> None:
    """A parser/runtime version mismatch makes every LaTeX answer unparsable: fail loudly here."""
    from importlib.metadata import version

    import sympy
    from latex2sympy2_extended.antlr_parser import PSParser

    assert version("antlr4-python3-runtime") == "4.13.2"  # the runtime pyproject pins
    assert PSParser.__module__ == "latex2sympy2_extended.gen.antlr4_13_2.PSParser"
    assert sympy.Rational(1, 2) in _parse("\\frac{1}{2}")
    assert sympy.simplify(_parse("\\frac{\\sqrt{2}}{2}")[0] - sympy.sqrt(2) / 2) == 0
    # Through the grader (and its worker), on strings that differ: only a parse can match them.
    for pred in ("\\frac{1}{2}", "\\frac{2}{4}", "\\tfrac{1}{2}"):
        result = grade(pred, "0.5", "math-verify")
        assert (result.equal, result.status) == (True, "ok")
    assert grade("\\frac{1}{3}", "0.5", "math-verify").equal is False


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

# (pred, ref, verdict, decided in process): pairs within 1e-6 of each other but not equal go to Math-Verify.
NUMERIC = [
    ("18", "18", True, True),
    ("18.0", "18", True, True),
    ("18.5", "18.50", True, True),
    ("2,125", "2125", True, True),
    ("1,000,000", "1000000", True, True),
    ("0.1", "0.10000001", True, False),  # the same to 6 places
    ("0.1", "0.1001", False, True),
    ("-3", "3", False, True),
    ("7", "7.000001", False, True),  # 1e-6 apart: different at 6 places
    ("123456789", "123456788", False, True),
    ("0.05", "5", False, True),
    ("1.25", "1.2500000", True, True),
    ("100000000000000000001", "100000000000000000000", False, True),  # integers of any size, exactly
    ("12345678901234567890", "12,345,678,901,234,567,890", True, True),
    ("0.0000001", "0.0000002", False, False),
    # a percentage reads as P and as P/100
    ("50\\%", "0.5", True, True),
    ("50\\%", "50", True, True),
    ("0.5", "50\\%", True, True),
    ("5\\%", "0.5", False, True),
    ("40.0\\%", "40", True, True),
    ("33.3\\%", "25", False, True),
    ("120\\%", "1.2", True, True),
    ("20\\%", "0.2000001", True, False),  # the same as 0.2 to 6 places
]


@pytest.mark.parametrize(("pred", "ref", "verdict", "in_process"), NUMERIC)
def test_fast_path_agrees_with_math_verify(pred: str, ref: str, verdict: bool, in_process: bool) -> None:
    assert mv_equal(pred, ref)[:2] == (verdict, "ok")
    assert _mv_fast(pred, ref) == (verdict if in_process else None)


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
