r"""HF Math-Verify as a grader.

`verify(gold, pred)` is not symmetric (assignments and intervals follow the
gold), so the reference always goes first. Both sides are wrapped in
`\boxed{}` so that Math-Verify's LaTeX extraction takes the whole answer and
not a number inside it. Each side is parsed as written and in its normalised
form (see `extract.normalize_answer`: units, `x =`, trailing periods dropped);
the pair is equal if any reading of the prediction matches any reading of the
reference, and `unparsed` if no reading of a side is an expression.

Math-Verify's own timeouts use SIGALRM, which only works on a main thread and
cannot interrupt C code. This module is meant to run inside a worker process
of `tora.grading.pool`: its internal timeouts are switched off and the worker
sets one deadline for the whole comparison; the pool's outer timeout kills a
worker that does not come back.
"""

from __future__ import annotations

import logging
from typing import Any

from tora.grading.extract import normalize_answer

Verdict = tuple[bool | None, str, str | None]  # equal, status, detail

# With timeouts off, Math-Verify logs a warning once; the deadline is ours.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _parse(answer: str) -> list[Any]:
    from math_verify import parse

    return list(parse("\\boxed{" + answer + "}", parsing_timeout=None))  # type: ignore[arg-type]


def _has_expr(parsed: list[Any]) -> bool:
    return any(not isinstance(x, str) for x in parsed)


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

    gold = _parse_side(ref)
    target = _parse_side(pred)
    if not gold:
        return None, "unparsed", "reference did not parse"
    if not target:
        return None, "unparsed", "prediction did not parse"
    if verify(gold, target, timeout_seconds=None, raise_on_error=True):
        return True, "ok", None
    if not _has_expr(gold):
        return None, "unparsed", "reference did not parse"
    if not _has_expr(target):
        return None, "unparsed", "prediction did not parse"
    return False, "ok", None
