r"""tora's own answer extraction and normalisation.

Extraction is structural (see `tora.fences`): code blocks are never searched
for answers, so a docstring that says "boxed" or a number in a variable name
cannot become the answer. Rules, in order, the first that yields wins:

1. `boxed`: the last `\boxed{...}` (brace-matched) outside every fenced block;
2. `answer_is`: the text after the last "the answer is" in prose;
3. `last_output`: the last non-empty line of the last ```output block that is
   not an error message;
4. `last_number`: the last number in prose.

ToRA's own, quirkier rules live in `tora_compat.tora_extract` and are used only
when reproducing its figures.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel

from tora.fences import blocks, boxed_contents, prose

Rule = Literal["boxed", "answer_is", "last_output", "last_number"]


class Extraction(BaseModel):
    """An extracted answer: `raw` as written, `answer` normalised, and the rule that fired."""

    answer: str | None
    raw: str | None
    rule: Rule | None


_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*", re.IGNORECASE)
_ERROR_LINE = re.compile(r"^\s*(?:Traceback|[A-Za-z_.]*(?:Error|Exception|Interrupt)\b)")
# A run of digits and commas, optional decimals; `_last_number` splits the commas.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def extract_answer(text: str) -> Extraction:
    """Apply the four rules to a completion (the model's text with its output blocks)."""
    raw, rule = _extract_raw(text)
    if raw is None:
        return Extraction(answer=None, raw=None, rule=None)
    answer = normalize_answer(raw)
    return Extraction(answer=answer or None, raw=raw, rule=rule if answer else None)


def _extract_raw(text: str) -> tuple[str | None, Rule | None]:
    outside = prose(text)
    boxed = boxed_contents(outside)
    if boxed:
        return boxed[-1].strip(), "boxed"
    said = list(_ANSWER_IS.finditer(outside))
    if said:
        tail = outside[said[-1].end() :].strip().split("\n")[0]
        tail = _strip_math_delimiters(tail.strip().rstrip("."))
        if tail:
            return tail, "answer_is"
    for block in reversed(blocks(text)):
        if block.lang != "output":
            continue
        lines = [ln.strip() for ln in block.content.splitlines() if ln.strip()]
        # An error message is not an answer; an earlier successful output may be.
        if lines and not any(_ERROR_LINE.match(ln) for ln in lines):
            return lines[-1], "last_output"
    numbers = [n.rstrip(",") for n in _NUMBER.findall(outside)]
    if numbers:
        last = numbers[-1]
        # "1,234" is one number; "3,4" (a pair written without a space) ends in 4.
        if "," in last and not _THOUSANDS.fullmatch(last):
            last = last.rsplit(",", 1)[1]
        return last, "last_number"
    return None, None


def _strip_math_delimiters(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            return s[len(left) : len(s) - len(right)].strip()
    return s


# --- normalisation -----------------------------------------------------------

# Plain words that are units or nouns after a number ("18 dollars", "5 apples")
# are dropped; these are the exceptions that carry mathematical meaning.
_MATH_WORDS = {"pi", "e", "i", "sqrt", "inf", "infty", "infinity", "or", "and", "mod"}
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_TRAILING_TEXT = re.compile(r"^(.+?)\s*\\(?:text|mbox|mathrm)\s*\{\s*[A-Za-z][^{}]*\}(?:\^\{?\d\}?)?\s*$")
# A number then words of two or more letters ("18 dollars", "5 sq ft"); "2k" or "3 x" keep their letter.
_NUM_THEN_WORDS = re.compile(r"^([-+]?[\d.,]*\d(?:\.\d*)?)\s*((?:[A-Za-z][A-Za-z'-]+\.?\s*)+)(?:\^\{?\d\}?)?$")
_PLAIN_NUMBER = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?$|^[-+]?\.\d+$")
_SHORT_LHS = re.compile(r"^\s*[A-Za-z](?:_\{?\w\}?)?\s*=\s*(?=\S)")


def normalize_answer(s: str) -> str:
    r"""Canonical string form of an answer, as MATH graders normalise.

    Drops what does not change the value: math delimiters, `\left`/`\right`,
    spacing commands, `\dfrac`, degrees, dollar signs, percent signs, trailing
    unit text, a short `x =` prefix, spaces, a trailing period; fixes `\frac12`
    and `\sqrt2`; turns `a/b` of integers into `\frac{a}{b}`; writes plain
    numbers without thousands separators and trailing zeros.
    """
    s = _strip_math_delimiters(s.replace("\n", " ").strip())
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # "\ " is a space, but "\\ " is a row break then a space
    s = s.rstrip(".").strip()
    for old, new in (
        ("\\left", ""),
        ("\\right", ""),
        ("\\displaystyle", ""),
        ("\\!", ""),
        ("\\,", " "),
        ("\\;", " "),
        ("\\:", " "),
        ("~", " "),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("°", ""),
        ("\\degree", ""),
        ("\\$", ""),
        ("$", ""),
        ("\\%", ""),
        ("%", ""),
        ("\\infinity", "\\infty"),
    ):
        s = s.replace(old, new)
    s = s.strip()
    # Units written as trailing text: "10 \text{ cm}" -> "10", but "\text{Evelyn}" stays.
    m = _TRAILING_TEXT.match(s)
    if m and m.group(1).strip() and "\\text" not in m.group(1) and "\\mbox" not in m.group(1):
        s = m.group(1).strip()
    s = _TEXT_CMD.sub(lambda mm: mm.group(1), s).strip()
    m = _NUM_THEN_WORDS.match(s)
    if m and not (set(m.group(2).lower().replace(".", " ").split()) & _MATH_WORDS):
        s = m.group(1)
    s = re.sub(r"^[A-Za-z]\s*\\in\s*", "", s)
    if s.count("=") == 1:
        s = _SHORT_LHS.sub("", s)
    s = s.replace(" ", "")
    s = _fix_sqrt(_fix_frac(s))
    s = _fix_slash(s)
    s = s.rstrip(".")
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)
    if _PLAIN_NUMBER.match(s):
        s = _plain_number(s)
    return s


def _plain_number(s: str) -> str:
    s = s.replace(",", "").lstrip("+")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s


def _fix_frac(s: str) -> str:
    r"""`\frac12` -> `\frac{1}{2}`, `\frac\pi4` -> `\frac{\pi}{4}`: one-token arguments get braces."""
    out: list[str] = []
    parts = s.split("\\frac")
    out.append(parts[0])
    for part in parts[1:]:
        args: list[str] = []
        rest = part
        for _ in range(2):
            if rest.startswith("{"):
                depth = 0
                for j, ch in enumerate(rest):
                    depth += ch == "{"
                    depth -= ch == "}"
                    if depth == 0:
                        args.append(rest[: j + 1])
                        rest = rest[j + 1 :]
                        break
                else:
                    break
            elif rest:
                # One token: a control word such as \pi, or one character.
                token = re.match(r"\\[A-Za-z]+|.", rest, re.DOTALL)
                assert token is not None
                args.append("{" + token.group(0) + "}")
                rest = rest[token.end() :]
        out.append("\\frac" + "".join(args) + rest)
    return "".join(out)


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def _fix_slash(s: str) -> str:
    m = re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    if m:
        return f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    return s


def is_plain_number(s: str) -> bool:
    """True for a normalised plain decimal number such as `-12` or `3.5`."""
    return bool(re.fullmatch(r"-?\d+(?:\.\d+)?", s))
