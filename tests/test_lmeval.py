"""lm-evaluation-harness end to end: the real lm-eval (the `lmeval` extra) on a few
problems, through the `tora` model and through lm-eval's stock `local-completions`
pointed at `tora serve`; the task files read tora's data (a fixture set here)
and score with Math-Verify. The model is a replay of recorded trajectories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import TORA, write_released

from tora.cli.lmeval import lm_eval_argv
from tora.serve.process import ServeProcess

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'tora-tir[lmeval]')")

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
HEAD = HERE / "data" / "released_gsm8k_head.jsonl"  # ToRA-Code-34B's first GSM8K rows
SETS = HERE / "data" / "sets"  # the first rows of GSM8K and MATH-500, as tora's data folder
TASKS = Path(__file__).resolve().parents[1] / "tora" / "lmeval" / "tasks"
LM_EVAL = str(Path(sys.executable).parent / "lm_eval")


def released_verdicts(n: int) -> list[bool]:
    """What ToRA itself extracted from its first n completions, compared with the reference."""
    rows = [json.loads(line) for line in HEAD.read_text().splitlines()[:n]]
    return [row["pred"][0] == row["gt"] for row in rows]


def env() -> dict[str, str]:
    return {**os.environ, "TORA_DATA_DIR": str(SETS), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def results(out: Path, task: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """lm-eval's aggregated results for a task and its logged samples."""
    [aggregated] = out.rglob("results_*.json")
    [samples] = out.rglob(f"samples_{task}_*.jsonl")
    return json.loads(aggregated.read_text())["results"][task], [json.loads(x) for x in samples.read_text().splitlines()]


def run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env())


def test_tora_model_on_gsm8k_scores_what_the_recorded_answers_say(tmp_path: Path) -> None:
    record = tmp_path / "lm-eval.jsonl"
    proc = run([*TORA, "lm-eval", "--model_args", f"model=replay:{HEAD},concurrency=3,record_to={record}",
                "--tasks", "tora_gsm8k", "--limit", "3", "--output_path", str(tmp_path / "out"), "--log_samples"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = released_verdicts(3)
    assert 0 < sum(expected) < 3  # right and wrong answers among them
    metrics, samples = results(tmp_path / "out", "tora_gsm8k")
    assert metrics["acc,none"] == pytest.approx(sum(expected) / 3)
    assert [s["acc"] for s in sorted(samples, key=lambda s: s["doc_id"])] == [float(v) for v in expected]
    # The response lm-eval scored is the whole solution, code and output included.
    first = min(samples, key=lambda s: s["doc_id"])
    assert first["resps"][0][0] == json.loads(HEAD.read_text().splitlines()[0])["code"][0]
    recs = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(recs) == 3 and {r["problem"]["source"] for r in recs} == {"lm-eval"}
    assert {r["result"]["finish"] for r in recs} == {"answered"} and {r["origin"] for r in recs} == {"replayed"}


def test_local_completions_through_tora_serve(tmp_path: Path) -> None:
    record = tmp_path / "serve.jsonl"
    with ServeProcess(["--model", f"replay:{HEAD}", "--record-to", str(record)], env=env()) as server:
        # Stock lm-eval: its own local-completions model, only tora's task folder added.
        proc = run([LM_EVAL, "--model", "local-completions", "--model_args",
                    f"base_url={server.url}/completions,model=tora,tokenizer_backend=None,tokenized_requests=False,"
                    "num_concurrent=3", "--tasks", "tora_gsm8k", "--include_path", str(TASKS), "--limit", "3",
                    "--output_path", str(tmp_path / "out"), "--log_samples"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    metrics, samples = results(tmp_path / "out", "tora_gsm8k")
    expected = released_verdicts(3)
    assert metrics["acc,none"] == pytest.approx(sum(expected) / 3)
    assert [s["acc"] for s in sorted(samples, key=lambda s: s["doc_id"])] == [float(v) for v in expected]
    recs = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(recs) == 3 and {r["problem"]["source"] for r in recs} == {"served"}


def test_math500_answers_are_compared_by_math_verify(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (SETS / "math500" / "test.jsonl").read_text().splitlines()]
    # Reference answers: (3, pi/2) as \left( 3, \frac{\pi}{2} \right); p - q; \frac{14}{3}.
    answers = ["(3, \\frac{\\pi}{2})", "q - p", "\\dfrac{14}{3}"]  # equal, wrong, equal: as written, not as strings
    replay = write_released(tmp_path / "math500.jsonl", [
        {"idx": i, "question": row["problem"],
         "code": [f"```python\nprint({i})\n```\n```output\n{i}\n```\nSo the answer is $\\boxed{{{answers[i]}}}$."]}
        for i, row in enumerate(rows)])
    record = tmp_path / "lm-eval.jsonl"
    proc = run([*TORA, "lm-eval", "--model_args", f"model=replay:{replay},record_to={record}",
                "--tasks", "tora_math500", "--limit", "3", "--output_path", str(tmp_path / "out"), "--log_samples"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics, samples = results(tmp_path / "out", "tora_math500")
    assert [s["acc"] for s in sorted(samples, key=lambda s: s["doc_id"])] == [1.0, 0.0, 1.0]
    assert metrics["acc,none"] == pytest.approx(2 / 3)
    recs = [json.loads(line) for line in record.read_text().splitlines()]
    assert {r["generation"]["prompt_template"]["name"] for r in recs} == {"tora-math"}  # the task's prompt


def test_generate_until_cuts_at_until_and_loglikelihood_is_refused(tmp_path: Path) -> None:
    from lm_eval.api.instance import Instance

    from tora.errors import UsageError
    from tora.lmeval.model import ToraLM

    rows = [json.loads(line) for line in HEAD.read_text().splitlines()[:2]]
    lm = ToraLM(model=f"replay:{HEAD}", record_to=str(tmp_path / "r.jsonl"), batch_size=1, device="cpu")
    requests = [
        Instance("generate_until", {}, (rows[0]["question"], {"until": ["```output"], "max_gen_toks": 512}), 0),
        Instance("generate_until", {}, (rows[1]["question"], {"until": [], "max_gen_toks": 9}), 1),
    ]
    texts = lm.generate_until(requests)
    assert texts[0] == rows[0]["code"][0][: rows[0]["code"][0].index("```output")]
    recs = {r["problem"]["text"]: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    assert recs[rows[0]["question"]]["result"]["finish"] == "answered"  # cut for lm-eval, whole in the record
    assert recs[rows[1]["question"]]["result"]["finish"] == "max_tokens"  # max_gen_toks is the budget
    assert recs[rows[1]["question"]]["stats"]["completion_tokens"] == 9 and texts[1]
    with pytest.raises(UsageError, match="scores no text"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("a", "b"), 0)])
    with pytest.raises(UsageError, match="unknown model argument"):
        ToraLM(model=f"replay:{HEAD}", concurency=4)


def test_the_wrapper_adds_the_model_and_tasks_unless_given() -> None:
    assert lm_eval_argv(["--tasks", "tora_gsm8k"], "/t") == [
        "lm-eval", "run", "--model", "tora", "--tasks", "tora_gsm8k", "--include_path", "/t"]
    assert lm_eval_argv(["run", "--model=hf", "--include_path", "/mine"], "/t") == [
        "lm-eval", "run", "--model=hf", "--include_path", "/mine"]
    assert lm_eval_argv(["ls", "tasks"], "/t") == ["lm-eval", "ls", "tasks", "--include_path", "/t"]
