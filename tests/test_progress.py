"""The plain progress line (CI logs, pipes): what it says must be true when it is printed."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import tora.progress
from tora.progress import BatchProgress


def test_a_plain_line_shows_the_score_with_its_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tora.progress, "PLAIN_EVERY_S", 0.0)  # print at every refresh
    text = io.StringIO()
    console = Console(file=text, force_terminal=False, width=200)
    with BatchProgress(console, "eval", 20) as progress:
        progress.advance(True)
        progress.advance(False)
    lines = text.getvalue().splitlines()
    # Never "eval 0/20 ... acc 100.0%": the count moved with the score.
    assert lines[0].startswith("eval 1/20 ") and "acc 100.0%" in lines[0], lines
    assert lines[1].startswith("eval 2/20 ") and "acc 50.0%" in lines[1], lines
