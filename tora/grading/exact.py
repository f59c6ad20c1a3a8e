r"""Exact comparison, and the one tolerance both graders allow a decimal.

Floating point cannot tell `\frac{1}{100!}` from `\frac{1}{101!}` or
`10^{20}+1` from `10^{20}`, so a grader that compares exact values with a
tolerance calls them equal by accident. Here a value is *exact* when its sympy
expression holds no `Float` (integers, rationals, radicals, pi, factorials...);
two exact values are equal only when that is proven:

- the difference evaluates to a rational (integers, fractions, factorials):
  it decides;
- sympy's assumptions say the difference is (not) zero: that decides;
- a constant difference evaluated to 50 significant digits with sympy's
  adaptive-precision `evalf(strict=True)` is nonzero: unequal. One with free
  symbols is evaluated at a few fixed rational points: nonzero at any of them,
  unequal;
- `simplify` of the difference is 0: equal;
- otherwise nothing is proven and the answer is None (the graders say
  `unsure`): for instance two radical expressions equal to 50 digits that
  sympy cannot simplify to the same form.

A *decimal* (a side holding a `Float`) is an approximation by nature, so it is
compared with a tolerance (`decimals_match`). Everything here may run sympy
for a long time: call it where a deadline can interrupt it (a grading worker).
"""

from __future__ import annotations

from typing import Any

_DIGITS = 50  # significant digits a constant difference is evaluated to
_MAXN = 500  # the most working precision (digits) evalf may use to reach them
# Rational points at which an expression in free symbols is evaluated; a
# negative one and a large one, so that |x| - x and x**3 - x**2 show up.
_POINTS = ((3, 7), (-5, 11), (13, 2))


def is_exact(expr: Any) -> bool:
    """True when `expr` (a sympy object: expression, set, interval, matrix, relation) holds no Float."""
    import sympy

    atoms = getattr(expr, "atoms", None)
    if atoms is None:
        return False
    try:
        return not atoms(sympy.Float)
    except Exception:
        return False


def is_constant(expr: Any) -> bool:
    """A scalar sympy expression without free symbols (a number, pi, sqrt(2)...)."""
    import sympy

    return isinstance(expr, sympy.Expr) and not isinstance(expr, sympy.MatrixBase) and not expr.free_symbols


def exact_equal(a: Any, b: Any, *, prove: bool = True) -> bool | None:
    """Whether exact `a` and `b` are equal: True or False when proven, None when undecided.

    `prove=False` skips `simplify` (Math-Verify runs its own next).
    """
    import sympy

    if isinstance(a, sympy.MatrixBase) or isinstance(b, sympy.MatrixBase):
        if not (isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase)) or a.shape != b.shape:
            return False
        cells = [exact_equal(x, y, prove=prove) for x, y in zip(a, b, strict=True)]
        if False in cells:
            return False
        return True if all(cells) else None
    if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr)):
        return None
    return _is_zero(_doit(a - b), prove)


def _doit(expr: Any) -> Any:
    # latex2sympy builds unevaluated trees (factorial(100) stays a call); evaluate them.
    try:
        return expr.doit()
    except Exception:
        return expr


def _is_zero(d: Any, prove: bool) -> bool | None:
    import sympy

    if d.is_Rational:
        return bool(d == 0)
    if d.is_Number:  # nan, zoo: no value to compare
        return None
    known = d.is_zero
    if known is not None:
        return bool(known)
    if _nonzero(d):
        return False
    if not prove:
        return None
    simplified = sympy.simplify(d)
    if simplified == 0:
        return True
    if simplified.is_Rational:
        return False
    return None


def _nonzero(d: Any) -> bool:
    """Proven nonzero by evaluation: the constant itself, or the expression at a fixed rational point."""
    import sympy

    symbols = sorted(d.free_symbols, key=str)
    if not symbols:
        return _evaluates_nonzero(d)
    for num, den in _POINTS:
        point = {s: sympy.Rational(num + 2 * i, den) for i, s in enumerate(symbols)}
        try:
            value = d.subs(point)
        except Exception:
            continue
        if not value.free_symbols and _evaluates_nonzero(value):
            return True
    return False


def _evaluates_nonzero(value: Any) -> bool:
    from sympy.core.evalf import PrecisionExhausted

    try:
        # strict: raise rather than return a number whose digits are noise.
        # A difference that is truly 0 exhausts the precision and lands here.
        number = value.evalf(_DIGITS, strict=True, maxn=_MAXN)
    except PrecisionExhausted:
        return False
    except Exception:
        return False
    return bool(number.is_number and number.is_finite and number.is_zero is False)


# --- decimals ------------------------------------------------------------------

_REL_TOL = 10**-4


def decimals_match(a: Any, b: Any, places: int) -> bool:
    """Two constants of which at least one is a decimal: equal to `places` decimal places and to a relative 1e-4.

    The first rule is Math-Verify's (a decimal is read to 6 places, so
    0.333333 matches 1/3); the second keeps two tiny values from matching just
    because both round to 0 (1e-7 is not 2e-7, and 0.0000001 is not 0).
    """
    import sympy

    try:
        x, y = sympy.N(_doit(a), 30), sympy.N(_doit(b), 30)
        if (x - y).is_zero:
            return True
        if (x.round(places) - y.round(places)).is_zero is not True:
            return False
        return bool(sympy.Abs(x - y) <= _REL_TOL * sympy.Max(sympy.Abs(x), sympy.Abs(y)))
    except Exception:  # nan, zoo, a relational that cannot be ordered: no match
        return False
