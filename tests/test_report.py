"""`tora report`: the figures, one self-contained page, hostile records shown as
text, and the page in headless Chromium (no console errors, charts drawn)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from browser import Elements, hex_rgb, load, needs_chromium, png_pixels
from conftest import TORA, write_released
from trajectory_fixtures import HOSTILE, Spec, as_11, build, corpus

from tora.cli.main import main
from tora.record import Trajectory, TrajectoryWriter
from tora.report.charts import BLUE, GREEN, RED
from tora.report.summary import summarize


def write(path: Path, records: list[Trajectory]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with TrajectoryWriter(path) as w:
        for t in records:
            w.append_sync(t)
    return path


def report(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(["report", *argv])
    _, err = capsys.readouterr()
    code = info.value.code
    return (code if isinstance(code, int) else 0), err


@pytest.fixture
def run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    run = tmp_path / "run"
    write(run / "trajectories.jsonl", corpus())
    code, err = report([str(run)], capsys)
    assert code == 0 and f"wrote {run / 'report.html'} (8 trajectories)" in err
    return run


def page_data(html: str) -> list[dict[str, object]]:
    start = html.index('<script type="application/json" id="tora-data">') + len('<script type="application/json" id="tora-data">')
    return json.loads(html[start : html.index("</script>", start)])["t"]  # type: ignore[no-any-return]


# --- the figures -------------------------------------------------------------------


def test_the_figures_are_those_of_the_records() -> None:
    s = summarize(corpus())
    m = s.metrics
    # Right: alg-1, geo-1, geo-2. Wrong: alg-2, evil. No verdict: interrupted, error, unparsed.
    assert (m["correct"], m["trajectories"], m["accuracy"]) == (3, 8, 0.375)
    assert m["by_type"] == {"Algebra": {"n": 2, "correct": 1, "accuracy": 0.5},
                            "Geometry": {"n": 2, "correct": 2, "accuracy": 1.0}}
    assert m["by_level"] == {"Level 1": {"n": 2, "correct": 2, "accuracy": 1.0},
                             "Level 2": {"n": 2, "correct": 1, "accuracy": 0.5}}
    assert m["finish"] == {"answered": 6, "error": 1, "interrupted": 1}
    assert s.tool_calls == Counter({1: 6, 2: 1, 0: 1})  # the interrupted cell never ran: not counted
    assert s.enames == Counter({"ZeroDivisionError": 1}) and s.cell_status == Counter({"ok": 7, "error": 1})
    # A 1.0-style string error reads as kind "internal" (the kind was not recorded then).
    assert s.ungraded == [4, 5, 6] and s.error_kinds == Counter({"internal": 1})
    # A 1.1 record's structured error is counted by its kind.
    failed = corpus()[5]
    new = as_11(failed, result={**failed.result.model_dump(), "error": {"kind": "backend", "message": "gone"}})
    assert summarize([new]).error_kinds == Counter({"backend": 1})


def test_compare_graders_lists_the_trajectories_the_graders_disagree_on(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # ToRA's math_equal takes 0.05 for 5 (as a percentage); Math-Verify does not.
    percent = build(Spec("pct", "What is 5% as a number?", "5", [], "The answer: $\\boxed{0.05}$", correct=True,
                         final_answer="0.05"))
    plain = build(Spec("plain", "What is 9+9?", "18", [], "$\\boxed{18}$", correct=True, final_answer="18"))
    src = write(tmp_path / "t.jsonl", [plain, percent])
    code, _ = report([str(src), "--compare-graders"], capsys)
    assert code == 0
    html = (tmp_path / "t.report.html").read_text()
    assert "Graders disagree on 1 of 2" in html and 'href="#t=1"' in html and 'href="#t=0"' not in html
    rows = page_data(html)
    assert {g: label for g, label, _ in rows[1]["v"]} == {"math-verify": "wrong", "tora-compat": "correct"}  # type: ignore[misc, union-attr]


# --- the page ------------------------------------------------------------------------


def test_the_page_is_self_contained_and_hostile_text_stays_data(run_dir: Path) -> None:
    html = (run_dir / "report.html").read_text()
    page = Elements(html)
    scripts = page.named("script")
    assert scripts == [{"type": "application/json", "id": "tora-data"}, {}]  # the data and the page's own script
    assert not page.named("img") and not page.named("link") and not page.named("iframe")
    assert all(a.get("href", "").startswith("#") for a in page.named("a"))  # type: ignore[union-attr]
    assert "http://" not in html and "https://" not in html
    assert "</script><img" not in html and "<!--" not in html.split("<body>")[1]
    # The policy allows the one script, by its hash, and no fetch at all.
    (csp,) = [a["content"] for a in page.named("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    code = html.rsplit("<script>", 1)[1].split("</script>")[0]
    digest = base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
    assert csp == f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; img-src data:"
    # The hostile record comes back intact from the data.
    interrupted = page_data(html)[4]["turns"]
    assert interrupted[-1]["code"] == "import time\n" and interrupted[-1]["st"] == "not run"  # type: ignore[index]
    evil = page_data(html)[7]
    assert evil["pid"] == f"evil{HOSTILE}" and evil["q"] == f"Evil {HOSTILE}?" and evil["ref"] == HOSTILE
    assert evil["turns"][0]["p"] == f"{HOSTILE}\n" and evil["turns"][0]["out"] == HOSTILE.rstrip()  # type: ignore[index]
    # Charts and tables escape what they show too (the hostile id is in the grading table? no: it is graded).
    assert "<svg" in html and "Algebra" in html and "ZeroDivisionError" in html


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = report([str(tmp_path / "none")], capsys)
    assert code == 2 and "no such file or folder" in err
    (tmp_path / "empty.jsonl").write_text("")
    code, err = report([str(tmp_path / "empty.jsonl")], capsys)
    assert code == 2 and "no trajectories" in err


# --- in a browser --------------------------------------------------------------------


@needs_chromium
def test_the_console_and_dom_checks_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><body><img src="x" onerror="console.log(\'ran\')">'
                   "<script>undefinedFunction()</script></body>")
    seen = load(bad.as_uri(), dump_dom=True)
    assert any("ran" in line for line in seen.console) and any("undefinedFunction" in line for line in seen.console)
    assert Elements(seen.dom).named("img")


@needs_chromium
def test_the_page_loads_cleanly_and_shows_its_charts(run_dir: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    seen = load((run_dir / "report.html").as_uri(), screenshot=shot, size="1100,1000")
    assert seen.console == []
    width, height, pixels = png_pixels(shot)
    assert (width, height) == (1100, 1000)
    counts = Counter(pixels)
    assert len(counts) > 50, "the screenshot is not blank"
    # The accuracy bar (green, red) and the count charts (blue) are drawn.
    for color in (GREEN, RED, BLUE):
        assert counts[hex_rgb(color)] > 1000, color


@needs_chromium
def test_a_hostile_trajectory_opens_as_text(run_dir: Path) -> None:
    seen = load((run_dir / "report.html").as_uri() + "#t=7", dump_dom=True)
    assert seen.console == []
    dom = Elements(seen.dom)
    assert not dom.named("img") and len(dom.named("script")) == 2
    assert "PWNED" not in "".join(dom.text[:5])  # the title was not rewritten
    text = "".join(dom.text)
    assert f"#7 · problem evil{HOSTILE.strip()}" in text and f"print({HOSTILE!r})" in text
    (detail,) = [a for a in dom.named("div") if a.get("id") == "detail"]
    assert detail == {"id": "detail", "class": "detail"}


@needs_chromium
def test_the_browser_renders_a_page_of_a_large_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = corpus()
    records = [t.model_copy(update={"id": f"{n:05d}", "sample_index": n // len(base)})
               for n, t in enumerate(base * 250)]  # 2000 trajectories
    src = write(tmp_path / "big.jsonl", records)
    code, _ = report([str(src)], capsys)
    assert code == 0
    seen = load((tmp_path / "big.report.html").as_uri(), dump_dom=True)
    assert seen.console == []
    dom = Elements(seen.dom)
    rows = [a for a in dom.named("tr") if "data-index" in a]
    assert len(rows) == 100  # one page of the list, not 2000 rows
    assert "2000 of 2000 trajectories" in "".join(dom.text) and "page 1 of 20" in "".join(dom.text)


# --- on a real run ---------------------------------------------------------------------


def test_report_and_export_of_a_real_eval_run(tmp_path: Path) -> None:
    """`tora eval` through the real sandboxed kernel, then `tora report` and `tora export` on its folder."""
    problems = {"a": ("2", "Algebra", 1, "```python\nprint(1+1)\n```\n```output\n2\n```\nSo $\\boxed{2}$."),
                "b": ("3", "Algebra", 2, "```python\nprint(1/0)\n```\n```output\nerr\n```\nSo $\\boxed{7}$."),
                "c": ("1", "Geometry", 1, f"```python\nprint({HOSTILE!r})\n```\n```output\nx\n```\n{HOSTILE} $\\boxed{{1}}$.")}
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"id": pid, "question": f"Q {pid}?", "answer": ref, "type": kind, "level": lv})
                            + "\n" for pid, (ref, kind, lv, _) in problems.items()))
    released = write_released(tmp_path / "completions.jsonl", [
        {"idx": pid, "question": f"Q {pid}?", "code": [text]} for pid, (_, _, _, text) in problems.items()])
    out = tmp_path / "run"
    env = os.environ.copy()

    def tora(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*TORA, *args], capture_output=True, text=True, timeout=300, env=env)

    proc = tora("eval", str(data), "--model", f"replay:{released}", "--out", str(out), "--grader", "math-verify")
    assert proc.returncode == 0, proc.stderr
    proc = tora("report", str(out))
    assert proc.returncode == 0, proc.stderr
    html = (out / "report.html").read_text()
    rows = page_data(html)
    assert [(r["pid"], r["c"]) for r in sorted(rows, key=lambda r: str(r["pid"]))] == [("a", True), ("b", False),
                                                                                       ("c", True)]
    assert "ZeroDivisionError" in html and "accuracy by type" in html
    evil = next(r for r in rows if r["pid"] == "c")
    assert evil["turns"][0]["out"] == HOSTILE.rstrip()  # type: ignore[index]  # printed by the real kernel
    proc = tora("export", str(out), "--format", "tora")
    assert proc.returncode == 0 and f"reading {out / 'trajectories.jsonl'}" in proc.stderr
    exported = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(exported) == 3 and all(r["text"].endswith(r["messages"][1]["content"]) for r in exported)
    if os.environ.get("TORA_SKIP_BROWSER") is None:
        from browser import CHROMIUM

        if CHROMIUM is not None:
            assert load((out / "report.html").as_uri()).console == []


@needs_chromium
def test_a_curation_run_is_browsed_whole_with_a_kept_filter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A `tora curate` folder: every trajectory in the browser, each tagged kept or why not, and the
    kept / not kept filters shown (they stay hidden for any other run)."""
    records = corpus()
    run = tmp_path / "run"
    write(run / "trajectories.jsonl", records)
    kept = [t for t in records if t.result.correct is True][:1]
    write(run / "curated.jsonl", kept)
    (run / "manifest.json").write_text(json.dumps({"command": "curate", "run_id": "run", "model": "m"}))
    code, err = report([str(run)], capsys)
    assert code == 0 and f"({len(records)} trajectories)" in err
    seen = load((run / "report.html").as_uri(), dump_dom=True)
    assert seen.console == []
    dom = Elements(seen.dom)
    buttons = {a.get("data-filter"): a for a in dom.named("button") if a.get("data-filter")}
    assert "hidden" not in buttons["kept"] and "hidden" not in buttons["notkept"]
    text = "".join(dom.text)
    assert "Curation yield" in text and f"{len(records)} of {len(records)} trajectories" in text
    assert [t for t in dom.text if t == "kept"].count("kept") >= 2  # the filter and the kept row's tag
    # Any other run: no such filter to show.
    other = write(tmp_path / "plain.jsonl", records)
    assert report([str(other)], capsys)[0] == 0
    dom = Elements(load((tmp_path / "plain.report.html").as_uri(), dump_dom=True).dom)
    buttons = {a.get("data-filter"): a for a in dom.named("button") if a.get("data-filter")}
    assert "hidden" in buttons["kept"] and "Curation yield" not in "".join(dom.text)
