"""Embedded model figures: first-ever set-up, warm start to first token,
single-stream decode speed. Prints figures and their ratio to the goals.

    .venv/bin/python benchmarks/bench_embedded.py

Goals (issue 2, 2-core CPU): warm start to first token <= 2 s; decode >= 45 tok/s.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import asyncio, json, sys, time
t_start = float(sys.argv[1])
from tora.backends.registry import load_backend
from tora.backends.base import Delta, GenerationRequest
from tora.prompts import load_prompt
backend = load_backend("embedded")
t_loaded = time.time()
template = load_prompt("tora-gsm8k")
if sys.argv[4] == "prefix-cache":
    from tora.backends.registry import warm_prefix
    warm_prefix(backend, template.prefix)  # what `tora solve` does
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
                  "decode_tok_s": (n - 1) / (end - first), "tokens": n}))
"""

QUESTION = "A farmer has 17 sheep and buys 5 more each week. How many sheep does he have after 6 weeks?"


def run_child(home: str, max_tokens: int, mode: str = "plain") -> dict[str, float]:
    env = dict(os.environ, TORA_HOME=home)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, repr(t0), QUESTION, str(max_tokens), mode],
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        t0 = time.time()
        subprocess.run([sys.executable, "-c", "from tora.backends.embedded import embedded_model_path as p; p()"],
                       env=dict(os.environ, TORA_HOME=home), check=True)
        setup_s = time.time() - t0
        first = run_child(home, 8)
        warm = [run_child(home, 8) for _ in range(3)]
        decode = [run_child(home, 256) for _ in range(2)]
        run_child(home, 8, "prefix-cache")  # computes and stores the prefix state
        cached = [run_child(home, 8, "prefix-cache") for _ in range(3)]
    ttft = statistics.median(w["first_token_s"] for w in warm)
    tok_s = statistics.median(d["decode_tok_s"] for d in decode)
    print(f"first-ever set-up (assemble + verify GGUF): {setup_s:.2f} s")
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
