r"""HF Math-Verify as a grader, with exact values compared exactly.

`verify(gold, pred)` is not symmetric (assignments and intervals follow the
gold), so the reference always goes first. Both sides are wrapped in
`\boxed{}` so that Math-Verify's LaTeX extraction takes the whole answer and
not a number inside it. Each side is parsed as written and in its normalised
form (see `extract.normalize_answer`: units, `x =`, trailing periods dropped);
the pair is equal if any reading of the prediction matches any reading of the
reference, and `unparsed` if no reading of a side is an expression.

Exactness. Math-Verify's numeric test (`sympy_numeric_eq`) rounds to 6
places or checks `(a - b).evalf(chop=True) == 0`, which calls `\frac{1}{100!}`
and `\frac{1}{101!}` equal. `install_exact_numeric_eq` replaces it, for every
comparison Math-Verify makes (scalars, set elements, interval ends, matrix
cells, both sides of relations), by:
- both sides exact (no Float): Math-Verify's exact integer rule (`9\%` is 9)
  or a proven equality (`tora.grading.exact.exact_equal`);
- a decimal involved: `exact.decimals_match` (6 places and a relative 1e-4);
- anything else (symbols mixed with decimals): Math-Verify's own test.
Math-Verify's symbolic test (`simplify(a - b)` is zero) runs after it as
before. When Math-Verify then says "not equal" but a pair of exact constants
is equal to 50 digits and unproven, the verdict is `unsure`.

Math-Verify's own timeouts use SIGALRM, which only works on a main thread and
cannot interrupt C code. This module is meant to run inside a worker process
of `tora.grading.pool`: its internal timeouts are switched off and the worker
sets one deadline for the whole comparison; the pool's outer timeout kills a
worker that does not come back.
"""

from __future__ import annotations

import logging
from itertools import product
from typing import Any

from tora.grading.exact import decimals_match, exact_equal, is_constant, is_exact
from tora.grading.extract import normalize_answer
from tora.grading.verdict import UNSURE, Verdict, decided

# With timeouts off, Math-Verify logs a warning once; the deadline is ours.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def install_exact_numeric_eq() -> None:
    """Make Math-Verify's numeric comparison exact for exact values (idempotent).

    Math-Verify looks `sympy_numeric_eq` up as a module global at each call,
    so replacing the global changes every comparison it makes. A Math-Verify
    without that function fails here, loudly, instead of grading inexactly.
    """
    from math_verify import grader

    original = grader.sympy_numeric_eq
    if getattr(original, "tora_exact", False):
        return

    def numeric_eq(a: Any, b: Any, float_rounding: int, numeric_precision: int) -> bool:
        import sympy

        if isinstance(a, sympy.MatrixBase | sympy.MatrixExpr) and isinstance(b, sympy.MatrixBase | sympy.MatrixExpr):
            return bool(original(a, b, float_rounding, numeric_precision))  # cell by cell, through this function
        if is_exact(a) and is_exact(b):
            if grader.is_atomic_or_pct_atomic(a, sympy.Integer) and grader.is_atomic_or_pct_atomic(b, sympy.Integer):
                return bool(original(a, b, float_rounding, numeric_precision))  # exact integers, 9% == 9
            return exact_equal(a, b, prove=False) is True
        if is_constant(a) and is_constant(b):
            return decimals_match(a, b, float_rounding)
        return bool(original(a, b, float_rounding, numeric_precision))

    numeric_eq.tora_exact = True  # type: ignore[attr-defined]
    grader.sympy_numeric_eq = numeric_eq


def _parse(answer: str) -> list[Any]:
    from math_verify import parse

    return list(parse("\\boxed{" + answer + "}", parsing_timeout=None))  # type: ignore[arg-type]


def _exprs(parsed: list[Any]) -> list[Any]:
    return [x for x in parsed if not isinstance(x, str)]


def _parse_side(answer: str) -> list[Any]:
    # Math-Verify reads "8\\sqrt{3} \\text{ square inches}" as a product with the
    # letters of the unit; the normalised form drops it. Any reading may match.
    parsed = _parse(answer)
    normalised = normalize_answer(answer)
    if normalised and normalised != answer:
        parsed += _parse(normalised)
    return parsed


def mv_equal(pred: str, ref: str) -> Verdict:
    """Compare with Math-Verify. `unparsed` when a side yields no expression and strings differ."""
    from math_verify import verify

    install_exact_numeric_eq()  # here, not at import: the parent process imports this module but never grades
    gold = _parse_side(ref)
    target = _parse_side(pred)
    if not gold:
        return Verdict(None, "unparsed", "reference did not parse")
    if not target:
        return Verdict(None, "unparsed", "prediction did not parse")
    if verify(gold, target, timeout_seconds=None, raise_on_error=True):
        return decided(True)
    if not _exprs(gold):
        return Verdict(None, "unparsed", "reference did not parse")
    if not _exprs(target):
        return Verdict(None, "unparsed", "prediction did not parse")
    if _undecided(_exprs(gold), _exprs(target)):
        return UNSURE
    return decided(False)


def _undecided(gold: list[Any], target: list[Any]) -> bool:
    """A pair of exact constants that no proof separates or joins (Math-Verify said False for want of a proof)."""
    return any(
        is_constant(g) and is_constant(t) and is_exact(g) and is_exact(t) and exact_equal(g, t) is None
        for g, t in product(gold, target)
    )
