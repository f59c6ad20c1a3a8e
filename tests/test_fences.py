from tora import fences

DOCSTRING_BOXED = '''Let me write it.
```python
def answer():
    """Count the boxed set of items."""
    return 3 * 4
print(answer())
```
'''


def test_code_mentioning_boxed_is_run_not_taken_as_final() -> None:
    assert fences.code_to_run(DOCSTRING_BOXED, stopped_at_output=True) is not None
    assert fences.final_boxed(DOCSTRING_BOXED) is None


def test_last_block_runs_only_when_nothing_follows_or_output_requested() -> None:
    text = "```python\nprint(1)\n```\nSo the answer is $\\boxed{1}$."
    assert fences.code_to_run(text, stopped_at_output=False) is None
    assert fences.final_boxed(text) == "1"
    assert fences.code_to_run("```python\nprint(2)\n```\n\n", stopped_at_output=False) == "print(2)\n"


def test_unclosed_block_is_not_final_and_not_run_unless_output_fence() -> None:
    cut = "Compute:\n```python\nx = 1\nprint('\\\\boxed{7}')"
    assert fences.in_open_block(cut)
    assert fences.code_to_run(cut, stopped_at_output=False) is None
    assert fences.final_boxed(cut) is None
    assert fences.code_to_run(cut, stopped_at_output=True) is not None


def test_boxed_brace_matching_and_last_wins() -> None:
    text = r"First $\boxed{2}$, then $\boxed{\frac{1}{\sqrt{2}}}$ and \boxed 5 ."
    assert fences.boxed_contents(text) == ["2", r"\frac{1}{\sqrt{2}}", "5"]
    assert fences.final_boxed(r"so \boxed{\{1, 2\}} done") == r"\{1, 2\}"


def test_boxed_inside_output_block_is_not_an_answer() -> None:
    text = "```output\n\\boxed{9}\n```\nno answer here"
    assert fences.final_boxed(text) is None


def test_blocks_positions_round_trip() -> None:
    text = "a\n```python\nx=1\n```\nb\n```output\n1\n```\n"
    found = fences.blocks(text)
    assert [b.lang for b in found] == ["python", "output"]
    assert text[found[1].start : found[1].end] == "```output\n1\n```\n"
