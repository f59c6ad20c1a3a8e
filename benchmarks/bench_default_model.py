"""Which model and prompt should be the default: accuracy on the first N GSM8K
problems for each candidate model x prompt, through `tora eval` as a user runs
it (one problem at a time, greedy), and the README's own problem.

    .venv/bin/python benchmarks/bench_default_model.py [--limit 100] \\
        [--models embedded,embedded-tiny,gguf:/path/x.gguf] [--prompts tir,tora-gsm8k,pot] [--out DIR]

Per candidate: accuracy, answered rate, mean tool calls, seconds per problem
(median and mean of the trajectories' wall time), decode tokens/s (generated
tokens over the model calls' time, prompt evaluation included), and the
first problem's time apart (a cold start shows there). Goal for the default on
2 cores: >= 60 % of the first 100 problems, <= 20 s per problem, and the
README problem answered 72. Runs already in OUT are reused (`--resume`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
README_PROBLEM = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                  "How many clips did Natalia sell altogether in April and May?")
GOAL_ACCURACY, GOAL_S_PER_PROBLEM = 0.60, 20.0


def tora(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tora.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)


def summarise(run: Path) -> dict[str, Any]:
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run / "trajectories.jsonl").read_text().splitlines() if line.strip()]
    walls = [r["stats"]["wall_s"] for r in rows]  # file order: finishing order, one at a time
    texts = [s for r in rows for s in r["steps"] if s["type"] == "text"]
    model_s = sum(max(0.0, s["t_end"] - s["t_start"]) for s in texts)
    tokens = sum(s["completion_tokens"] for s in texts)
    return {
        "n": metrics["trajectories"],
        "accuracy": metrics["accuracy"],
        "answered": sum(r["result"]["finish"] == "answered" for r in rows) / len(rows),
        "tool_calls": metrics["mean_tool_calls"],
        "completion_tokens": metrics["mean_completion_tokens"],
        "s_median": statistics.median(walls),
        "s_mean": statistics.fmean(walls),
        "first_s": walls[0] if walls else None,
        "decode_tok_s": tokens / model_s if model_s else None,
        "exec_error_rate": metrics["exec_error_rate"],
    }


def readme_problem(model: str, prompt: str | None) -> tuple[str | None, float]:
    t0 = time.monotonic()
    args = ["solve", "--json", "--no-record", "--model", model, *(["--prompt", prompt] if prompt else []), README_PROBLEM]
    proc = tora(*args, timeout=900)
    answer = json.loads(proc.stdout)["result"]["final_answer"] if proc.stdout.strip() else None
    return answer, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--models", default="embedded")
    ap.add_argument("--prompts", default="tir,tora-gsm8k,pot")
    ap.add_argument("--out", type=Path, default=Path("bench-default-model"))
    ap.add_argument("--no-readme", action="store_true", help="skip the README problem")
    opts = ap.parse_args()
    table: list[tuple[str, str, dict[str, Any]]] = []
    for model in opts.models.split(","):
        for prompt in opts.prompts.split(","):
            run = opts.out / f"{model.replace(':', '_').replace('/', '_')}__{prompt}"
            args = ["eval", "gsm8k", "--model", model, "--prompt", prompt, "--limit", str(opts.limit),
                    "--concurrency", "1", "--out", str(run)]
            if (run / "manifest.json").is_file():
                args.append("--resume")
            proc = tora(*args, timeout=opts.limit * 600)
            if proc.returncode not in (0, 3):
                print(f"{model} {prompt}: tora eval failed ({proc.returncode}): {proc.stderr.strip()[-400:]}",
                      file=sys.stderr)
                continue
            row = summarise(run)
            table.append((model, prompt, row))
            print(json.dumps({"model": model, "prompt": prompt, **row}), flush=True)
    load = os.getloadavg()
    print(f"\nGSM8K, first {opts.limit} problems, greedy, one problem at a time; {os.cpu_count()} CPUs, "
          f"load average {load[0]:.1f} at the end")
    print("| model | prompt | accuracy | answered | tool calls | tokens | s/problem (median / mean) "
          "| first problem s | decode tok/s | vs goal (acc / s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, prompt, r in table:
        print(f"| {model} | {prompt} | {100 * r['accuracy']:.0f}% ({r['n']}) | {100 * r['answered']:.0f}% "
              f"| {r['tool_calls']:.2f} | {r['completion_tokens']:.0f} | {r['s_median']:.1f} / {r['s_mean']:.1f} "
              f"| {r['first_s']:.1f} | {r['decode_tok_s']:.1f} "
              f"| {r['accuracy'] / GOAL_ACCURACY:.2f}x / {GOAL_S_PER_PROBLEM / r['s_median']:.2f}x |")
    if not opts.no_readme:
        for model in opts.models.split(","):
            answer, seconds = readme_problem(model, None)
            print(f"README problem, {model} with its default prompt: {answer} (expected 72) in {seconds:.1f} s "
                  "(process start to exit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
