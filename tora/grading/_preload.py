"""Imported once by the grading fork server so workers start with sympy and Math-Verify loaded."""

from __future__ import annotations

import latex2sympy2_extended  # noqa: F401
import math_verify  # noqa: F401
import sympy  # noqa: F401

from tora.grading.worker import warm_up

# Parse a few answers now: the caches and lazily built grammars are then shared
# by every forked worker instead of being rebuilt in each.
warm_up()
