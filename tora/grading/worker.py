"""What a grading worker process runs: one comparison under one deadline.

The deadline is a SIGALRM timer set by us (the worker's main thread owns
signals), raising an exception derived from BaseException so that the
`except Exception` clauses inside sympy and Math-Verify do not swallow it. If
C code ignores the signal, the pool's outer timeout kills the worker.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from tora.grading.math_verify import mv_equal
from tora.grading.tora_compat import math_equal
from tora.grading.verdict import Verdict

Task = tuple[str, str, str, float]  # grader, pred, ref, seconds


class Deadline(BaseException):
    """The worker's own time budget for one item ran out."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Deadline


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_task(task: Task) -> Verdict:
    grader, pred, ref, seconds = task
    try:
        with deadline(seconds):
            return mv_equal(pred, ref) if grader == "math-verify" else math_equal(pred, ref)
    except Deadline:
        return Verdict(None, "timeout", f"no verdict within {seconds:g} s")


def warm_up() -> None:
    """Build the LaTeX parser once (about 1 s), so that no worker pays for it on its first item.

    sympy's `simplify` has a similar first-call cost; it is left to the first
    item that needs it, since most batches never do.
    """
    run_task(("math-verify", "\\frac{1}{2}", "0.5", 30.0))
