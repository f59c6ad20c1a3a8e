"""`tora curate` as a user runs it: replayed models through tora's loop and real kernels,
graded, filtered, deduplicated, capped, checked for contamination, resumable after
kill -9; plus one run with the embedded model."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, TORA, write_released

EVALSETS = ROOT / "tests" / "data" / "evalsets"  # five GSM8K test rows: the evaluation set the guard checks
JANET = json.loads((EVALSETS / "gsm8k" / "test.jsonl").read_text().splitlines()[0])["question"]


def run(args: list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TORA, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TORA_DATA_DIR": str(EVALSETS), **env})


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def says(n: int | str, code: str | None = None, note: str = "") -> str:
    code = code if code is not None else f"print({n})"
    return f"{note}```python\n{code}\n```\n```output\n{n}\n```\nSo $\\boxed{{{n}}}$."


def fixture(tmp_path: Path, samples: dict[str, list[str]], answers: dict[str, str],
            texts: dict[str, str] | None = None) -> tuple[Path, Path]:
    texts = texts or {}
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"id": p, "question": texts.get(p, f"What is {p}?"), "answer": a}) + "\n"
                            for p, a in answers.items()))
    released = write_released(tmp_path / "samples.jsonl", [
        {"idx": p, "question": texts.get(p, f"What is {p}?"), "code": code} for p, code in samples.items()])
    return data, released


# a: right, the same right again, right but a cell failed on the way, wrong.
# b: three different right ones, and a wrong one.  c: all wrong.
SAMPLES = {
    "a": [says(6), says(6), says(6, note="```python\n1/0\n```\n```output\nx\n```\n"), says(5)],
    "b": [says(7), says(7, "x = 7\nprint(x)"), says(7, "print(3 + 4)"), says(1)],
    "c": [says(2), says(3), says(2), says(3)],
}
ANSWERS = {"a": "6", "b": "7", "c": "8"}


def curated_pairs(out: Path) -> list[tuple[str, int]]:
    return sorted((r["problem"]["id"], r["sample_index"]) for r in records(out / "curated.jsonl"))


def test_curate_keeps_correct_clean_distinct_trajectories_capped_per_problem(tmp_path: Path) -> None:
    data, released = fixture(tmp_path, SAMPLES, ANSWERS)
    out = tmp_path / "run"
    proc = run(["curate", str(data), "--model", f"replay:{released}", "--samples", "4", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    recs = records(out / "trajectories.jsonl")
    assert sorted((r["problem"]["id"], r["sample_index"]) for r in recs) == [(p, k) for p in "abc" for k in range(4)]
    assert all(r["result"]["grader"] == "math-verify" for r in recs)
    # a: sample 1 duplicates sample 0 and sample 2 had a failing cell; b: all three right ones differ.
    kept = curated_pairs(out)
    assert [p for p in kept if p[0] == "a"] in ([("a", 0)], [("a", 1)])
    assert [p for p in kept if p[0] == "b"] == [("b", 0), ("b", 1), ("b", 2)] and not [p for p in kept if p[0] == "c"]
    by_id = {r["id"]: r for r in recs}
    assert all(by_id[r["id"]] == r for r in records(out / "curated.jsonl"))  # the same records, verbatim
    m = json.loads((out / "metrics.json").read_text())
    assert m["curation"]["kept"] == 4 and m["curation"]["duplicates"] == 1 and m["curation"]["problems_with_kept"] == 2
    assert m["trajectories"] == 12 and m["correct"] == 6 and m["complete"] is True
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "curate" and manifest["samples"] == 4 and manifest["max_per_problem"] is None
    # Every built-in set found: the fixture's gsm8k, and the sets shipped in the package.
    assert manifest["contamination"]["checked_against"][0] == "gsm8k"
    assert "curate 3/3" in proc.stderr and "traj/s" in proc.stderr and "kept 4" in proc.stderr
    assert "exec errors 1" in proc.stderr
    # Switches: tool errors allowed; a cap of 2 drawn by a seed, the same draw every time.
    loose = run(["curate", str(data), "--model", f"replay:{released}", "--samples", "4", "--keep-tool-errors",
                 "--out", str(tmp_path / "loose")])
    assert loose.returncode == 0, loose.stderr
    assert ("a", 2) in curated_pairs(tmp_path / "loose")
    draws = []
    for seed in ("1", "1", "2", "3"):
        capped = tmp_path / f"capped-{len(draws)}"
        proc = run(["curate", str(data), "--model", f"replay:{released}", "--samples", "4", "-M", "2",
                    "--select-seed", seed, "--out", str(capped)])
        assert proc.returncode == 0, proc.stderr
        draws.append([p for p in curated_pairs(capped) if p[0] == "b"])
    assert all(len(d) == 2 for d in draws) and draws[0] == draws[1]
    assert len({tuple(d) for d in draws}) > 1  # another seed, another draw


def test_the_report_of_a_curation_run_shows_its_yield_over_every_trajectory(tmp_path: Path) -> None:
    """Not curated.jsonl alone (100 % correct by construction): sampled, graded correct, kept, and why
    each of the rest was not, with the browser over all of them."""
    data, released = fixture(tmp_path, {**SAMPLES, "j": [says(18)]}, {**ANSWERS, "j": "18"}, {"j": JANET})
    out = tmp_path / "run"
    proc = run(["curate", str(data), "--model", f"replay:{released}", "--samples", "4", "-M", "2", "-o", str(out),
                "--json"])
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()  # --json: the metrics, and nothing else on stdout
    assert json.loads(line)["curation"]["kept"] == 3
    proc = run(["report", str(out), "--json"])
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()
    assert json.loads(line) == {"out": str(out / "report.html"), "source": str(out / "curated.jsonl"),
                                "trajectories": 12}
    html = (out / "report.html").read_text()
    start = html.index('id="tora-data">') + len('id="tora-data">')
    rows = json.loads(html[start:html.index("</script>", start)])["t"]
    why = {(r["pid"], r["k"]): r["why"] for r in rows}
    assert len(why) == 12  # every sample, not only the 3 kept
    # a: 0 and 1 alike (one kept, one a duplicate), 2 had a failing cell, 3 wrong; b: three right ones
    # under a cap of 2, one wrong; c: all wrong; j: excluded as contaminated, never sampled.
    assert sorted(why[("a", k)] for k in (0, 1)) == ["duplicate", "kept"]
    assert (why[("a", 2)], why[("a", 3)], why[("b", 3)]) == ("tool error", "wrong", "wrong")
    assert sorted(why[("b", k)] for k in range(3)) == ["kept", "kept", "over the cap"]
    assert all(why[("c", k)] == "wrong" for k in range(4))
    assert "Curation yield" in html and "3 kept" in html and "of 12 sampled (6 graded correct" in html
    assert "1 problems excluded as contaminated" in html and 'data-filter="kept"' in html


def test_stop_when_full_withdraws_the_samples_not_yet_started(tmp_path: Path) -> None:
    samples = {p: [says(n)] * 8 for p, n in (("a", 6), ("b", 7))}
    data, released = fixture(tmp_path, samples, {"a": "6", "b": "7"})
    out = tmp_path / "run"
    proc = run(["curate", str(data), "--model", f"replay:{released}", "--samples", "8", "-M", "1", "--stop-when-full",
                "--concurrency", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    per_problem = [sum(r["problem"]["id"] == p for r in records(out / "trajectories.jsonl")) for p in "ab"]
    assert all(1 <= n < 8 for n in per_problem), per_problem
    assert len(records(out / "curated.jsonl")) == 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["curation"]["samples_not_run"] == 16 - sum(per_problem) and m["complete"] is True
    no_cap = run(["curate", str(data), "--model", f"replay:{released}", "--stop-when-full", "--out", str(tmp_path / "x")])
    assert no_cap.returncode == 2 and "--max-per-problem" in no_cap.stderr and len(no_cap.stderr.splitlines()) == 1


def test_greedy_first_then_seeded_samples(tmp_path: Path) -> None:
    data, released = fixture(tmp_path, {"a": [says(6)] * 3}, {"a": "6"})
    out = tmp_path / "run"
    proc = run(["curate", str(data), "--model", f"replay:{released}", "--samples", "3", "--greedy-first",
                "--temperature", "0.8", "--seed", "10", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    sampling = {r["sample_index"]: r["generation"]["sampling"] for r in records(out / "trajectories.jsonl")}
    assert (sampling[0]["temperature"], sampling[0]["seed"]) == (0.0, None)
    assert [(sampling[k]["temperature"], sampling[k]["seed"]) for k in (1, 2)] == [(0.8, 11), (0.8, 12)]


def test_problems_that_overlap_an_evaluation_set_are_reported_and_excluded(tmp_path: Path) -> None:
    # "leak" is an evaluation problem with its punctuation and case changed: still the same problem.
    # "half" shares its first thirty words with one and then goes its own way (about 0.4 of its 10-grams).
    leak = JANET.upper().replace(".", " ;").replace("’", "'")
    half = " ".join(JANET.split()[:30] + [f"word{i}" for i in range(30)])
    texts = {"leak": leak, "half": half}
    data, released = fixture(tmp_path, {"a": [says(6)], "leak": [says(18)], "half": [says(1)]},
                             {"a": "6", "leak": "18", "half": "1"}, texts)
    out = tmp_path / "run"
    proc = run(["curate", str(data), "--model", f"replay:{released}", "--samples", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    report = records(out / "contamination.jsonl")
    assert [(r["problem_id"], r["eval_source"], r["eval_id"], r["excluded"]) for r in report] == [
        ("leak", "gsm8k", "0", True)]
    assert report[0]["overlap"] == 1.0
    assert "1 of 3 problems" in proc.stderr and "excluded" in proc.stderr
    assert {r["problem"]["id"] for r in records(out / "trajectories.jsonl")} == {"a", "half"}
    # A lower threshold is the user's to set; --allow-contaminated reports but keeps them.
    kept = tmp_path / "kept"
    proc = run(["curate", str(data), "--model", f"replay:{released}", "--samples", "1", "--allow-contaminated",
                "--overlap", "0.3", "--out", str(kept)])
    assert proc.returncode == 0, proc.stderr
    report = records(kept / "contamination.jsonl")
    assert [(r["problem_id"], r["excluded"]) for r in report] == [("leak", False), ("half", False)]
    assert 0.3 <= report[1]["overlap"] < 0.5
    assert {r["problem"]["id"] for r in records(kept / "trajectories.jsonl")} == {"a", "leak", "half"}
    missing = run(["curate", str(data), "--model", f"replay:{released}", "--eval-sets", "nope",
                   "--out", str(tmp_path / "m")])
    assert missing.returncode == 2 and "nope" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_kill_9_at_random_moments_loses_duplicates_and_corrupts_nothing(tmp_path: Path) -> None:
    problems = [f"p{i}" for i in range(6)]
    sleepy = "import time\ntime.sleep(0.3)\nprint({n})"
    samples = {p: [says(i, sleepy.format(n=i)), says(i, sleepy.format(n=f"{i} ")), says(0, sleepy.format(n=0))]
               for i, p in enumerate(problems, 1)}
    data, released = fixture(tmp_path, samples, {p: str(i) for i, p in enumerate(problems, 1)})
    out = tmp_path / "run"
    args = [*TORA, "curate", str(data), "--model", f"replay:{released}", "--samples", "3", "--concurrency", "2",
            "--out", str(out)]
    env = {**os.environ, "TORA_DATA_DIR": str(EVALSETS)}
    rng = random.Random(9)
    seen: dict[str, bytes] = {}
    for _ in range(2):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        traj = out / "trajectories.jsonl"
        deadline = time.monotonic() + 60
        target = len(records(traj)) + rng.randint(1, 4) if traj.exists() else rng.randint(1, 4)
        while time.monotonic() < deadline and proc.poll() is None:
            if traj.exists() and len(traj.read_bytes().splitlines()) >= target:
                break
            time.sleep(0.02)
        time.sleep(rng.random() * 0.3)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for line in traj.read_bytes().splitlines():
            try:
                seen[json.loads(line)["id"]] = line
            except ValueError:
                continue  # the torn last line: half a record, never complete
    with (out / "curated.jsonl").open("ab") as f:
        f.write(b'{"id": "half a rec')  # a kill in the middle of appending a kept line
    proc = run(args[len(TORA):])
    assert proc.returncode == 0, proc.stderr
    recs = records(out / "trajectories.jsonl")  # every line parses: nothing corrupt is left
    assert all(any(r["id"] == rid for r in recs) for rid in seen)  # nothing once recorded is lost
    pairs = [(r["problem"]["id"], r["sample_index"]) for r in recs]
    assert sorted(pairs) == sorted(set(pairs)) == [(p, k) for p in problems for k in range(3)]
    kept = records(out / "curated.jsonl")
    assert sorted((r["problem"]["id"], r["sample_index"]) for r in kept) == [(p, k) for p in problems for k in (0, 1)]
    assert len({r["id"] for r in kept}) == len(kept)
    assert (out / "curated.jsonl.torn").read_bytes() == b'{"id": "half a rec\n'


def test_retry_errors_runs_infrastructure_failures_again_and_keeps_the_history(tmp_path: Path) -> None:
    data, released = fixture(tmp_path, {"a": [says(6)] * 2}, {"a": "6", "b": "7"})  # no recording of b yet
    out = tmp_path / "run"
    args = ["curate", str(data), "--model", f"replay:{released}", "--samples", "2", "--out", str(out)]
    proc = run(args)
    assert proc.returncode == 0, proc.stderr
    failed = [r for r in records(out / "trajectories.jsonl") if r["problem"]["id"] == "b"]
    assert [(r["result"]["finish"], r["result"]["error"]["kind"]) for r in failed] == [("error", "backend")] * 2
    write_released(released, [{"idx": p, "question": f"What is {p}?", "code": [says(n)] * 2} for p, n in (("a", 6), ("b", 7))])
    before = (out / "trajectories.jsonl").read_bytes()
    assert run(args).returncode == 0
    assert (out / "trajectories.jsonl").read_bytes() == before  # done is done, failures included
    proc = run([*args, "--retry-errors"])
    assert proc.returncode == 0, proc.stderr
    after = (out / "trajectories.jsonl").read_bytes()
    assert after.startswith(before)  # the failures stay in the history
    new = records(out / "trajectories.jsonl")[len(before.splitlines()):]
    assert sorted((r["problem"]["id"], r["sample_index"], r["result"]["correct"]) for r in new) == [
        ("b", 0, True), ("b", 1, True)]
    assert ("b", 0) in curated_pairs(out)
    assert json.loads((out / "metrics.json").read_text())["curation"]["retried"] == 2


def test_usage_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    data, released = fixture(tmp_path, {"a": [says(6)]}, {"a": "6"})
    out = tmp_path / "run"
    assert run(["curate", str(data), "--model", f"replay:{released}", "--samples", "1", "--out", str(out)]).returncode == 0
    cases = [
        (["--samples", "1", "-M", "2"], "--max-per-problem"),  # what is kept cannot change under a run
        (["--samples", "1", "--grader", "tora-compat"], "--grader"),
        # What a trajectory is cannot change under a run either (tora.run_settings): each named with both values.
        (["--samples", "1", "--temperature", "0.5"], "--temperature 0.0, not 0.5"),
        (["--samples", "1", "--prompt", "tora-math"], "--prompt tora-gsm8k, not tora-math"),
        (["--samples", "1", "--max-tokens", "99"], "--max-tokens 2048, not 99"),
        (["--samples", "1", "--render", "tora-compat"], "--render default, not tora-compat"),
    ]
    for extra, needle in cases:
        proc = run(["curate", str(data), "--model", f"replay:{released}", *extra, "--out", str(out)])
        assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    other = write_released(tmp_path / "other.jsonl", [{"idx": "a", "question": "What is a?", "code": [says(6)]}])
    proc = run(["curate", str(data), "--model", f"replay:{other}", "--out", str(out)])
    assert proc.returncode == 2 and "--model" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    unanswered = tmp_path / "q.jsonl"
    unanswered.write_text(json.dumps({"id": "q", "question": "What?"}) + "\n")
    proc = run(["curate", str(unanswered), "--model", f"replay:{released}", "--out", str(tmp_path / "u")])
    assert proc.returncode == 2 and "reference answer" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (out / "manifest.json").write_text("{not json")
    proc = run(["curate", str(data), "--model", f"replay:{released}", "--out", str(out)])
    assert proc.returncode == 2 and "manifest.json" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.model
def test_curate_with_the_embedded_model(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (ROOT / "tests" / "data" / "released_gsm8k_head5.jsonl").read_text().splitlines()]
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"id": str(r["idx"]), "question": r["question"], "answer": str(r["gt"])}) + "\n"
                            for r in rows[:2]))
    out = tmp_path / "run"
    proc = run(["curate", str(data), "--model", "embedded-tiny", "--samples", "2", "--temperature", "0.7", "--seed", "1",
                "--allow-contaminated",
                "--max-tokens", "400", "--out", str(out)], timeout=900)
    assert proc.returncode == 0, proc.stderr
    recs = records(out / "trajectories.jsonl")
    assert sorted((r["problem"]["id"], r["sample_index"]) for r in recs) == sorted(
        (str(r["idx"]), k) for r in rows[:2] for k in range(2))
    assert {r["generation"]["backend"] for r in recs} == {"llama.cpp"}
    assert all(r["result"]["grade_status"] is not None for r in recs)
    ids = {r["id"] for r in recs}
    kept = records(out / "curated.jsonl")
    assert all(r["id"] in ids and r["result"]["correct"] is True for r in kept)
    assert json.loads((out / "metrics.json").read_text())["curation"]["kept"] == len(kept)
