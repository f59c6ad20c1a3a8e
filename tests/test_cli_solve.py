"""`tora solve` as a user runs it: a subprocess, exit codes, streams, records."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import SURROGATE_CELL, TORA, write_released

ANSWERED = "Compute.\n```python\nprint(6 * 7)\n```\n```output\n42\n```\nSo $\\boxed{42}$."


def run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TORA, *args], capture_output=True, text=True, timeout=120, env=os.environ.copy(), **kw)  # type: ignore[call-overload, no-any-return]


def scripted(tmp_path: Path, completion: str, question: str = "What is 6*7?") -> Path:
    return write_released(tmp_path / "script.jsonl", [{"idx": 0, "question": question, "code": [completion]}])


def test_json_prints_one_trajectory_line_and_records_it(tmp_path: Path, tora_home: Path) -> None:
    model = f"replay:{scripted(tmp_path, ANSWERED)}"
    proc = run(["solve", "--model", model, "--json", "What is 6*7?"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    t = json.loads(lines[0])
    assert t["result"]["final_answer"] == "42" and t["result"]["finish"] == "answered"
    assert [s["type"] for s in t["steps"]] == ["text", "code", "execution", "text"]
    assert t["steps"][2]["stdout"] == "42\n" and t["generation"]["prompt_template"]["name"] == "tora-gsm8k"
    assert {"id", "schema_version", "problem", "sample_index", "runtime", "stats", "created_at"} <= t.keys()
    recorded = (tora_home / "trajectories" / "solve.jsonl").read_text().splitlines()
    assert json.loads(recorded[-1])["id"] == t["id"]


def test_plain_output_when_not_a_terminal_and_no_record(tmp_path: Path, tora_home: Path) -> None:
    model = f"replay:{scripted(tmp_path, ANSWERED)}"
    proc = run(["solve", "--model", model, "--no-record", "What is 6*7?"])
    assert proc.returncode == 0
    assert "```output\n42\n```" in proc.stdout and "answer: 42" in proc.stdout
    assert "\x1b[" not in proc.stdout
    # The footer shows what the model cost: its calls, their time and its speed.
    assert re.search(r"^1 tool call\(s\), \d+ tokens, [\d.]+s · 2 model call\(s\), [\d.]+s each, [\d.]+ tok/s$",
                     proc.stdout, re.MULTILINE), proc.stdout
    assert not (tora_home / "trajectories" / "solve.jsonl").exists()


def test_the_footer_speed_is_generated_tokens_over_the_model_calls_time(tmp_path: Path) -> None:
    from tora.cli.display import footer
    from tora.record.schema import Trajectory

    proc = run(["solve", "--model", f"replay:{scripted(tmp_path, ANSWERED)}", "--json", "--no-record", "What is 6*7?"])
    t = Trajectory.model_validate_json(proc.stdout)
    first, second = (s for s in t.steps if s.type == "text")
    first.t_start, first.t_end, first.completion_tokens = 0.0, 2.0, 20
    second.t_start, second.t_end, second.completion_tokens = 3.0, 5.0, 30  # the cell ran in between
    t.stats.completion_tokens, t.stats.wall_s = 50, 5.5
    assert footer(t) == "1 tool call(s), 50 tokens, 5.5s · 2 model call(s), 2.0s each, 12.5 tok/s"


def test_no_answer_exits_3(tmp_path: Path) -> None:
    model = f"replay:{scripted(tmp_path, 'I do not know.')}"
    proc = run(["solve", "--model", model, "--no-record", "What is 6*7?"])
    assert proc.returncode == 3


def test_bad_model_specs_are_one_line_usage_errors(tmp_path: Path) -> None:
    for spec, needle in [("nope:x", "unknown model kind 'nope'"), ("gguf:/no/such.gguf", "GGUF file not found"),
                         ("replay:", "needs a path"), ("hf:/tmp", "not a Hugging Face model directory")]:
        proc = run(["solve", "--model", spec, "What?"])
        assert proc.returncode == 2, (spec, proc.stderr)
        assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    proc = run(["solve", "--model", f"gguf:{broken}", "What?"])
    assert proc.returncode == 2 and "could not load" in proc.stderr


def test_bad_flags_exit_2(tmp_path: Path) -> None:
    assert run(["solve", "--max-tool-calls", "-1", "x"]).returncode == 2
    assert run(["solve", "--prompt", "no-such-template", "--model", f"replay:{scripted(tmp_path, ANSWERED)}", "x"]).returncode == 2


def test_repl_reads_problems_and_commands_from_a_pipe(tmp_path: Path, tora_home: Path) -> None:
    model = f"replay:{scripted(tmp_path, ANSWERED)}"
    proc = run(["solve", "--model", model], input="/help\nWhat is 6*7?\n/bogus\n/quit\nnever asked\n")
    assert proc.returncode == 0, proc.stderr
    assert "/new" in proc.stdout and "answer: 42" in proc.stdout and "unknown command /bogus" in proc.stdout
    records = [json.loads(line) for line in (tora_home / "trajectories" / "solve.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["origin"] == "interactive"


def test_ctrl_c_records_interrupted_trajectory_and_exits_130(tmp_path: Path, tora_home: Path) -> None:
    sleeper = "```python\nimport time\ntime.sleep(120)\n```\n```output\n\n```\n"
    model = f"replay:{scripted(tmp_path, sleeper)}"
    proc = subprocess.Popen([*TORA, "solve", "--model", model, "--timeout", "100", "What is 6*7?"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    record = tora_home / "trajectories" / "solve.jsonl"
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    seen = ""
    while "```" not in seen and time.monotonic() < deadline:
        seen += proc.stdout.read(1)
    time.sleep(1.5)  # the cell is running now
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    t = json.loads(record.read_text().splitlines()[-1])
    assert t["result"]["finish"] == "interrupted"


def test_version_and_help() -> None:
    proc = run(["--help"])
    assert proc.returncode == 0 and "solve" in proc.stdout
    assert subprocess.run([sys.executable, "-m", "tora.cli.main", "--version"], capture_output=True, text=True).stdout.startswith("tora")


def test_sandbox_limits_come_from_flags_and_environment(tmp_path: Path) -> None:
    model = f"replay:{scripted(tmp_path, ANSWERED)}"
    proc = run(["solve", "--model", model, "--json", "--no-record", "--isolation", "none", "--memory-mb", "512", "What is 6*7?"])
    assert proc.returncode == 0, proc.stderr
    kernel = json.loads(proc.stdout)["runtime"]["kernel"]
    assert "512" in json.dumps(kernel) and "none" in json.dumps(kernel)
    env = dict(os.environ, TORA_SANDBOX_NO_SUCH="1")
    bad = subprocess.run([*TORA, "solve", "--model", model, "x"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "TORA_SANDBOX_NO_SUCH" in bad.stderr


def test_repl_ctrl_c_interrupts_the_cell_and_keeps_the_session(tmp_path: Path, tora_home: Path) -> None:
    script = write_released(tmp_path / "two.jsonl", [
        {"idx": "a", "question": "first", "code": ["```python\nx = 5\nimport time\ntime.sleep(120)\n```\n```output\n\n```\n"]},
        {"idx": "b", "question": "second", "code": ["```python\nprint(x + 1)\n```\n```output\n6\n```\nSo $\\boxed{6}$."]},
    ])
    proc = subprocess.Popen([*TORA, "solve", "--model", f"replay:{script}", "--timeout", "100"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("first\n")
    proc.stdin.flush()
    seen = ""
    deadline = time.monotonic() + 60
    while "```" not in seen and time.monotonic() < deadline:
        seen += proc.stdout.read(1)
    time.sleep(1.5)  # the sleeping cell is running
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    out, err = proc.communicate("second\n/quit\n", timeout=60)
    assert proc.returncode == 0, err
    assert "interrupted; the session and its variables are kept" in out
    assert "answer: 6" in out  # x survived the interrupt: same kernel
    records = [json.loads(line) for line in (tora_home / "trajectories" / "solve.jsonl").read_text().splitlines()]
    assert [r["result"]["finish"] for r in records] == ["interrupted", "answered"]


def test_lone_surrogates_in_a_cells_output_reach_the_record_export_and_report(tmp_path: Path, tora_home: Path) -> None:
    completion = f"Compute.\n```python\n{SURROGATE_CELL}```\n```output\n42\n```\nSo $\\boxed{{42}}$."
    model = f"replay:{scripted(tmp_path, completion)}"
    for extra in ([], ["--json"]):
        proc = subprocess.run([*TORA, "solve", "--model", model, *extra, "What is 6*7?"], capture_output=True,
                              timeout=120, env=os.environ.copy())
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert "a\ufffdb" in proc.stdout.decode("utf-8")
    recorded = tora_home / "trajectories" / "solve.jsonl"
    steps = [json.loads(line)["steps"] for line in recorded.read_text(encoding="utf-8").splitlines()]
    assert len(steps) == 2 and all(s[2]["stdout"] == "a\ufffdb\n42\n" for s in steps), steps
    proc = run(["export", str(recorded), "-f", "tora"])
    assert proc.returncode == 0 and "a\ufffdb" in proc.stdout, proc.stderr
    proc = run(["report", str(recorded)])
    assert proc.returncode == 0, proc.stderr
    assert "a\ufffdb" in recorded.with_name("solve.report.html").read_text(encoding="utf-8")
