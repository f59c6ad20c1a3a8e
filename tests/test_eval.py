"""`tora eval` as a user runs it: replayed ToRA completions through tora's loop
and kernel, graded, recorded, resumable; and one run with the real model."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import HEAD, ROOT, TORA, write_released

REPLAY = f"replay:{HEAD}"  # the first 15 rows of ToRA-Code-34B on GSM8K
GSM8K_SHA256 = "9f098df7ff4522078d6ccec27a5c38a454790fdb51131bedfaa0e490070d5394"  # GSM8K's test.jsonl


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TORA, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line
    return out


# Each row's prediction against its reference, read off the file by hand: 8 of 15 are right.
EXPECTED = {str(i): i in {0, 1, 3, 5, 6, 9, 10, 11} for i in range(15)}


def test_replayed_gsm8k_head_scores_what_the_rows_say(tmp_path: Path) -> None:
    expected = EXPECTED
    out = tmp_path / "run"
    proc = run(["eval", "gsm8k", "--model", REPLAY, "--grader", "tora-compat", "--limit", "15", "--out", str(out),
                "--json"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, "with --json stdout holds the metrics line only"
    metrics = json.loads(lines[0])
    assert metrics["accuracy"] == round(8 / 15, 6)
    assert metrics["correct"] == 8 and metrics["trajectories"] == 15
    assert metrics["missing"] == 0 and metrics["complete"] is True and metrics["errors"] == 0
    assert metrics["empty_answers"] == 0 and metrics["timeouts"] == 0 and metrics["exec_error_rate"] == 0
    assert metrics["mean_tool_calls"] == 1.0 and metrics["finish"] == {"answered": 15}
    assert metrics["pass_at_k"] == metrics["accuracy"] and "maj_at_k" not in metrics
    assert json.loads((out / "metrics.json").read_text()) == metrics
    # Each trajectory carries its verdict, and the verdicts match grading the recorded rows.
    recs = records(out / "trajectories.jsonl")
    assert {r["problem"]["id"]: r["result"]["correct"] for r in recs} == expected
    assert {(r["result"]["grader"], r["result"]["grade_status"], r["origin"]) for r in recs} == {
        ("tora-compat", "ok", "replayed")}
    manifest = json.loads((out / "manifest.json").read_text())
    # The copy that was read: $TORA_DATA_DIR's, else ../shared/data beside the checkout, else the shipped one.
    read = Path(manifest["dataset"]["path"])
    copies = [Path(os.environ.get("TORA_DATA_DIR", "/nonexistent")), ROOT.parent / "shared" / "data", ROOT / "tora" / "datasets"]
    assert read == next(c / "gsm8k" / "test.jsonl" for c in copies if (c / "gsm8k" / "test.jsonl").is_file()).resolve()
    assert manifest["dataset"]["sha256"] == hashlib.sha256(read.read_bytes()).hexdigest() == GSM8K_SHA256
    assert manifest["model"] == REPLAY and manifest["grader"] == "tora-compat" and "--limit" in manifest["argv"]
    assert manifest["config"]["limits"]["max_tool_calls"] == 4 and {"python", "sympy", "math-verify"} <= manifest["versions"].keys()
    # Progress and the table went to stderr.
    assert "eval 15/15" in proc.stderr and "accuracy" in proc.stderr


def _scripted(tmp_path: Path, delay: float = 0.0) -> tuple[Path, Path]:
    """A user data file and matching completions: three problems x three samples, with types and levels."""
    pause = f"import time; time.sleep({delay})\n" if delay else ""

    def says(n: int) -> str:
        return f"```python\n{pause}print({n})\n```\n```output\n{n}\n```\nSo $\\boxed{{{n}}}$."

    answers = {"a": (6, [6, 5, 6], "algebra", 1), "b": (7, [1, 7, 1], "algebra", 2), "c": (8, [2, 3, 2], "geometry", 2)}
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"id": pid, "question": f"Q {pid}?", "answer": str(ref), "type": t, "level": lv})
                            + "\n" for pid, (ref, _, t, lv) in answers.items()))
    released = write_released(tmp_path / "samples.jsonl", [
        {"idx": pid, "question": f"Q {pid}?", "code": [says(n) for n in ns]} for pid, (_, ns, _, _) in answers.items()])
    return data, released


def test_a_competition_set_by_name_reports_pass_at_1_over_k_beside_maj_and_pass_at_k(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORA_DATA_DIR", str(ROOT / "tests" / "data" / "competition"))

    def says(answer: str) -> str:
        return f"```python\nprint({answer})\n```\n```output\n{answer}\n```\nSo $\\boxed{{{answer}}}$."

    # AIME 2024 I 1 (204): right twice; I 2 (113): right once of two, and the tie goes to sample 0.
    released = write_released(tmp_path / "samples.jsonl", [
        {"idx": 60, "question": "q", "code": [says("204"), says("204")]},
        {"idx": 61, "question": "q", "code": [says("113"), says("5")]},
    ])
    proc = run(["eval", "aime24", "--model", f"replay:{released}", "--samples", "2", "--out", str(tmp_path / "o"),
                "--json"])
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert (m["dataset"], m["trajectories"], m["correct"]) == ("aime24", 4, 3)
    assert (m["pass_at_1"], m["maj_at_k"], m["pass_at_k"]) == (0.75, 1.0, 1.0)
    assert "pass@1 (mean of 2)" in proc.stderr and "maj@2" in proc.stderr
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["prompt"]["name"] == "tora-math"  # a competition set, and a model with no prompt of its own


def test_samples_give_maj_and_pass_at_k_and_per_group_accuracy(tmp_path: Path) -> None:
    data, released = _scripted(tmp_path)
    proc = run(["eval", str(data), "--model", f"replay:{released}", "--samples", "3", "--out", str(tmp_path / "o"),
                "--json", "--grader", "math-verify"])
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    # a: 2/3 right (majority right); b: 1/3 (majority wrong, pass); c: 0/3.
    assert (m["trajectories"], m["correct"], m["samples"]) == (9, 3, 3)
    assert m["accuracy"] == round(3 / 9, 6)
    assert m["maj_at_k"] == round(1 / 3, 6) and m["pass_at_k"] == round(2 / 3, 6)
    assert m["pass_at_1"] == round((2 / 3 + 1 / 3 + 0) / 3, 6)
    assert m["by_type"] == {"algebra": {"n": 6, "correct": 3, "accuracy": 0.5},
                            "geometry": {"n": 3, "correct": 0, "accuracy": 0.0}}
    assert m["by_level"]["1"] == {"n": 3, "correct": 2, "accuracy": round(2 / 3, 6)}
    pairs = {(r["problem"]["id"], r["sample_index"]) for r in records(tmp_path / "o" / "trajectories.jsonl")}
    assert pairs == {(p, k) for p in "abc" for k in range(3)}


def test_resume_after_kill_9_skips_recorded_pairs_and_keeps_a_torn_line(tmp_path: Path) -> None:
    data, released = _scripted(tmp_path, delay=0.4)
    out = tmp_path / "o"
    args = ["eval", str(data), "--model", f"replay:{released}", "--samples", "3", "--out", str(out),
            "--concurrency", "1", "--grader", "math-verify"]
    proc = subprocess.Popen([*TORA, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ.copy(), start_new_session=True)
    traj = out / "trajectories.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not traj.exists() or len(traj.read_text().splitlines()) < 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its kernels, all at once, no clean-up
    proc.wait()
    before = traj.read_bytes()
    done_before = records(traj)
    assert 3 <= len(done_before) < 9
    # A crash mid-write leaves half a record at the end.
    with traj.open("ab") as f:
        f.write(before.splitlines(keepends=True)[0][:40])
    resumed = run([*args, "--resume", "--json"])
    assert resumed.returncode == 0, resumed.stderr
    after = traj.read_bytes()
    assert after.startswith(before + before.splitlines(keepends=True)[0][:40])  # nothing rewritten or deleted
    recs = records(traj)
    pairs = [(r["problem"]["id"], r["sample_index"]) for r in recs]
    assert len(pairs) == len(set(pairs)) == 9  # the recorded pairs were not run again
    m = json.loads(resumed.stdout)
    assert (m["trajectories"], m["correct"], m["resumed"], m["complete"]) == (9, 3, len(done_before), True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["skipped"] for r in manifest["runs"]] == [0, len(done_before)]


def test_usage_and_data_errors_exit_2(tmp_path: Path) -> None:
    data, released = _scripted(tmp_path)
    out = tmp_path / "o"
    assert run(["eval", str(data), "--model", f"replay:{released}", "--out", str(out), "--json"]).returncode == 0
    again = run(["eval", str(data), "--model", f"replay:{released}", "--out", str(out)])
    assert again.returncode == 2 and "--resume" in again.stderr
    unknown = run(["eval", "no-such-set", "--model", f"replay:{released}"])
    assert unknown.returncode == 2 and "not a data set name" in unknown.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answer": "1"}\n{"answer": "2"}\n')
    broken = run(["eval", str(bad), "--model", f"replay:{released}", "--out", str(tmp_path / "b")])
    assert broken.returncode == 2 and f"{bad}:2" in broken.stderr and "question" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1


def test_a_run_where_every_trajectory_fails_exits_1(tmp_path: Path) -> None:
    other = write_released(tmp_path / "other.jsonl", [{"idx": "zz", "question": "Unrelated?", "code": ["x"]}])
    proc = run(["eval", "gsm8k", "--limit", "2", "--model", f"replay:{other}", "--out", str(tmp_path / "o"), "--json"])
    assert proc.returncode == 1 and "no recorded trajectory" in proc.stderr
    assert json.loads(proc.stdout)["errors"] == 2  # still measured and recorded
    assert len(records(tmp_path / "o" / "trajectories.jsonl")) == 2


@pytest.mark.model
def test_real_embedded_model_on_twenty_gsm8k_problems(tmp_path: Path) -> None:
    out = tmp_path / "o"
    # Accuracy will be low; the point is that the run completes and every trajectory is recorded and graded.
    proc = run(["eval", "gsm8k", "--limit", "20", "--model", "embedded-tiny", "--out", str(out), "--json"], timeout=900)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["trajectories"] == 20 and m["complete"] is True and m["grader"] == "math-verify"
    recs = records(out / "trajectories.jsonl")
    assert len(recs) == 20 and {r["generation"]["backend"] for r in recs} == {"llama.cpp"}
    assert all(r["result"]["grade_status"] is not None for r in recs)


def test_resume_refuses_a_changed_run_and_a_second_writer(tmp_path: Path) -> None:
    """Every setting that changes what a trajectory is must match on --resume (exit 2 naming it and
    both values; nothing written), and two evals cannot write one folder at once."""
    from tora.run_dir import locked

    out = tmp_path / "run"
    base = ["eval", "gsm8k", "--model", REPLAY, "--limit", "3", "--out", str(out)]
    assert run(base).returncode == 0
    before = {name: (out / name).read_bytes() for name in ("manifest.json", "trajectories.jsonl")}
    assert json.loads(before["manifest.json"])["settings"]["temperature"] == 0.0
    for extra, needle in [
        (["--temperature", "0.7"], "--temperature 0.0, not 0.7"),
        (["--prompt", "tora-math"], "--prompt tora-gsm8k, not tora-math"),
        (["--max-tool-calls", "2"], "--max-tool-calls 4, not 2"),
        (["--timeout", "3"], "--timeout 10.0, not 3.0"),
        (["--run-on", "output"], "--run-on close, not output"),
        (["--fresh-namespace"], "--fresh-namespace False, not True"),
        (["--memory-mb", "1024"], "--memory-mb 2048, not 1024"),
    ]:
        proc = run([*base, "--resume", *extra])
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    other = run(["eval", "gsm8k", "--model", f"replay:{ROOT / 'tests' / 'data' / 'released_gsm8k_head5.jsonl'}",
                 "--limit", "3", "--out", str(out), "--resume"])
    assert other.returncode == 2 and "--model" in other.stderr
    assert {name: (out / name).read_bytes() for name in before} == before  # the manifest was not overwritten
    # What only changes the speed may differ; the same settings resume.
    assert run([*base, "--resume", "--concurrency", "2"]).returncode == 0
    with locked(out, "test"):
        held = run([*base, "--resume"])
    assert held.returncode == 2 and "another tora run" in held.stderr
