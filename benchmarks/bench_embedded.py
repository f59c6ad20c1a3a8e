"""Tiny embedded model (embedded-tiny, Gemma 3 270M) figures: first-ever set-up, warm start to first token,
single-stream decode speed, for the llama.cpp build setup.sh makes. Prints
figures and their ratio to the goals, and every CPU variant of that build
side by side (each run in its own process; one that crashes is reported as
such), marking the one tora chose for this machine.

    .venv/bin/python benchmarks/bench_embedded.py [--all-variants]

Goals (2-core CPU): warm start to first token <= 2 s; decode >= 45 tok/s.
The default model's figures: bench_default_model.py.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

CHILD = r"""
import asyncio, json, sys, time
t_start = float(sys.argv[1])
from tora.backends.registry import load_backend
from tora.backends.base import Delta, GenerationRequest
from tora.prompts import load_prompt
backend = load_backend("embedded-tiny")
t_loaded = time.time()
template = load_prompt("tora-gsm8k")
if sys.argv[4] == "prefix-cache":
    backend.prepare(template.prefix)  # what `tora solve` does
prompt = template.fill(sys.argv[2])
async def go():
    first = None; n = 0
    async for ev in backend.stream(GenerationRequest(prompt=prompt, max_tokens=int(sys.argv[3]))):
        if isinstance(ev, Delta) and first is None:
            first = time.time()
        elif not isinstance(ev, Delta):
            n = ev.completion_tokens
    return first, n, time.time()
first, n, end = asyncio.run(go())
print(json.dumps({"load_s": t_loaded - t_start, "first_token_s": first - t_start,
                  "decode_tok_s": (n - 1) / (end - first), "tokens": n, "variant": backend.cpu_variant}))
"""

QUESTION = "A farmer has 17 sheep and buys 5 more each week. How many sheep does he have after 6 weeks?"


def run_child(home: str, max_tokens: int, mode: str = "plain", variant: str = "") -> dict[str, Any]:
    env = dict(os.environ, TORA_HOME=home, TORA_GGML_CPU=variant)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, repr(t0), QUESTION, str(max_tokens), mode],
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


def measure(home: str, variant: str = "") -> tuple[float, float]:
    """Warm start to first token as `tora solve` runs (prefix state cached), and decode tok/s; medians."""
    run_child(home, 8, "prefix-cache", variant)  # stores the prefix state
    ttft = statistics.median(run_child(home, 8, "prefix-cache", variant)["first_token_s"] for _ in range(3))
    tok_s = statistics.median(run_child(home, 256, "plain", variant)["decode_tok_s"] for _ in range(2))
    return ttft, tok_s


def variants_side_by_side(home: str, chosen: str) -> None:
    from tora.backends import ggml_cpu

    print("\nevery CPU variant of this build, side by side (warm start to first token, decode):")
    for probe in ggml_cpu.probe_all(stop_at_first=False):
        mark = "  <- chosen" if probe.variant == chosen else ""
        if not probe.ok:
            print(f"  {probe.variant:15s} does not run here: {probe.detail}{mark}")
            continue
        ttft, tok_s = measure(home, probe.variant)
        print(f"  {probe.variant:15s} {ttft:5.2f} s  {tok_s:6.1f} tok/s  (cpuid score {probe.score}){mark}")


def main() -> None:
    all_variants = "--all-variants" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as home:
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "tora.backends.ggml_cpu", "check"],
                       env=dict(os.environ, TORA_HOME=home), check=True)
        setup_s = time.time() - t0
        first = run_child(home, 8)
        warm = [run_child(home, 8) for _ in range(3)]
        decode = [run_child(home, 256) for _ in range(2)]
        run_child(home, 8, "prefix-cache")  # computes and stores the prefix state
        cached = [run_child(home, 8, "prefix-cache") for _ in range(3)]
        chosen = str(cached[0]["variant"])
        if all_variants:
            variants_side_by_side(home, chosen)
    ttft = statistics.median(w["first_token_s"] for w in warm)
    tok_s = statistics.median(d["decode_tok_s"] for d in decode)
    print(f"llama.cpp CPU backend chosen for this machine: {chosen}")
    print(f"first-ever set-up (assemble + verify GGUF, probe the CPU variants): {setup_s:.2f} s")
    print(f"first run after set-up, start to first token: {first['first_token_s']:.2f} s")
    print(f"warm start to first token (process start, imports, load, prompt eval), median of 3: {ttft:.2f} s"
          f"  (goal 2.0 s: {ttft / 2.0:.2f}x of budget)")
    ttft_cached = statistics.median(w["first_token_s"] for w in cached)
    print(f"warm start to first token with the few-shot prefix state cached (as tora solve runs), median of 3: "
          f"{ttft_cached:.2f} s  ({ttft_cached / 2.0:.2f}x of budget; {ttft / ttft_cached:.2f}x faster than without)")
    print(f"  of which model load: {statistics.median(w['load_s'] for w in warm):.2f} s")
    print(f"single-stream decode: {tok_s:.1f} tok/s  (goal 45: {tok_s / 45:.2f}x)")


if __name__ == "__main__":
    main()
