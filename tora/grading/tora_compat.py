r"""ToRA-compatible extraction and equivalence, to reproduce published figures.

Written from the behaviour ToRA's evaluation is documented to have, not from
its code. Its quirks are kept on purpose, because a published number depends on
them: extraction looks for the substring "boxed" anywhere (code included),
takes only the first line of the answer, and the string clean-up deletes every
"and" and turns a lone "j" into "i". Use `tora.grading.extract` for tora's own
structural extraction.

Equivalence (`math_equal`), in order:
1. both sides read as numbers (`float`, commas ignored): equal if the
   prediction is within a relative 1e-4 of the reference, of reference/100 or
   of reference*100 (percentages written either way);
2. equal as strings once brackets and braces are set aside;
3. tuples/intervals `(a, b)`, `[a, b]` element-wise, and pmatrix/bmatrix
   matrices cell by cell;
4. `x = 5` against `5` (a short left-hand side is dropped), equations as
   `lhs - rhs`;
5. symbolic: parse both with a LaTeX parser (or a guarded plain-expression
   parser), then structural equality, `simplify(a - b) == 0`, or numeric
   closeness (rel. 1e-4).
Steps 1-2 are cheap and run in the calling process (`quick_equal`); the rest
may call sympy, which can hang, so it runs in a worker with a deadline.

Where tora-compat departs from ToRA: ToRA's tolerance is kept wherever a
side is a decimal (step 1 for `0.05` against `5`, step 5 for `3.14159`
against `\pi`): that is how ToRA defines a match, and its published figures
depend on it (two of the 1064 correct GSM8K answers of ToRA-Code-34B are
percentages read as x/100). But two *exact* values are never equal by
tolerance: integers are compared as integers in step 1 (ToRA's floats call
123456 and 123457, or 10^20+1 and 10^20, equal), with the same x/100 and
x*100 variants, and in step 5 two exact expressions are equal only when that
is proven (`tora.grading.exact.exact_equal`), unequal when a 50-digit
evaluation separates them, and `unsure` otherwise. On ToRA's released GSM8K
outputs this changes no verdict (tests/test_grade_regression.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Literal

from tora.grading.exact import exact_equal, is_exact
from tora.grading.verdict import UNSURE, Verdict, decided

ToraRule = Literal["boxed", "answer_is", "last_output", "last_number"]

_REL_TOL = 1e-4


# --- ToRA's answer extraction ------------------------------------------------


def tora_extract(completion: str) -> tuple[str, ToraRule | None]:
    """ToRA's prediction for one completion and the rule that produced it ("" if none)."""
    answer, rule = _tora_pick(completion)
    answer = answer.split("\n")[0]
    if answer.startswith(":"):
        answer = answer[1:]
    if answer.endswith("."):
        answer = answer[:-1]
    if answer.endswith("/"):
        answer = answer[:-1]
    # ToRA cleans the answer once when extracting and once more before grading.
    answer = tora_strip(tora_strip(answer))
    return answer, rule if answer else None


def _tora_pick(text: str) -> tuple[str, ToraRule | None]:
    if "boxed" in text:
        # The substring, wherever it is: a docstring saying "lego boxed set" counts.
        after = text.split("boxed")[-1]
        if after.startswith("{"):
            return _naive_braced(after), "boxed"
        return after.split("$")[0].strip(), "boxed"
    if "he answer is" in text:
        return text.split("he answer is")[-1].strip(), "answer_is"
    output = _tora_program_output(text)
    if output:
        return output, "last_output"
    numbers = re.findall(r"-?\d*\.?\d+", text.replace(",", ""))
    return (numbers[-1], "last_number") if numbers else ("", None)


def _naive_braced(after: str) -> str:
    # Counts braces without regard to escapes, as ToRA does.
    depth = 0
    for i, ch in enumerate(after):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return after[1:i]
    return after[1:]


def _tora_program_output(text: str) -> str:
    if "```output" not in text:
        return ""
    tail = text.split("```output")[-1]
    return tail.split("```")[0].strip()


def tora_strip(s: str) -> str:
    """ToRA's answer clean-up (a MATH-style `strip_string` with its quirks)."""
    s = str(s).strip().replace("\n", "").rstrip(".")
    for old, new in (("\\!", ""), ("\\ ", ""), ("\\\\", "\\"), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac")):
        s = s.replace(old, new)
    s = s.replace("\\left", "").replace("\\right", "")
    # A trailing \text{...} is a unit, unless it is all there is.
    without_unit = re.sub(r"\\text{.*?}$", "", s).strip()
    if without_unit and without_unit != s:
        s = without_unit
    for old in ("^{\\circ}", "^\\circ", "\\$", "$"):
        s = s.replace(old, "")
    s = s.replace("\\text", "").replace("x\\in", "")
    for old in ("\\%", "%"):
        s = s.replace(old, "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    s = s.replace("\\cdot", "")
    s = s.replace("infinity", "\\infty")
    if "\\infty" not in s:
        s = s.replace("inf", "\\infty")
    s = s.replace("+\\inity", "\\infty")
    s = s.replace("and", "").replace("\\mathbf", "")
    s = re.sub(r"\\mbox{.*?}", "", s)
    if "j" in s and "i" not in s:
        s = s.replace("j", "i")
    s = re.sub(r"(\d+)\.0+([^\d])", r"\1\2", s)
    s = re.sub(r"(\d+)\.0+$", r"\1", s)
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    s = _tora_fix_fracs(s)
    return _tora_fix_slash(s)


def _tora_fix_fracs(s: str) -> str:
    r"""`\frac12` -> `\frac{1}{2}`, `\frac1b` -> `\frac{1}{b}`, `\frac{1}2` -> `\frac{1}{2}`."""
    pieces = s.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\frac"
        if piece.startswith("{"):
            out += piece
            continue
        if len(piece) < 2:
            return s  # malformed: leave the whole string as it was
        a, b, rest = piece[0], piece[1], piece[2:]
        out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
    return out


def _tora_fix_slash(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    if s != f"{a}/{b}":
        return s
    return f"\\frac{{{a}}}{{{b}}}"


# --- equivalence ------------------------------------------------------------


def _as_number(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


_INTEGER = re.compile(r"\s*[+-]?\d+\s*")


def _as_integer(s: str) -> int | None:
    plain = s.replace(",", "")
    return int(plain) if _INTEGER.fullmatch(plain) else None


def numeric_equal(pred: str, ref: str) -> bool | None:
    """Step 1: None unless both read as numbers; integers exactly, decimals within ToRA's tolerance.

    Either way the reference may also be read as a percentage: the
    prediction may equal reference/100 or reference*100.
    """
    p, r = _as_number(pred), _as_number(ref)
    if p is None or r is None:
        return None
    pi, ri = _as_integer(pred), _as_integer(ref)
    if pi is not None and ri is not None:
        return pi in (ri, ri * 100) or pi * 100 == ri
    return any(math.isclose(c, p, rel_tol=_REL_TOL) for c in (r / 100, r, r * 100))


def _bracket_free(pred: str, ref: str) -> tuple[str, str]:
    # A bracketed prediction may match an unbracketed reference, but an open
    # interval (...) never matches a closed one [...].
    p, r = pred, ref
    if (p.startswith("[") and p.endswith("]") and not r.startswith("(")) or (
        p.startswith("(") and p.endswith(")") and not r.startswith("[")
    ):
        p, r = p.strip("[]()"), r.strip("[]()")
    for ch in "{}()":
        p, r = p.replace(ch, ""), r.replace(ch, "")
    return p, r


def quick_equal(pred: str, ref: str) -> bool | None:
    """Steps 1-2 of `math_equal`: a decision without sympy, or None when one is needed."""
    numeric = numeric_equal(pred, ref)
    if numeric is not None:
        return numeric
    if not pred.strip():
        return False
    a, b = _bracket_free(pred.strip(), ref.strip())
    if a == b:
        return True
    return None


def math_equal(pred: str, ref: str) -> Verdict:
    """Full equivalence; may run sympy (call it where a deadline can interrupt it)."""
    quick = quick_equal(pred, ref)
    if quick is not None:
        return decided(quick)
    pred, ref = pred.strip(), ref.strip()
    parts = _elementwise(pred, ref)
    if parts is not None:
        return parts
    lhs_dropped = _drop_short_lhs(pred, ref)
    if lhs_dropped is not None:
        pred, ref = lhs_dropped
        quick = quick_equal(pred, ref)
        if quick is not None:
            return decided(quick)
    return symbolic_equal(pred, ref)


def _all_parts(verdicts: list[Verdict]) -> Verdict:
    """Equal when every part is; a part that is unequal or does not parse makes the whole unequal."""
    if any(v.equal is not True and v.status != "unsure" for v in verdicts):
        return decided(False)
    return decided(True) if all(v.equal for v in verdicts) else UNSURE


def _elementwise(pred: str, ref: str) -> Verdict | None:
    """Tuples, intervals and matrices compared part by part; None when the two are not of one shape."""
    pairs = (("[", "]"), ("(", ")"))
    if any(pred.startswith(o) and pred.endswith(c) and ref.startswith(o) and ref.endswith(c) for o, c in pairs):
        ps, rs = _split_top(pred[1:-1]), _split_top(ref[1:-1])
        if len(ps) == len(rs) and len(ps) > 1:
            return _all_parts([math_equal(p, r) for p, r in zip(ps, rs, strict=True)])
    pm, rm = _matrix_cells(pred), _matrix_cells(ref)
    if pm is not None and rm is not None and [len(row) for row in pm] == [len(row) for row in rm]:
        return _all_parts([math_equal(p, r) for prow, rrow in zip(pm, rm, strict=True)
                           for p, r in zip(prow, rrow, strict=True)])
    return None


def _split_top(s: str) -> list[str]:
    """Split on commas not nested inside brackets or braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


_MATRIX = re.compile(r"^\\begin\{([pbv]?matrix)\}(.*)\\end\{\1\}$", re.DOTALL)


def _matrix_cells(s: str) -> list[list[str]] | None:
    m = _MATRIX.match(s.strip())
    if not m:
        return None
    # Rows end at a row break (two backslashes), or at one backslash not starting a
    # command once ToRA's clean-up has halved the breaks.
    rows = [row for row in re.split(r"\\\\|\\(?![A-Za-z])", m.group(2)) if row.strip()]
    return [[cell.strip() for cell in row.split("&")] for row in rows]


def _drop_short_lhs(pred: str, ref: str) -> tuple[str, str] | None:
    """`x = 5` against `5`: compare the right-hand side (a name of at most two characters)."""
    if pred.count("=") == 1 and "=" not in ref:
        lhs, rhs = pred.split("=")
        if len(lhs.strip()) <= 2:
            return rhs.strip(), ref
    if ref.count("=") == 1 and "=" not in pred:
        lhs, rhs = ref.split("=")
        if len(lhs.strip()) <= 2:
            return pred, rhs.strip()
    return None


# --- symbolic ---------------------------------------------------------------

# Plain-expression parsing goes through `eval`; only strings made of these
# characters are offered to it, so a prediction cannot run code.
_SAFE_EXPR = re.compile(r"^[0-9A-Za-z+\-*/^().,\s]*$")


def _parse(s: str) -> Any:
    from latex2sympy2_extended import latex2sympy

    try:
        return latex2sympy(s)
    except Exception:
        pass
    if _SAFE_EXPR.match(s) and "__" not in s:
        from sympy.parsing.sympy_parser import parse_expr

        try:
            return parse_expr(s.replace("^", "**"), evaluate=True)
        except Exception:
            pass
    return None


def symbolic_equal(pred: str, ref: str) -> Verdict:
    import sympy

    if "=" in pred and "=" in ref and pred.count("=") == ref.count("=") == 1:
        pl, pr = pred.split("=")
        rl, rr = ref.split("=")
        pred, ref = f"({pl})-({pr})", f"({rl})-({rr})"
        equation = True
    else:
        equation = False
    a, b = _parse(pred), _parse(ref)
    if a is None or b is None:
        return Verdict(None, "unparsed")
    checks: list[Callable[[], bool]] = [lambda: str(a) == str(b) or bool(a == b), lambda: _zero(sympy.simplify(a - b))]
    if equation:
        checks.append(lambda: _zero(sympy.simplify(a + b)))
    for check in checks:
        if _holds(check):
            return decided(True)
    if is_exact(a) and is_exact(b):
        return _exact_verdict(a, b, equation)
    # A decimal is involved: ToRA's numeric closeness.
    return decided(_holds(lambda: _close(a, b)) or _holds(lambda: _matrix_close(a, b)))


def _holds(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except Exception:
        return False


def _exact_verdict(a: Any, b: Any, equation: bool) -> Verdict:
    """Two exact values that `simplify` did not prove equal: proven unequal, or `unsure`."""
    import sympy

    if not all(isinstance(x, sympy.Expr | sympy.MatrixBase) for x in (a, b)):
        return decided(False)  # sets, relations: ToRA compares them only structurally
    readings = [(a, b), (a, -b)] if equation else [(a, b)]
    found = [_decide(x, y) for x, y in readings]
    if True in found:
        return decided(True)
    return decided(False) if all(f is False for f in found) else UNSURE


def _decide(a: Any, b: Any) -> bool | None:
    try:
        return exact_equal(a, b, prove=False)
    except Exception:
        return False  # sympy could not compare them at all: ToRA's answer


def _zero(expr: Any) -> bool:
    import sympy

    if isinstance(expr, sympy.MatrixBase):
        return bool(expr.is_zero_matrix)
    return bool(expr == 0)


def _close(a: Any, b: Any) -> bool:
    import sympy

    x, y = complex(sympy.N(a)), complex(sympy.N(b))
    return math.isclose(x.real, y.real, rel_tol=_REL_TOL) and math.isclose(x.imag, y.imag, rel_tol=_REL_TOL)


def _matrix_close(a: Any, b: Any) -> bool:
    import sympy

    if not (isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase)) or a.shape != b.shape:
        return False
    return all(_close(x, y) for x, y in zip(a, b, strict=True))
