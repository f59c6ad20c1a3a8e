"""Output-space shaping: where a wrong trajectory may be cut, an episode that starts from a
prefix (kernel state rebuilt, context copied byte for byte), and `tora correct` on a
curated run folder, with the real kernel and replayed models."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, TORA, write_released

from tora.backends.replay import ReplayBackend
from tora.correction import choose_prefixes, cut_points, prefix_of
from tora.engine import Episode, Limits, SolveConfig
from tora.events import Finished
from tora.kernels import FreshKernels, SandboxPolicy
from tora.prompts import load_prompt
from tora.record import SCHEMA_VERSION, CodeStep, ExecutionStep, Problem, Trajectory

WRONG = ("Let me set up.\n```python\ny = 3\nprint(y)\n```\n```output\n3\n```\n"
         "Now double it.\n```python\nprint(y + y)\n```\n```output\n6\n```\nSo $\\boxed{6}$.")
RIGHT = "```python\nprint(12)\n```\n```output\n12\n```\nSo $\\boxed{12}$."
# The teacher's continuation uses `y`, which only the prefix's cell defines.
TEACHER = "I should multiply instead.\n```python\nprint(y * 4)\n```\n```output\n12\n```\nSo $\\boxed{12}$."
EVALSETS = ROOT / "tests" / "data" / "evalsets"


def lines(text: str, n: int) -> str:
    return "".join(text.splitlines(keepends=True)[:n])


async def solve(problem: Problem, backend: ReplayBackend, **kw: Any) -> Trajectory:
    episode = Episode(problem, backend=backend, template=load_prompt("tora-gsm8k"),
                      kernels=FreshKernels(SandboxPolicy(timeout_s=10)), config=SolveConfig(limits=Limits(timeout_s=10, **kw.pop("limits", {}))), **kw)
    events = [e async for e in episode.run()]
    assert isinstance(events[-1], Finished)
    return events[-1].trajectory


@pytest.fixture
async def parent(tmp_path: Path) -> Trajectory:
    path = write_released(tmp_path / "parent.jsonl", [{"idx": "p", "question": "Q?", "code": [WRONG]}])
    t = await solve(Problem(id="p", text="Q?", answer="12"), ReplayBackend(path))
    assert t.completion() == WRONG
    return t


async def test_cuts_fall_on_prose_lines_only(parent: Trajectory) -> None:
    # 1: after the first sentence; 8 and 15: after an output block; 9: after "Now double it."
    # Never inside a block, never between a python block and its output, never the whole text.
    assert cut_points(parent) == [1, 8, 9, 15]
    assert choose_prefixes(parent, None, 0) == [1, 8, 9, 15]
    two = choose_prefixes(parent, 2, seed=3)
    assert len(two) == 2 and set(two) <= {1, 8, 9, 15} and two == choose_prefixes(parent, 2, seed=3)
    assert {tuple(choose_prefixes(parent, 2, seed=s)) for s in range(20)} != {tuple(two)}  # the seed matters
    with pytest.raises(ValueError, match="not a place"):
        prefix_of(parent, 6)  # inside an output block


async def test_a_prefix_copies_whole_steps_and_a_cut_text_step(parent: Trajectory) -> None:
    for n in cut_points(parent):
        prefix = prefix_of(parent, n)
        assert prefix.prompt == parent.prompt and prefix.parent == parent.id and prefix.lines == n
        assert prefix.completion == lines(WRONG, n)
        # A code step comes with its execution, never alone.
        kinds = [type(s) for s in prefix.steps]
        assert all(kinds[i + 1] is ExecutionStep for i, k in enumerate(kinds) if k is CodeStep)
    assert prefix_of(parent, 9).cells == ["y = 3\nprint(y)\n"]
    assert prefix_of(parent, 15).cells == ["y = 3\nprint(y)\n", "print(y + y)\n"]


async def test_an_episode_continues_from_a_prefix_with_its_kernel_state_rebuilt(tmp_path: Path,
                                                                                parent: Trajectory) -> None:
    teacher = ReplayBackend(write_released(tmp_path / "t.jsonl", [{"idx": "p", "question": "Q?", "code": [TEACHER]}]))
    prefix = prefix_of(parent, 9)
    # One tool call allowed: the budget bounds what the teacher adds, not the prefix's call.
    t = await solve(parent.problem, teacher, prefix=prefix, origin="teacher_corrected", limits={"max_tool_calls": 1})
    assert t.context() == parent.prompt + lines(WRONG, 9) + TEACHER  # byte for byte, outputs re-produced
    assert t.steps[: len(prefix.steps)] == list(prefix.steps)
    new_cells = [s for s in t.steps[len(prefix.steps):] if isinstance(s, ExecutionStep)]
    assert [c.stdout for c in new_cells] == ["12\n"]  # `y` was defined by re-running the prefix's cell
    assert t.result.finish == "answered" and t.result.final_answer == "12"
    assert (t.parent, t.prefix_lines, t.origin) == (parent.id, 9, "teacher_corrected")
    assert t.stats.tool_calls == 2 and t.content_hash == t.compute_content_hash()
    # From line 1 nothing is rebuilt: the teacher's `y` is undefined, and the model sees so.
    early = await solve(parent.problem, teacher, prefix=prefix_of(parent, 1), origin="teacher_corrected")
    cell = next(s for s in early.steps if isinstance(s, ExecutionStep))
    assert cell.status == "error" and "NameError" in cell.rendered
    # The record round-trips with the new field.
    again = Trajectory.model_validate_json(t.model_dump_json())
    assert again.prefix_lines == 9 and again.schema_version == SCHEMA_VERSION


# -- the verb ------------------------------------------------------------------------------


def run(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TORA_DATA_DIR": str(EVALSETS)}
    return subprocess.run([*TORA, *args], capture_output=True, text=True, timeout=timeout, env=env)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def curated_run(tmp_path: Path) -> Path:
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"id": p, "question": f"What is {p}?", "answer": "12"}) + "\n" for p in "ab"))
    samples = write_released(tmp_path / "samples.jsonl", [
        {"idx": p, "question": f"What is {p}?", "code": [WRONG.replace("set up", f"set up {p}"), RIGHT]} for p in "ab"])
    out = tmp_path / "run"
    proc = run(["curate", str(data), "--model", f"replay:{samples}", "--samples", "2", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    return out


def test_tora_correct_keeps_the_teachers_correct_continuations_and_resumes(tmp_path: Path) -> None:
    out = curated_run(tmp_path)
    wrong = {r["id"]: r for r in records(out / "trajectories.jsonl") if r["result"]["correct"] is False}
    assert len(wrong) == 2 and len(records(out / "curated.jsonl")) == 2
    teacher = write_released(tmp_path / "teacher.jsonl", [
        {"idx": p, "question": f"What is {p}?", "code": [TEACHER, TEACHER]} for p in "ab"])
    args = ["correct", str(out), "--teacher", f"replay:{teacher}"]
    proc = run(args)
    assert proc.returncode == 0, proc.stderr
    attempts = records(out / "corrections.jsonl")
    assert sorted((r["parent"], r["prefix_lines"]) for r in attempts) == sorted(
        (pid, n) for pid in wrong for n in (1, 8, 9, 15))
    kept = [r for r in records(out / "curated.jsonl") if r["origin"] == "teacher_corrected"]
    # Line 1 is not kept: the teacher's cell failed there (no state to build on).
    assert sorted((r["parent"], r["prefix_lines"]) for r in kept) == sorted(
        (pid, n) for pid in wrong for n in (8, 9, 15))
    for r in kept:
        parent = Trajectory.model_validate(wrong[r["parent"]])
        t = Trajectory.model_validate(r)
        assert t.context() == parent.prompt + lines(parent.completion(), r["prefix_lines"]) + TEACHER
        assert t.result.correct is True and t.result.grader == "math-verify"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["correction"]["kept"] == 6 and metrics["correction"]["complete"] is True
    assert "curation" in metrics  # curate's figures stay beside the correction's
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["correct"]["teacher"] == f"replay:{teacher}" and manifest["command"] == "curate"
    # Again: nothing new is run or kept.
    before = (out / "corrections.jsonl").read_bytes(), (out / "curated.jsonl").read_bytes()
    assert run(args).returncode == 0
    assert ((out / "corrections.jsonl").read_bytes(), (out / "curated.jsonl").read_bytes()) == before
    # What a kill mid-write leaves: a group's kept lines cut short, half a record at the end of the log.
    curated = (out / "curated.jsonl").read_bytes().splitlines(keepends=True)
    (out / "curated.jsonl").write_bytes(b"".join(curated[:-1]))
    log = (out / "corrections.jsonl").read_bytes().splitlines(keepends=True)
    (out / "corrections.jsonl").write_bytes(b"".join(log) + log[0][:77])
    proc = run(args)
    assert proc.returncode == 0, proc.stderr
    assert "torn" in proc.stderr
    after = records(out / "curated.jsonl")
    assert sorted(r["id"] for r in after) == sorted(json.loads(c)["id"] for c in curated)  # restored, no duplicate
    log_after = records(out / "corrections.jsonl")
    assert len(log_after) == len(log) and len({(r["parent"], r["prefix_lines"]) for r in log_after}) == len(log)
    # The settings that decide what is kept cannot change under a run.
    other = run(["correct", str(out), "--teacher", f"replay:{teacher}", "--prefixes", "2"])
    assert other.returncode == 2 and "--prefixes" in other.stderr and len(other.stderr.strip().splitlines()) == 1


def test_sampled_prefixes_are_reproducible_and_bad_input_exits_2(tmp_path: Path) -> None:
    out = curated_run(tmp_path)
    teacher = write_released(tmp_path / "teacher.jsonl", [
        {"idx": p, "question": f"What is {p}?", "code": [TEACHER, TEACHER]} for p in "ab"])
    proc = run(["correct", str(out), "--teacher", f"replay:{teacher}", "--prefixes", "2", "--seed", "5"])
    assert proc.returncode == 0, proc.stderr
    chosen = {(r["parent"], r["prefix_lines"]) for r in records(out / "corrections.jsonl")}
    assert len(chosen) == 4
    parents = {r["id"]: Trajectory.model_validate(r) for r in records(out / "trajectories.jsonl")}
    assert chosen == {(pid, n) for pid in {c[0] for c in chosen} for n in choose_prefixes(parents[pid], 2, 5)}
    bad = run(["correct", str(out), "--teacher", f"replay:{teacher}", "--prefixes", "some"])
    assert bad.returncode == 2 and "--prefixes" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = run(["correct", str(empty), "--teacher", f"replay:{teacher}"])
    assert missing.returncode == 2 and "tora curate" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
