"""`tora export`: every format round-trips the record's content; the `tora`
text is the context the model saw; failed records, filters and bad input."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import TORA, tora_in_process
from trajectory_fixtures import HOSTILE, Cell, Spec, Turn, as_11, build, corpus

from tora.export.formats import openai_row, sharegpt_row, tora_row, trl_row
from tora.export.pairs import CorrectionStats, correction_rows, preference_rows
from tora.export.view import error_view, output_spans, question_offset, turns
from tora.record import CodeStep, ExecutionStep, TextStep, Trajectory, TrajectoryWriter, read_trajectories

REAL = Path(__file__).parent / "data" / "eval_gsm8k_replay5.jsonl"  # 5 records of a real `tora eval` (replayed ToRA-Code-34B)


def real() -> list[Trajectory]:
    return list(read_trajectories(REAL))


def everything() -> list[Trajectory]:
    return corpus() + real()


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return tora_in_process(argv, capsys)


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def write(path: Path, records: list[Trajectory]) -> Path:
    with TrajectoryWriter(path) as w:
        for t in records:
            w.append_sync(t)
    return path


def executed(t: Trajectory) -> list[tuple[str, ExecutionStep]]:
    """(code, execution) pairs straight from the steps."""
    return [(c.content, e) for c, e in itertools.pairwise(t.steps)
            if isinstance(c, CodeStep) and isinstance(e, ExecutionStep)]


# --- the tora format: the context, byte for byte -------------------------------------


def test_tora_text_is_the_question_part_of_the_prompt_plus_the_completion_written_out() -> None:
    row = tora_row(corpus()[0], spans=True)
    # Written out by hand from the template's tail ("Question: {question}\n\nSolution:\n") and the steps.
    assistant = ("Let's add.\n```python\nprint(1+1)\n```\n```output\n2\n```\n"
                 "Check it twice.\n```python\nx = 1+1\nprint(x*2)\n```\n```output\n4\n```\nSo $\\boxed{2}$.")
    assert row["messages"] == [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": assistant}]
    assert row["text"] == "What is 1+1?\n\nSolution:\n" + assistant
    first = assistant.index("```output\n2")
    second = assistant.index("```output\n4")
    assert row["output_spans"] == [[first, first + len("```output\n2\n```\n")],
                                   [second, second + len("```output\n4\n```\n")]]
    assert row["meta"]["problem_id"] == "alg-1" and row["meta"]["correct"] is True


@pytest.mark.parametrize("t", everything(), ids=lambda t: t.problem.id[:12])
def test_tora_row_round_trips_to_the_models_context(t: Trajectory) -> None:
    row = tora_row(t, spans=True)
    assistant = row["messages"][1]["content"]
    # The prompt's shared prefix + text is the context, byte for byte; the assistant text is the completion.
    assert t.prompt[: question_offset(t)] + row["text"] == t.context()
    assert row["text"].endswith(assistant) and assistant == t.completion()
    assert row["messages"][0]["content"] == t.problem.text.strip()
    # The spans are the runtime's ```output blocks; without them only the model's own text is left.
    spans = row["output_spans"]
    kept, pos = "", 0
    for start, end in spans:
        assert assistant[start:end].lstrip("\n").startswith("```output\n") and assistant[start:end].endswith("```\n")
        kept += assistant[pos:start]
        pos = end
    kept += assistant[pos:]
    assert kept == "".join(s.content for s in t.steps if isinstance(s, TextStep))
    assert len(spans) == len([s for s in t.steps if isinstance(s, ExecutionStep)])


def test_question_part_is_the_last_occurrence_and_the_whole_prompt_when_absent() -> None:
    t = corpus()[0]
    # The question also appears among the few-shot examples: the last occurrence is the one asked.
    twice = t.model_copy(update={"prompt": "Question: What is 1+1?\n\nSolution:\n2\n---\n" + t.prompt})
    assert twice.prompt[question_offset(twice):] == "What is 1+1?\n\nSolution:\n"
    elsewhere = t.model_copy(update={"prompt": "<|user|>\nsomething else\n<|assistant|>\n"})
    assert question_offset(elsewhere) == 0 and tora_row(elsewhere)["text"] == elsewhere.context()


# --- the tool-calling formats ------------------------------------------------------


def fenced(messages: list[dict[str, Any]], arguments: Any) -> str:
    """The completion rebuilt from a conversation, in the engine's fence layout."""
    text = ""
    outputs = [m["content"] for m in messages if m["role"] == "tool"]
    calls = 0
    for m in messages[1:]:
        if m["role"] != "assistant":
            continue
        text += m["content"]
        for call in m.get("tool_calls") or []:
            code = arguments(call["function"]["arguments"])["code"]
            text += f"```python\n{code}```\n```output\n{outputs[calls]}\n```\n"
            calls += 1
    return text


STANDARD = [t for t in everything() if t.problem.id in {"alg-1", "alg-2", "alg-5"} or t.problem.source == "gsm8k"]


@pytest.mark.parametrize("fmt", ["trl", "openai"])
def test_tool_calling_rows_carry_every_code_output_and_word(fmt: str) -> None:
    build_row = {"trl": trl_row, "openai": openai_row}[fmt]
    arguments = (lambda a: a) if fmt == "trl" else json.loads
    for t in everything():
        row = build_row(t)
        messages = row["messages"]
        assert row["tools"][0]["function"]["name"] == "python"
        assert row["tools"][0]["function"]["parameters"]["required"] == ["code"]
        assert messages[0] == {"role": "user", "content": t.problem.text.strip()}
        calls = [c for m in messages if m["role"] == "assistant" for c in m.get("tool_calls", [])]
        tools = [m for m in messages if m["role"] == "tool"]
        assert [arguments(c["function"]["arguments"]) for c in calls] == [{"code": c} for c, _ in executed(t)]
        assert [m["content"] for m in tools] == [e.rendered for _, e in executed(t)]
        if fmt == "openai":
            assert set(row) == {"messages", "tools"}
            assert [c["id"] for c in calls] == [m["tool_call_id"] for m in tools] == [f"call_{i + 1}" for i in range(len(tools))]
            assert all(isinstance(c["function"]["arguments"], str) for c in calls)
        else:
            assert row["meta"]["id"] == t.id and all(m["name"] == "python" for m in tools)
        # Each call's message is answered by the tool message right after it.
        for i, m in enumerate(messages):
            if m.get("tool_calls"):
                assert messages[i + 1]["role"] == "tool"
        if t in STANDARD or t.problem.source == "gsm8k":
            assert fenced(messages, arguments) == t.completion()


def test_odd_shapes_keep_the_prose_and_leave_unrun_code_in_the_text() -> None:
    by_id = {t.problem.id: t for t in corpus()}
    unclosed = trl_row(by_id["geo-1"])["messages"]
    assert unclosed[1]["content"] == "First a sketch:\n```python\n# not run\n```\nNow:\n"  # the block never run stays
    assert unclosed[1]["tool_calls"][0]["function"]["arguments"] == {"code": "print(2*3)\n"}
    tail = trl_row(by_id["geo-2"])["messages"]
    assert tail[1]["content"] == "Compute:\nLet me run it.\n"
    interrupted = trl_row(by_id["alg-3"])["messages"]
    assert [m["role"] for m in interrupted] == ["user", "assistant", "tool", "assistant"]
    assert interrupted[-1] == {"role": "assistant", "content": "Let me double check.\n```python\nimport time\n```\n"}
    assert "tool_calls" not in interrupted[-1]


def test_sharegpt_alternates_as_llama_factory_requires_and_keeps_the_thoughts() -> None:
    for t in everything():
        row = sharegpt_row(t)
        conv = row["conversations"]
        for n, turn in enumerate(conv):  # human/observation at odd positions, gpt/function_call at even ones
            assert turn["from"] in (("human", "observation") if n % 2 == 0 else ("gpt", "function_call"))
        calls = [json.loads(c["value"]) for c in conv if c["from"] == "function_call"]
        assert calls == [{"name": "python", "arguments": {"code": c}} for c, _ in executed(t)]
        assert [c["value"] for c in conv if c["from"] == "observation"] == [e.rendered for _, e in executed(t)]
        thoughts = [c["thought"] for c in conv if c["from"] == "function_call"]
        assert thoughts == [turn.text for turn in turns(t) if turn.call is not None]
        assert json.loads(row["tools"])[0]["name"] == "python"


# --- pairs -------------------------------------------------------------------------


def samples(pid: str, verdicts: list[bool | None], finish: str = "answered") -> list[Trajectory]:
    return [build(Spec(pid, f"Question {pid}?", "1", [Turn("", Cell(f"print({k})\n", f"{k}\n"))], f"$\\boxed{{{k}}}$",
                       correct=v, final_answer=str(k), sample_index=k, finish=finish,
                       grade_status="ok" if v is not None else "unparsed"))
            for k, v in enumerate(verdicts)]


def test_preference_pairs_a_right_and_a_wrong_answer_of_one_problem_deterministically() -> None:
    records = samples("p", [True, False, True, False, None]) + samples("q", [True, True]) + samples("r", [False, True])
    records += [*samples("p-failed", [True]),
                build(Spec("p-failed", "Question p-failed?", "1", [], "", finish="error", correct=False, grade_status="ok"))]
    by_id = {t.id: t for t in records}
    rows = list(preference_rows(records, seed=3, per_problem=10))
    # p: 2 correct x 2 wrong; r: 1 x 1; q has no wrong sample; failed and ungraded samples are never paired.
    assert sorted((r["meta"]["problem_id"]) for r in rows) == ["p", "p", "p", "p", "r"]
    for r in rows:
        good, bad = by_id[r["meta"]["chosen_id"]], by_id[r["meta"]["rejected_id"]]
        assert good.result.correct is True and bad.result.correct is False and good.problem.id == bad.problem.id
        assert r["prompt"] + r["chosen"] == tora_row(good)["text"]
        assert r["prompt"] + r["rejected"] == tora_row(bad)["text"]
    one = [json.dumps(r) for r in preference_rows(records, seed=3)]
    assert one == [json.dumps(r) for r in preference_rows(list(reversed(records)), seed=3)]  # file order is irrelevant
    # A problem's pairs do not move when other problems come and go.
    alone = [json.dumps(r) for r in preference_rows([t for t in records if t.problem.id == "p"], seed=3)]
    assert alone == [line for line in one if '"problem_id": "p"' in line]
    seeds = {tuple(r["meta"]["rejected_id"] for r in preference_rows(samples("s", [True] + [False] * 9), seed=s))
             for s in range(8)}
    assert len(seeds) > 1  # the seed does choose


def corrections() -> tuple[list[Trajectory], Trajectory, Trajectory]:
    wrong = build(Spec("c", "What is 2+3?", "5", [Turn("Add them.\n", Cell("print(2*3)\n", "6\n"))],
                       "So $\\boxed{6}$.", correct=False, final_answer="6"))
    kept = "Add them.\n"  # the teacher keeps the first line and redoes the rest
    fixed = build(Spec("c", "What is 2+3?", "5", [Turn(kept + "That should be a sum.\n", Cell("print(2+3)\n", "5\n"))],
                       "So $\\boxed{5}$.", correct=True, final_answer="5", origin="teacher_corrected", parent=wrong.id))
    return [wrong, fixed], wrong, fixed


def test_correction_pairs_the_teacher_fix_with_the_wrong_trajectory_it_corrects() -> None:
    records, wrong, fixed = corrections()
    stats = CorrectionStats()
    (row,) = correction_rows(records, [], stats)
    assert row["wrong"] == wrong.completion() and row["corrected"] == fixed.completion()
    assert row["prefix_lines"] == 1 and row["continuation"] == fixed.completion()[len("Add them.\n"):]
    assert row["meta"]["wrong_id"] == wrong.id and row["meta"]["corrected_answer"] == "5"
    assert row["prompt"] + row["corrected"] == tora_row(fixed)["text"]
    # Schema 1.1 records say how many lines were kept; a number that contradicts the parent is reported.
    (recorded,) = correction_rows([wrong, as_11(fixed, prefix_lines=1)], [], CorrectionStats())
    assert recorded == row
    bad = CorrectionStats()
    assert list(correction_rows([wrong, as_11(fixed, prefix_lines=3)], [], bad)) == [] and bad.inconsistent == [fixed.id]
    orphan = CorrectionStats()
    assert list(correction_rows([fixed], [], orphan)) == [] and orphan.missing_parent == [fixed.id]


def test_a_curated_run_dir_exports_curated_records_and_finds_parents_beside_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, wrong, fixed = corrections()
    write(tmp_path / "trajectories.jsonl", [wrong])
    write(tmp_path / "curated.jsonl", [fixed])
    code, out, err = cli(["export", str(tmp_path), "--format", "correction"], capsys)
    assert code == 0 and f"reading {tmp_path / 'curated.jsonl'}" in err
    (row,) = lines(out)
    assert row["meta"]["wrong_id"] == wrong.id
    code, out, err = cli(["export", str(tmp_path / "curated.jsonl"), "--format", "correction"], capsys)
    assert code == 0 and out == "" and "1 corrections without their parent" in err


def test_json_prints_the_summary_and_the_rows_go_to_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write(tmp_path / "run.jsonl", everything())
    out = tmp_path / "rows.jsonl"
    code, stdout, err = cli(["export", str(src), "-f", "trl", "-o", str(out), "--only-correct", "--json"], capsys)
    assert code == 0, err
    (summary,) = lines(stdout)  # the summary alone on stdout
    rows = lines(out.read_text())
    assert summary["written"] == len(rows) > 0 and summary["out"] == str(out) and summary["format"] == "trl"
    assert summary["read"] == len(everything()) == summary["written"] + summary["failed"] + summary["filtered"]
    # Without --out the rows would take stdout: a usage error, not a mixed stream.
    code, stdout, err = cli(["export", str(src), "-f", "trl", "--json"], capsys)
    assert code == 2 and stdout == "" and "--out" in err


# --- notebooks and parquet -----------------------------------------------------------


def test_ipynb_has_one_valid_notebook_per_trajectory_with_the_recorded_outputs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nbformat = pytest.importorskip("nbformat")
    records = everything()
    src = write(tmp_path / "t.jsonl", records)
    code, _, err = cli(["export", str(src), "--format", "ipynb", "--out", str(tmp_path / "nb")], capsys)
    assert code == 0 and f"wrote {len(records)} notebooks" in err  # failed ones included
    books = sorted((tmp_path / "nb").glob("*.ipynb"))
    assert len(books) == len(records)
    by_id = {t.id: t for t in records}
    for path in books:
        nb = nbformat.read(str(path), as_version=4)
        nbformat.validate(nb)
        t = by_id[nb.metadata["tora"]["id"]]
        code_cells = [c for c in nb.cells if c.cell_type == "code"]
        ran = [c for c in code_cells if c.outputs or c.metadata["tora"]["status"] != "not run"]
        assert [c.source for c in ran] == [c for c, _ in executed(t)]
        for cell, (_, ex) in zip(ran, executed(t), strict=True):
            streams = {o.name: o.text for o in cell.outputs if o.output_type == "stream"}
            assert streams.get("stdout", "") == ex.stdout
            errors = [o for o in cell.outputs if o.output_type == "error"]
            assert [(o.ename, o.evalue) for o in errors] == ([(ex.error.ename, ex.error.evalue)] if ex.error else [])
        markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        assert t.problem.text.strip() in markdown
        if t.problem.id == "alg-3":  # interrupted: its last code never ran
            assert code_cells[-1].source == "import time\n" and code_cells[-1].outputs == []
        if t.problem.id == "alg-4":
            assert "did not finish" in markdown and "the model server went away" in markdown


def test_a_cell_that_timed_out_shows_what_the_model_was_told() -> None:
    pytest.importorskip("nbformat")
    from tora.export.notebook import notebook

    slow = build(Spec("slow", "Loop forever?", "0", [Turn("", Cell("while True: pass\n", "", "timeout"))], "Too slow.",
                      finish="no_answer", correct=False))
    (cell,) = [c for c in notebook(slow).cells if c.cell_type == "code"]
    (out,) = cell.outputs
    assert out.output_type == "stream" and out.name == "stderr"
    assert out.text.startswith("[timeout] TimeoutError: execution exceeded the time limit")
    assert cell.metadata["tora"]["status"] == "timeout"


def test_parquet_loads_with_datasets_and_holds_the_jsonl_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datasets = pytest.importorskip("datasets")
    src = write(tmp_path / "t.jsonl", everything())
    for rows in ("trl", "tora"):
        out = tmp_path / f"{rows}.parquet"
        code, _, err = cli(["export", str(src), "-f", "parquet", "--rows", rows, "--out", str(out)], capsys)
        assert code == 0, err
        code, jsonl, _ = cli(["export", str(src), "-f", rows], capsys)
        expected = lines(jsonl)
        loaded = datasets.load_dataset("parquet", data_files=str(out), split="train").to_list()
        assert len(loaded) == len(expected) > 0

        def strip(v: Any) -> Any:  # Arrow gives every struct all the fields any row has, as null
            if isinstance(v, dict):
                return {k: strip(x) for k, x in v.items() if x is not None}
            return [strip(x) for x in v] if isinstance(v, list) else v

        assert [strip(r) for r in loaded] == [strip(r) for r in expected]


def test_the_trl_rows_are_trls_conversational_tool_format_checked_with_trl(tmp_path: Path) -> None:
    for module in ("trl", "datasets", "transformers"):
        pytest.importorskip(module)
    data = tmp_path / "trl.jsonl"
    subprocess.run([*TORA, "export", str(write(tmp_path / "t.jsonl", everything())), "-f", "trl", "-o", str(data)],
                   check=True, capture_output=True)
    # Its own process: torch (under trl) and llama.cpp must not share one.
    proc = subprocess.run([*TORA[:1], str(Path(__file__).parent / "trl_check.py"), str(data), str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    kept = [t for t in everything() if t.result.finish not in ("error", "interrupted")]
    assert report["rows"] == len(kept) and report["trained_steps"] == 1
    assert report["tool_responses"] == sum(len(executed(t)) for t in kept)


# --- the command -----------------------------------------------------------------------


def test_failed_records_are_left_out_and_said_unless_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write(tmp_path / "t.jsonl", corpus())
    code, out, err = cli(["export", str(src), "-f", "tora"], capsys)
    assert code == 0 and {r["meta"]["finish"] for r in lines(out)} == {"answered"}
    assert "wrote 6 rows to stdout; left out: 2 failed" in err
    code, out, _ = cli(["export", str(src), "-f", "tora", "--include-failed"], capsys)
    assert len(lines(out)) == 8
    code, out, _ = cli(["export", str(src), "-f", "trl", "--only-correct"], capsys)
    assert {r["meta"]["problem_id"] for r in lines(out)} == {"alg-1", "geo-1", "geo-2"}
    code, out, _ = cli(["export", str(src), "-f", "openai", "--finish", "error", "--include-failed", "-n", "1"], capsys)
    assert len(lines(out)) == 1


def test_out_file_and_dedupe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = corpus()[0]
    src = write(tmp_path / "t.jsonl", [t, t.model_copy(update={"id": "again"})])
    out = tmp_path / "o.jsonl"
    code, stdout, err = cli(["export", str(src), "-f", "tora", "--dedupe", "--out", str(out)], capsys)
    assert code == 0 and stdout == "" and "left out: 1 duplicates" in err
    assert [r["meta"]["id"] for r in lines(out.read_text())] == [t.id]
    assert not list(tmp_path.glob(".*.tmp"))


def test_usage_errors_exit_2_with_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write(tmp_path / "t.jsonl", corpus()[:1])
    for fmt, word in (("ipynb", "folder"), ("parquet", "file")):
        code, _, err = cli(["export", str(src), "-f", fmt], capsys)
        assert code == 2 and f"--format {fmt} writes" in err and word in err and "--out" in err
    code, _, err = cli(["export", str(tmp_path / "nope"), "-f", "tora"], capsys)
    assert code == 2 and "no such file or folder" in err
    code, _, err = cli(["export", str(tmp_path), "-f", "tora"], capsys)
    assert code == 2 and "without curated.jsonl or trajectories.jsonl" in err
    raw = json.loads(corpus()[0].model_dump_json())
    raw["steps"][2]["status"] = "exploded"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(corpus()[1].model_dump_json() + "\n" + json.dumps(raw) + "\n")
    code, out, err = cli(["export", str(bad), "-f", "tora"], capsys)
    assert code == 2 and err.startswith(f"error: {bad}:2: field 'steps.2.execution.status':") and out == ""
    code, _, err = cli(["export", str(src), "-f", "preference", "--only-correct"], capsys)
    assert code == 2 and "--only-correct" in err


def test_a_reader_that_leaves_early_is_no_error(tmp_path: Path) -> None:
    src = write(tmp_path / "t.jsonl", corpus() * 200)
    proc = subprocess.run(f"{' '.join(TORA)} export {src} -f tora | head -c 100 > /dev/null; echo ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "0" and "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr


def report_of(src: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code, _, err = cli(["report", str(src)], capsys)
    assert code == 0, err
    return src.with_name(f"{src.stem}.report.html").read_text(encoding="utf-8")


def test_a_lone_surrogate_in_a_record_is_exported_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    odd = build(Spec("odd", "What is \ud800?", "1", [], "$\\boxed{1}$ \ud800", correct=True, final_answer="1"))
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps(odd.model_dump()) + "\n")  # stdlib json writes the surrogate as \\ud800
    proc = subprocess.run([*TORA, "export", str(src), "-f", "tora"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (row,) = lines(proc.stdout)
    assert row["messages"][1]["content"] == odd.completion() and "\\ud800" in proc.stdout
    assert "What is ?" in report_of(src, capsys)  # the page is UTF-8: the surrogate became "?"


def test_both_shapes_of_result_error_are_read() -> None:
    failed = corpus()[5]
    assert error_view(failed) is not None and error_view(failed).message == "BackendError: the model server went away"  # type: ignore[union-attr]
    new = as_11(failed, result={**failed.result.model_dump(),
                                "error": {"kind": "backend", "message": "server went away", "traceback": None}})
    view = error_view(new)
    assert view is not None and (view.kind, view.message) == ("backend", "server went away")
    assert error_view(corpus()[0]) is None


def test_hostile_text_survives_every_format_unchanged() -> None:
    evil = corpus()[7]
    assert HOSTILE in tora_row(evil)["text"]
    assert trl_row(evil)["messages"][2]["content"] == HOSTILE.rstrip()  # the renderer strips trailing space
    assert json.loads(json.dumps(openai_row(evil)))["messages"][0]["content"] == evil.problem.text.strip()
    assert output_spans(evil)
