"""The embedded model on GSM8K through llama.cpp and through vLLM, side by side in one run.

    .venv-vllm/bin/python benchmarks/bench_vllm_vs_llamacpp.py [--limit 50] [--concurrency 16] [--eager]

Runs `tora eval gsm8k --limit N --concurrency C` twice with this interpreter
(the vLLM tier has both engines): `--model embedded` (llama.cpp, Q4_K_M GGUF,
one sequence at a time) and `--model vllm:embedded` (vLLM, the same weights
dequantised to bfloat16, every trajectory in flight batched). Prints per engine
the start-up (process wall minus the eval's own wall), the eval wall, the
completion tokens and tokens/s, accuracy, and the ratios llama.cpp / vLLM; the
goal is >= 3x on the eval wall at 16 in flight. The embedded model is converted
for vLLM first (once, not timed). The machine's load average is
printed around each run: on a shared machine, rerun when it was high.
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
from typing import Any

from tora.record import read_trajectories


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def run_eval(spec: str, out: Path, limit: int, concurrency: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tora.cli.main", "eval", "gsm8k", "--model", spec, "--limit", str(limit),
           "--concurrency", str(concurrency), "--out", str(out), "--json"]
    before = load()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
    total = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"tora eval --model {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    trajectories = list(read_trajectories(out / "trajectories.jsonl"))
    tokens = sum(t.stats.completion_tokens for t in trajectories)
    return {"spec": spec, "total_s": total, "eval_s": metrics["wall_s"], "startup_s": total - metrics["wall_s"],
            "tokens": tokens, "tok_s": tokens / metrics["wall_s"], "accuracy": metrics["accuracy"],
            "errors": metrics["errors"], "tool_calls": metrics["mean_tool_calls"], "load": f"{before} -> {load()}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--eager", action="store_true", help="vLLM without torch.compile (faster start, slower decode)")
    args = ap.parse_args()
    vllm_spec = "vllm:embedded" + ("?enforce_eager=1" if args.eager else "")
    print(f"{os.cpu_count()} CPUs; gsm8k --limit {args.limit} --concurrency {args.concurrency}", flush=True)
    # The one-time conversion is not start-up: do it (or find it done) before the clock runs.
    subprocess.run([sys.executable, "-m", "tora.cli.main", "models", "convert", "embedded"], check=True,
                   stdout=subprocess.DEVNULL)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        for name, spec in (("llama.cpp", "embedded"), ("vllm", vllm_spec)):
            row = run_eval(spec, Path(tmp) / name.replace(".", ""), args.limit, args.concurrency)
            rows.append(row)
            print(f"{name:>9}  {spec:<28} start-up {row['startup_s']:6.1f} s  eval {row['eval_s']:7.1f} s  "
                  f"{row['tokens']:6d} tokens  {row['tok_s']:6.1f} tok/s  accuracy {100 * row['accuracy']:.0f}%  "
                  f"errors {row['errors']}  tool calls {row['tool_calls'] or 0:.2f}  load {row['load']}", flush=True)
    llama, vllm = rows
    print(f"llama.cpp / vLLM: eval wall {llama['eval_s'] / vllm['eval_s']:.2f}x, "
          f"total wall {llama['total_s'] / vllm['total_s']:.2f}x, tokens/s {vllm['tok_s'] / llama['tok_s']:.2f}x "
          f"(goal: >= 3x eval wall at 16 in flight)")


if __name__ == "__main__":
    main()
