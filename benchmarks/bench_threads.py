"""llama.cpp's thread count under contention: decode speed of a model with its
threads fixed at every CPU, fixed at one, and following the idle cores
(tora's default, tora/backends/cpu_threads.py), each alone and beside one
process that keeps a core busy (what a kernel running a cell, the sandbox
pool starting, a grader or another program does). Each measurement is a fresh
process; the three settings are measured side by side in one run.

    .venv/bin/python benchmarks/bench_threads.py [--model embedded] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, json, sys, time
from tora.backends.base import Delta, GenerationRequest
from tora.backends.registry import load_backend
backend = load_backend(sys.argv[1])
prompt = backend.format_chat([{"role": "user", "content": "Count from 1 to 100, separated by commas."}])
async def go():
    first = None; n = 0
    async for ev in backend.stream(GenerationRequest(prompt=prompt, max_tokens=int(sys.argv[2]))):
        if isinstance(ev, Delta):
            first = first or time.monotonic()
        else:
            n = ev.completion_tokens
    return n, time.monotonic() - first
n, s = asyncio.run(go())
print(json.dumps({"tok_s": (n - 1) / s, "threads": backend.n_threads}))
"""


def measure(model: str, tokens: int, threads: str, busy: bool) -> dict[str, float]:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TORA_LLAMA_THREADS": threads}
        out = subprocess.run([sys.executable, "-c", CHILD, model, str(tokens)], capture_output=True, text=True,
                             env=env, check=True, timeout=1800).stdout
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--tokens", type=int, default=48)
    opts = ap.parse_args()
    cpus = len(os.sched_getaffinity(0))
    settings = {f"fixed {cpus}": str(cpus), "fixed 1": "1", "idle cores (default)": ""}
    print(f"{opts.model}, {opts.tokens} tokens, {cpus} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    print("| threads | alone tok/s | beside a busy core tok/s | threads used (alone / busy) |")
    print("|---|---|---|---|")
    for name, value in settings.items():
        alone = measure(opts.model, opts.tokens, value, busy=False)
        busy = measure(opts.model, opts.tokens, value, busy=True)
        print(f"| {name} | {alone['tok_s']:.2f} | {busy['tok_s']:.2f} | {alone['threads']:.0f} / {busy['threads']:.0f} |",
              flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
