"""End-to-end reproduction of ToRA-Code-34B on GSM8K through tora's own loop and kernel.

    .venv/bin/python benchmarks/bench_eval_replay.py [--limit N] [--graders tora-compat,math-verify]

Runs `tora eval gsm8k --model replay:<released file> --grader G` (the model's
text is replayed, every ```python block is executed again by tora's kernel)
for each grader, and prints accuracy (ToRA's published figure: 80.7) and wall
time. Then lists every problem whose re-executed output or extracted answer
differs from what the released file recorded, with the reason, and every
problem on which the two graders disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tora.grading.tora_compat import tora_extract
from tora.record import ExecutionStep, Trajectory, read_trajectories
from tora.released import ReleasedItem, read_released
from tora.render import render_tora_compat
from tora.replaying import released_cells

ROOT = Path(__file__).resolve().parent.parent
RELEASED = ROOT.parent / "shared/data/released/tora-code-34b-v1.0/gsm8k/test_tora_-1_seed0_t0.0_s0_e1319.jsonl"
PUBLISHED = 80.7


def run_eval(grader: str, out: Path, limit: int | None, concurrency: int) -> tuple[dict[str, object], float]:
    cmd = [sys.executable, "-m", "tora.cli.main", "eval", "gsm8k", "--model", f"replay:{RELEASED}",
           "--grader", grader, "--out", str(out), "--json", "--concurrency", str(concurrency)]
    if limit:
        cmd += ["--limit", str(limit)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"tora eval failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def short(text: str | None, width: int = 70) -> str:
    flat = repr(text)
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def differences(item: ReleasedItem, t: Trajectory) -> list[str]:
    """Why this problem's replay is not identical to the recording (empty if it is)."""
    reasons: list[str] = []
    recorded = released_cells(item.code[0])
    executed = [s for s in t.steps if isinstance(s, ExecutionStep)]
    if len(recorded) != len(executed):
        why = f"{len(recorded)} recorded cells, {len(executed)} executed"
        if len(recorded) < len(executed) and "boxed" in item.code[0]:
            # ToRA ends a completion once the substring "boxed" appears, even in a docstring.
            why += " (ToRA saw 'boxed' in the code and stopped without running it; tora parses fences and ran it)"
        reasons.append(why)
    for i, (cell, step) in enumerate(zip(recorded, executed, strict=False)):
        new = render_tora_compat(step, None).strip()
        if new != cell.recorded.strip():
            reasons.append(f"cell {i} output: recorded {short(cell.recorded.strip())} -> new {short(new)} [{step.status}]")
    released_pred = str(item.pred[0]) if item.pred and item.pred[0] is not None else ""
    new_pred, _ = tora_extract(t.completion())
    if new_pred != released_pred:
        reasons.append(f"answer (ToRA extraction): recorded {short(released_pred)} -> new {short(new_pred)}")
    if t.result.error:
        reasons.append(f"error: {t.result.error}")
    return reasons


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--graders", default="tora-compat,math-verify")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--keep", type=Path, default=None, help="Keep the eval folders here.")
    args = ap.parse_args()
    graders = [g.strip() for g in args.graders.split(",") if g.strip()]
    released = {str(item.idx): item for item in read_released(RELEASED)}
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-eval-"))
    runs: dict[str, dict[str, Trajectory]] = {}
    print(f"released file: {RELEASED.name} ({len(released)} problems); ToRA's figure {PUBLISHED}")
    for grader in graders:
        out = base / f"eval-{grader}"
        metrics, wall = run_eval(grader, out, args.limit, args.concurrency)
        n = int(metrics["trajectories"])  # type: ignore[call-overload]
        print(f"\n== --grader {grader}: accuracy {100 * float(metrics['accuracy']):.2f}%"  # type: ignore[arg-type]
              f" ({metrics['correct']}/{n}); wall {wall:.1f} s ({n / wall:.1f} problems/s)"
              f"; empty {metrics['empty_answers']}, unparsed {metrics['unparsed']}, "
              f"grade timeouts {metrics['grade_timeouts']}, exec errors {metrics['exec_error_rate']}")
        runs[grader] = {t.problem.id: t for t in read_trajectories(out / "trajectories.jsonl")}

    first = runs[graders[0]]
    listed = [(pid, differences(released[pid], t)) for pid, t in sorted(first.items(), key=lambda kv: int(kv[0]))]
    listed = [(pid, reasons) for pid, reasons in listed if reasons]
    print(f"\n== problems whose re-executed output or extracted answer differs from the recording: {len(listed)}")
    for pid, reasons in listed:
        print(f"  gsm8k {pid}: " + "; ".join(reasons))

    unboxed = sorted(((pid, t) for pid, t in first.items() if t.result.finish != "answered"), key=lambda kv: int(kv[0]))
    print(f"\n== replayed completions that end without a \\boxed answer: {len(unboxed)}")
    for pid, t in unboxed:
        print(f"  gsm8k {pid}: finish {t.result.finish}; tora reads {short(t.result.final_answer, 30)}"
              f" [{t.result.extracted_by}]; ends {short(t.completion()[-60:], 80)}")

    structural = [(pid, t) for pid, t in first.items()
                  if (t.result.final_answer or "") != tora_extract(t.completion())[0]]
    print(f"\n== tora's own (structural) extraction differs from ToRA's on {len(structural)} problems:")
    for pid, t in sorted(structural, key=lambda kv: int(kv[0])):
        print(f"  gsm8k {pid}: ToRA {short(tora_extract(t.completion())[0], 40)} | tora {short(t.result.final_answer, 40)}"
              f" [{t.result.extracted_by}] | ref {t.problem.answer}")

    if len(graders) > 1:
        a, b = graders[0], graders[1]
        split = [pid for pid in first if runs[a][pid].result.correct != runs[b][pid].result.correct]
        print(f"\n== {a} and {b} disagree on {len(split)} problems:")
        for pid in sorted(split, key=int):
            ta, tb = runs[a][pid], runs[b][pid]
            print(f"  gsm8k {pid}: ref {ta.problem.answer!r}; {a}: pred {short(tora_extract(ta.completion())[0], 40)}"
                  f" -> {ta.result.correct} ({ta.result.grade_status}); {b}: pred {short(tb.result.final_answer, 40)}"
                  f" -> {tb.result.correct} ({tb.result.grade_status})")
    print(f"\neval folders: {base}")


if __name__ == "__main__":
    main()
