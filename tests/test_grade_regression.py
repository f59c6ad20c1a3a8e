"""ToRA-Code-34B's released greedy GSM8K outputs regrade to the published 80.7.

In `tora-compat` mode every extracted prediction must equal ToRA's own `pred`
and the accuracy must round to the figure in the `.metrics` file beside the
outputs. The `math-verify` figure differs on exactly two items, both where
ToRA's percentage rule accepts x/100 or x*100 (see `EXPECTED_DISAGREEMENTS`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tora.grading import grade_released
from tora.released import ReleasedItem, read_released

RELEASED = (
    Path(__file__).resolve().parents[1].parent
    / "shared/data/released/tora-code-34b-v1.0/gsm8k/test_tora_-1_seed0_t0.0_s0_e1319.jsonl"
)

# idx: (reference, prediction, correct under tora-compat, correct under math-verify)
EXPECTED_DISAGREEMENTS = {
    "191": ("5", "0.05", True, False),  # 5 pounds a day; 0.05 is wrong, ToRA's x/100 variant accepts it
    "806": ("70", "0.7", True, False),  # a pass rate of 70%; 0.7 is the same rate
}


def _published() -> float:
    text = RELEASED.with_suffix(".metrics").read_text()
    m = re.search(r"Mean score:\s*\[([\d.]+)\]", text)
    assert m, text
    return float(m.group(1))


@pytest.fixture(scope="module")
def items() -> list[ReleasedItem]:
    return list(read_released(RELEASED))


def test_tora_compat_reproduces_published_accuracy(items: list[ReleasedItem]) -> None:
    graded = grade_released(items, "tora-compat")
    assert len(graded) == len(items) == 1319
    mismatched = [(g.id, g.pred, g.released_pred) for g in graded if g.pred != g.released_pred]
    assert mismatched == []
    correct = sum(g.result.correct for g in graded)
    assert round(100 * correct / len(graded), 1) == _published() == 80.7
    # The one prediction that is not a number (a docstring after "boxed") is unparsed, not silently False.
    assert [(g.id, g.result.status) for g in graded if g.result.status != "ok"] == [("146", "unparsed")]
    assert not any(g.result.status == "timeout" for g in graded)


def test_math_verify_figure_and_disagreements(items: list[ReleasedItem]) -> None:
    tora = grade_released(items, "tora-compat")
    mv = grade_released(items, "math-verify")
    disagree = {
        a.id: (a.ref, b.pred, a.result.correct, b.result.correct)
        for a, b in zip(tora, mv, strict=True)
        if a.result.correct != b.result.correct
    }
    assert disagree == EXPECTED_DISAGREEMENTS
    correct = sum(g.result.correct for g in mv)
    assert correct == sum(g.result.correct for g in tora) - 2
    print(f"math-verify: {correct}/{len(mv)} = {100 * correct / len(mv):.1f}")
