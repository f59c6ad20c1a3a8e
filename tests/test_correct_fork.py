"""`tora correct` builds a wrong trajectory's prefix state once and forks it for each continuation
(tora.prefix_kernels), with real pool kernels and replayed models; each record says how its kernel
got the prefix's state (`kernel_state`, schema 1.3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import write_released
from test_correct import records, run

# The parent drew x (its kernel is gone by the time of `tora correct`): the re-run draws another,
# so its second cell, which shows x, cannot come out as recorded.
DRAW = ("Draw.\n```python\nimport random\nx = random.random()\nprint(x < 2)\n```\n```output\nTrue\n```\n"
        "Then.\n```python\nprint(round(x, 12))\n```\n```output\n0.5\n```\nSo $\\boxed{6}$.")
# The same, leaving a thread running: no snapshot can be taken, so each fork re-runs the cells.
THREAD = DRAW.replace("import random\n", "import random, threading, time\n"
                      "threading.Thread(target=time.sleep, args=(30,), name='sleeper', daemon=True).start()\n")
# The teacher shows the x its kernel holds.
TEACHER = "Check x.\n```python\nprint(round(x, 12))\n```\n```output\n0.5\n```\nSo $\\boxed{12}$."


def corrected(tmp_path: Path, parent: str) -> list[dict[str, Any]]:
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"id": "p", "question": "What is p?", "answer": "12"}) + "\n")
    samples = write_released(tmp_path / "samples.jsonl", [{"idx": "p", "question": "What is p?", "code": [parent]}])
    out = tmp_path / "run"
    proc = run(["curate", str(data), "--model", f"replay:{samples}", "--samples", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    teacher = write_released(tmp_path / "teacher.jsonl", [{"idx": "p", "question": "What is p?", "code": [TEACHER]}])
    proc = run(["correct", str(out), "--teacher", f"replay:{teacher}"])
    assert proc.returncode == 0, proc.stderr
    attempts = records(out / "corrections.jsonl")
    assert len(attempts) == 4  # from line 1, after the first output, after "Then.", after the second output
    return sorted(attempts, key=lambda r: r["prefix_lines"])  # 0, 1, 1 and 2 prefix cells


def shown_x(record: dict[str, Any]) -> str:
    """What the teacher's cell printed: the x of the kernel it continued in."""
    return str(record["steps"][-2]["stdout"])


def test_continuations_of_one_parent_share_one_prefix_state_and_name_the_diverged_cell(tmp_path: Path) -> None:
    none, one, also_one, two = corrected(tmp_path, DRAW)
    assert none["kernel_state"] is None  # no cell before line 1: a fresh kernel, nothing to make
    for r in (one, also_one):
        state = r["kernel_state"]
        assert state["method"] == "fork" and state["cells"] == 1 and state["snapshot_bytes"] > 0, state
        assert state["diverged"] == []  # `print(x < 2)` came out as recorded
    # The last continuation takes the shared kernel itself: it re-ran the cells; the second,
    # showing the parent's x, came out otherwise than recorded, and the record says so.
    assert two["kernel_state"] == {"method": "replay", "cells": 2, "reason": "", "diverged": [1],
                                   "snapshot_bytes": 0}
    # One state for all: every continuation sees the same x (re-running the cells per
    # continuation, as before, draws a new one each time).
    xs = {shown_x(r) for r in (one, also_one, two)}
    assert len(xs) == 1 and xs != {"0.5\n"}, xs
    assert "NameError" in none["steps"][-2]["rendered"] or none["steps"][-2]["status"] == "error"


def test_a_prefix_that_left_a_thread_running_is_replayed_with_the_reason(tmp_path: Path) -> None:
    _, one, also_one, two = corrected(tmp_path, THREAD)
    for r in (one, also_one):
        state = r["kernel_state"]
        assert state["method"] == "replay" and state["cells"] == 1 and "sleeper" in state["reason"], state
        assert state["diverged"] == []
    assert two["kernel_state"]["method"] == "replay" and two["kernel_state"]["diverged"] == [1]
    # Each replay drew its own x: the records say replay, and the outputs show why it matters.
    assert len({shown_x(r) for r in (one, also_one, two)}) == 3
