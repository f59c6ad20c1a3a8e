"""`tora replay FILE`: recorded cells re-run in fresh kernels, differences reported."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import HEAD, TORA, write_released

TWO_BLOCKS = ("```python\nx = 21\nprint(x)\n```\n```output\n21\n```\n"
              "```python\nprint(x * 2)\n```\n```output\n42\n```\nSo $\\boxed{42}$.")


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TORA, *args], capture_output=True, text=True, timeout=120, env=os.environ.copy())


def replay_json(path: Path, *extra: str) -> dict[str, Any]:
    proc = run(["replay", str(path), "--json", *extra])
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stderr or "with --json stdout holds the summary line only"
    summary: dict[str, Any] = json.loads(lines[0])
    # A difference (or a cell that could not run) fails a script: exit 4; a clean replay exits 0.
    assert proc.returncode == (4 if summary["differ"] or summary["errors"] else 0), proc.stderr
    return summary


@pytest.fixture(scope="module")
def tora_records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tora's own records of the 15 rows, made by `tora eval` (the default render policy)."""
    base = tmp_path_factory.mktemp("records")
    env = {**os.environ, "TORA_HOME": str(base / "home")}
    proc = subprocess.run([*TORA, "eval", "gsm8k", "--model", f"replay:{HEAD}", "--limit", "15", "--out",
                           str(base / "run"), "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return base / "run" / "trajectories.jsonl"


def test_released_rows_replay_with_no_difference() -> None:
    s = replay_json(HEAD)
    assert (s["trajectories"], s["cells"], s["same"], s["differ"], s["errors"]) == (15, 15, 15, 0, 0)
    assert s["differences"] == [] and s["complete"] is True and s["wall_s"] > 0


def test_one_tampered_released_output_is_the_one_difference(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in HEAD.read_text().splitlines()]
    rows[4]["code"][0] = rows[4]["code"][0].replace("```output\n140\n```", "```output\n141\n```")
    s = replay_json(write_released(tmp_path / "tampered.jsonl", rows))
    assert (s["cells"], s["same"], s["differ"], s["errors"]) == (15, 14, 1, 0)
    [d] = s["differences"]
    assert (d["id"], d["cell"], d["recorded"], d["new"], d["status"]) == ("4", 0, "141", "140", "ok")


def test_tora_records_replay_clean_and_a_tampered_one_is_reported(tmp_path: Path, tora_records: Path) -> None:
    s = replay_json(tora_records)
    assert (s["trajectories"], s["cells"], s["differ"], s["errors"]) == (15, 15, 0, 0)
    lines = tora_records.read_text().splitlines()
    record = json.loads(lines[7])
    [step] = [st for st in record["steps"] if st["type"] == "execution"]
    step["rendered"] = "999"
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join([*lines[:7], json.dumps(record), *lines[8:]]) + "\n")
    s = replay_json(tampered, "--limit", "10")
    assert (s["trajectories"], s["cells"], s["same"], s["differ"]) == (10, 10, 9, 1)
    [d] = s["differences"]
    assert (d["id"], d["cell"], d["recorded"]) == (record["problem"]["id"], 0, "999")
    # The new output is what ToRA's own run printed for that problem.
    row = next(json.loads(line) for line in HEAD.read_text().splitlines() if str(json.loads(line)["idx"]) == d["id"])
    assert d["new"] == row["code"][0].split("```output\n")[1].split("\n```")[0]
    # The human report names the problem, the cell and both outputs on one line.
    human = run(["replay", str(tampered), "--limit", "10"])
    assert human.returncode == 4
    assert f"{d['id']} cell 0: recorded '999' -> new {d['new']!r}" in human.stdout
    assert "10 trajectories, 10 cells: 9 same, 1 differ, 0 errors" in human.stdout


def test_state_is_kept_within_a_trajectory_unless_asked_otherwise(tmp_path: Path) -> None:
    path = write_released(tmp_path / "two.jsonl", [{"idx": 0, "question": "Q?", "code": [TWO_BLOCKS]}])
    assert replay_json(path)["differ"] == 0
    alone = replay_json(path, "--fresh-namespace")
    assert alone["differ"] == 1 and "NameError" in alone["differences"][0]["new"]


def test_bad_files_exit_2(tmp_path: Path) -> None:
    missing = run(["replay", str(tmp_path / "nope.jsonl")])
    assert missing.returncode == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"idx": 1, "question": "Q"}\n')
    proc = run(["replay", str(bad)])
    assert proc.returncode == 2 and f"{bad}:1" in proc.stderr and "code" in proc.stderr
