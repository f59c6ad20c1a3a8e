"""`tora grade`: formats, --json shape, --pairs, --diff, exit codes on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import HEAD5, tora_in_process

from tora.record.schema import Generation, Problem, PromptRef, Result, Runtime, Sampling, TextStep, Trajectory

# HEAD5's rows (reference, ToRA's prediction): 18/18, 3/3, 70000/10000, 540/540, 20/140: 3 of 5 right.
HEAD5_CORRECT = ["0", "1", "3"]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return tora_in_process(argv, capsys)


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]  # every stdout line must be JSON


def _trajectory(pid: str, answer: str | None, text: str, final: str | None) -> Trajectory:
    return Trajectory(
        problem=Problem(id=pid, text="q", answer=answer, source="test"),
        generation=Generation(
            backend="replay", model="m", spec="replay:x", prompt_template=PromptRef(name="t", sha256="0"),
            sampling=Sampling(), max_tool_calls=4,
        ),
        runtime=Runtime(),
        prompt="",
        steps=[TextStep(content=text)],
        result=Result(final_answer=final, extracted_by="boxed" if final else None, finish="answered" if final else "no_answer"),
    )


@pytest.fixture
def trajectories(tmp_path: Path) -> Path:
    f = tmp_path / "run.jsonl"
    records = [
        _trajectory("a", "18", "So $\\boxed{18}$.", "18"),
        _trajectory("b", "0.5", "Half: $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        _trajectory("c", "7", "I think it is 6", None),  # re-extracted: last number
        _trajectory("d", "3", "no idea", None),  # empty
        _trajectory("e", None, "$\\boxed{4}$", "4"),  # no reference
    ]
    f.write_text("".join(t.model_dump_json() + "\n" for t in records))
    return f


def test_released_json_summary(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["grade", str(HEAD5), "--grader", "tora-compat", "--json"], capsys)
    assert code == 0
    lines = json_lines(out)
    summary = lines[-1]
    assert len(lines) == 6  # five items, then the summary
    assert {"accuracy", "total", "correct", "wrong", "empty", "unparsed", "timeout", "error"} <= set(summary)
    assert summary["format"] == "released" and summary["total"] == 5
    assert (summary["accuracy"], summary["correct"], summary["wrong"], summary["accuracy_pct"]) == (0.6, 3, 2, 60.0)
    assert [line["id"] for line in lines[:-1] if line["equal"]] == HEAD5_CORRECT
    assert summary["pred_mismatches"] == 0
    assert {"id", "pred", "ref", "equal", "status", "extracted_by"} <= set(lines[0])


def test_trajectories(trajectories: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["grade", str(trajectories), "--json"], capsys)
    assert code == 0
    *items, summary = json_lines(out)
    assert [(i["id"], i["pred"], i["equal"], i["extracted_by"]) for i in items] == [
        ("a", "18", True, "boxed"),
        ("b", "\\frac{1}{2}", True, "boxed"),
        ("c", "6", False, "last_number"),
        ("d", None, False, None),
        ("e", "4", None, "boxed"),
    ]
    assert summary["format"] == "trajectories"
    assert (summary["correct"], summary["wrong"], summary["empty"], summary["no_reference"]) == (2, 1, 1, 1)
    assert summary["accuracy"] == 0.5  # over the four items that have a reference


def test_plain_output_when_not_a_terminal(trajectories: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["grade", str(trajectories)], capsys)
    assert code == 0
    assert "accuracy_pct: 50.0" in out
    assert "\x1b[" not in out


def test_diff_lists_disagreements(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "released.jsonl"
    rows = [
        {"idx": 1, "question": "q", "gt": "5", "code": ["The answer: $\\boxed{0.05}$"], "pred": ["0.05"]},
        {"idx": 2, "question": "q", "gt": "18", "code": ["$\\boxed{18}$"], "pred": ["18"]},
        {"idx": 3, "question": "q", "gt": "18", "code": ["$\\boxed{18 \\text{ dollars}}$ and 18 dollars"], "pred": ["18"]},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = run(["grade", str(f), "--diff", "--json"], capsys)
    assert code == 0
    *diffs, summary = json_lines(out)
    assert [d["id"] for d in diffs] == ["1"]
    assert diffs[0]["math-verify"]["equal"] is False and diffs[0]["tora-compat"]["equal"] is True
    assert summary["disagreements"] == 1
    code, out, _ = run(["grade", str(f), "--diff"], capsys)
    assert code == 0 and "1#0" in out and "disagreements: 1" in out


def test_pairs_json_one_line_per_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "pairs.jsonl"
    pairs = [
        {"pred": "\\frac12", "ref": "0.5"},
        {"pred": "0.33", "ref": "\\frac{1}{3}"},
        {"pred": 18, "ref": "18.0"},
        {"pred": None, "ref": "4"},
        {"pred": "\\frac{", "ref": "4"},
        {"pred": "\\cos\\frac{\\pi}{7}+\\cos\\frac{3\\pi}{7}+\\cos\\frac{5\\pi}{7}", "ref": "\\frac{1}{2}"},
    ]
    f.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    code, out, _ = run(["grade", "--pairs", str(f), "--json"], capsys)
    assert code == 0
    lines = json_lines(out)
    assert [(line["equal"], line["status"]) for line in lines] == [
        (True, "ok"), (False, "ok"), (True, "ok"), (False, "ok"), (False, "unparsed"), (False, "unsure"),
    ]
    assert all(isinstance(line["equal"], bool) for line in lines)
    code, out, _ = run(["grade", "--pairs", str(f), "--json", "--grader", "tora-compat"], capsys)
    assert [line["grader"] for line in json_lines(out)] == ["tora-compat"] * 6
    code, out, _ = run(["grade", "--pairs", str(f)], capsys)
    assert code == 0 and "unsure: 1" in out and "unparsed: 1" in out


@pytest.mark.parametrize(
    ("content", "args", "expected"),
    [
        ('{"pred": "1", "ref": "1"}\n{"pred": "2"\n', ["--pairs"], ":2:"),
        ('{"pred": "1", "ref": "1"}\n{"pred": "2"}\n', ["--pairs"], ":2: field 'ref'"),
        ('{"ref": "1"}\n', ["--pairs"], ":1: field 'pred'"),
        ('{"pred": [1], "ref": "1"}\n', ["--pairs"], ":1: field 'pred'"),
        ('{"pred": "1", "ref": "1"}\n', [], ":1: neither"),
        ('{"question": "q", "answer": "1"}\n', [], "looks like a data set"),
        ('{"idx": 1, "question": "q", "code": "x"}\n{"idx": 2, "question": "q"}\n', [], ":2: field 'code'"),
        ('{"schema_version": "1.0", "problem": {}}\n', [], ":1: field 'problem.id'"),
        ("", [], "empty file"),
    ],
)
def test_bad_input_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, args: list[str], expected: str
) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    code, out, err = run(["grade", str(f), *args], capsys)
    assert code == 2
    assert expected in err and str(f) in err
    assert len(err.strip().splitlines()) == 1
    assert out == ""


def test_missing_file_and_bad_grader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["grade", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 2 and "nope.jsonl" in err
    code, _, err = run(["grade", str(HEAD5), "--grader", "sympy"], capsys)
    assert code == 2 and "sympy" in err


def test_real_command_line() -> None:
    """Through the installed entry point: exit code and JSON on stdout only."""
    proc = subprocess.run(
        [sys.executable, "-m", "tora.cli.main", "grade", str(HEAD5), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["grader"] == "math-verify" and (summary["accuracy"], summary["correct"]) == (0.6, 3)


def test_grade_trajectory_api_for_eval() -> None:
    from tora.grading import grade_trajectory, with_grade

    t = _trajectory("x", "0.5", "```python\nprint(1/2)\n```\n```output\n0.5\n```\nSo $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}")
    for grader in ("math-verify", "tora-compat"):
        graded = grade_trajectory(t, grader)
        assert (graded.id, graded.extracted_by, graded.result.equal) == ("x", "boxed", True)
        updated = with_grade(t, graded)
        assert (updated.result.correct, updated.result.grader, updated.result.grade_status) == (True, grader, "ok")
        assert updated.result.final_answer == "\\frac{1}{2}" and t.result.correct is None


def test_grade_timeout_and_its_old_spelling(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`--grade-timeout` is the grader's; `--timeout` (a cell's wall time in every other verb) still
    works here for one release, with a warning on stderr and nothing else changed."""
    import tora.cli.grade

    seen: list[float] = []
    real = tora.cli.grade.grade_many

    def spy(pairs: Any, grader: str, timeout: float) -> Any:
        seen.append(timeout)
        return real(pairs, grader, timeout)

    monkeypatch.setattr(tora.cli.grade, "grade_many", spy)
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"pred": "1", "ref": "1"}\n')
    code, new_out, new_err = run(["grade", "--pairs", str(f), "--json", "--grade-timeout", "7"], capsys)
    assert code == 0 and "warning" not in new_err
    code, old_out, old_err = run(["grade", "--pairs", str(f), "--json", "--timeout", "9"], capsys)
    assert code == 0 and "--grade-timeout" in old_err and old_out == new_out
    assert seen == [7.0, 9.0]
