"""Answer extraction (tora's structural rules, ToRA's quirky ones) and normalisation."""

from __future__ import annotations

import pytest

from tora.grading import extract_answer, normalize_answer
from tora.grading.tora_compat import tora_extract, tora_strip

CODE_WITH_BOXED_DOCSTRING = '''```python
def f():
    """A lego boxed set with 500 pieces."""
    return 500 * 3
print(f())
```
'''


def test_boxed_is_the_last_one_outside_code() -> None:
    text = (
        "First guess $\\boxed{3}$.\n```python\nprint('\\\\boxed{99}')\n```\n```output\n\\boxed{99}\n```\n"
        "So the answer is $\\boxed{\\frac{1}{2}}$."
    )
    got = extract_answer(text)
    assert (got.raw, got.answer, got.rule) == ("\\frac{1}{2}", "\\frac{1}{2}", "boxed")


def test_boxed_braces_are_matched() -> None:
    got = extract_answer("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$")
    assert got.raw == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert got.answer == "(3,\\frac{\\pi}{2})"


def test_boxed_in_a_docstring_is_not_an_answer() -> None:
    # No output block, no prose: nothing to extract, and certainly not the docstring.
    got = extract_answer(CODE_WITH_BOXED_DOCSTRING)
    assert (got.answer, got.rule) == (None, None)


def test_the_answer_is() -> None:
    got = extract_answer("We add them.\nThe answer is $42$.\nThanks")
    assert (got.answer, got.rule) == ("42", "answer_is")


def test_last_output_skips_errors() -> None:
    text = (
        "```python\nprint(7)\n```\n```output\n7\n```\n"
        "```python\nprint(x)\n```\n```output\nNameError: name 'x' is not defined\n```\n"
    )
    got = extract_answer(text)
    assert (got.answer, got.rule) == ("7", "last_output")


def test_last_output_takes_the_last_line() -> None:
    got = extract_answer("```python\nprint(1)\nprint(2.50)\n```\n```output\n1\n2.50\n```\n")
    assert (got.raw, got.answer, got.rule) == ("2.50", "2.5", "last_output")


def test_last_number_in_prose_not_in_code() -> None:
    text = "She has 1,200 coins and spends 300.\n```python\nx = 12345\n```\nSo 900 are left, I think."
    got = extract_answer(text)
    assert (got.answer, got.rule) == ("900", "last_number")
    assert extract_answer("In total 1,234 apples").answer == "1234"


def test_nothing_to_extract() -> None:
    got = extract_answer("I do not know.")
    assert (got.answer, got.raw, got.rule) == (None, None, None)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("18", "18"),
        ("18.00", "18"),
        ("\\$1,000.50", "1000.5"),
        ("50\\%", "50"),
        ("30^\\circ", "30"),
        ("30^{\\circ}", "30"),
        ("10 \\text{ cm}", "10"),
        ("864 \\mbox{ inches}^2", "864"),
        ("18 dollars", "18"),
        ("2k", "2k"),  # a variable, not a unit
        ("\\text{Evelyn}", "Evelyn"),
        ("\\text{Monday}, \\text{Tuesday}", "Monday,Tuesday"),  # a list of words, not a unit
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\frac \\pi4", "\\frac{\\pi}{4}"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("3/4", "\\frac{3}{4}"),
        ("x = 5", "5"),
        ("x \\in [-2, 7]", "[-2,7]"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
        (".5", "0.5"),
        ("7.", "7"),
        ("$12$", "12"),
    ],
)
def test_normalize(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal


# --- ToRA's extraction, quirks included ---------------------------------------


def test_tora_extract_reads_boxed_anywhere() -> None:
    # ToRA looks for the substring "boxed" anywhere, so a docstring wins: kept on purpose.
    answer, rule = tora_extract(CODE_WITH_BOXED_DOCSTRING)
    assert rule == "boxed"
    assert answer == 'setwith500pieces."""'


def test_tora_extract_output_block_and_number() -> None:
    assert tora_extract("```python\nprint(0.0)\n```\n```output\n0.0\n```\nNo difference.") == ("0", "last_output")
    assert tora_extract("It costs 1,250 dollars") == ("1250", "last_number")
    assert tora_extract("So the answer is 12.\nDone") == ("12", "answer_is")
    assert tora_extract("nothing") == ("", None)


@pytest.mark.parametrize(
    ("raw", "stripped"),
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("10 \\text{ dollars}", "10"),
        ("5.000", "5"),
        ("k = 3", "3"),
        ("1/2", "\\frac{1}{2}"),
        ("3 and 4", "34"),  # ToRA deletes every "and"
        ("2j", "2i"),  # and reads a lone j as the imaginary unit
        ("x \\in [-2,7]", "x\\in[-2,7]"),  # only "x\\in" without a space is dropped
    ],
)
def test_tora_strip(raw: str, stripped: str) -> None:
    assert tora_strip(raw) == stripped
