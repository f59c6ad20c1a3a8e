"""What a grader says about one (prediction, reference) pair, before it becomes a `GradeResult`.

`equal` is None whenever `status` is not "ok": a side that does not parse is
`unparsed`; a pair that neither an exact comparison nor a safe numeric one
decides (two exact values equal to 50 digits that sympy cannot prove equal)
is `unsure`; a comparison out of time is `timeout`; a crash is `error`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

GradeStatus = Literal["ok", "unparsed", "unsure", "timeout", "error"]
GRADE_STATUSES: tuple[GradeStatus, ...] = ("ok", "unparsed", "unsure", "timeout", "error")


class Verdict(NamedTuple):
    equal: bool | None
    status: GradeStatus
    detail: str | None = None


def decided(equal: bool) -> Verdict:
    return Verdict(equal, "ok")


UNSURE = Verdict(None, "unsure", "equal to 50 significant digits, but not proven equal")
