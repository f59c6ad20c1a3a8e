"""`tora serve` under load: many concurrent clients, a replayed model, then the real one.

    .venv/bin/python benchmarks/bench_serve.py [--requests 1000] [--clients 32] [--concurrency 16]
                                               [--embedded 50] [--embedded-max-tokens 256]

Phase 1 serves ToRA-Code-34B's released GSM8K trajectories (`replay:`; every
```python block is executed again in a fresh sandboxed kernel) to `--clients`
concurrent HTTP clients, `--requests` requests in all (each a different
problem, cycling over the 1319); phase 2 does `--embedded` requests with the
embedded Gemma 3 270M. For each: requests/s, p50/p99 latency, how many came
back answered, the server's RSS at start, after the first tenth and at the
end (flat means no leak), its live kernels once idle, and the server's child
processes still alive after it stopped (both should be 0). Trajectories are
recorded (to a temporary file), as in real use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from tora.data import data_dir
from tora.serve.process import ServeProcess

RELEASED = data_dir() / "released/tora-code-34b-v1.0/gsm8k/test_tora_-1_seed0_t0.0_s0_e1319.jsonl"


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def load(server: ServeProcess, questions: list[str], clients: int, max_tokens: int | None,
               at_tenth: list[float]) -> tuple[list[float], list[dict[str, Any]], float]:
    """Send every question once, `clients` at a time; latencies (s), responses, wall time."""
    todo: asyncio.Queue[str] = asyncio.Queue()
    for q in questions:
        todo.put_nowait(q)
    latencies: list[float] = []
    answers: list[dict[str, Any]] = []
    tenth = max(1, len(questions) // 10)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=server.url, timeout=3600, limits=limits) as http:

        async def client() -> None:
            while not todo.empty():
                question = todo.get_nowait()
                body: dict[str, Any] = {"model": "tora", "prompt": question}
                if max_tokens:
                    body["max_tokens"] = max_tokens
                t0 = time.perf_counter()
                r = await http.post("/completions", json=body)
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                answers.append(r.json()["choices"][0]["tora"]["trajectory"]["result"])
                if len(answers) == tenth:
                    at_tenth.append(rss_mb(server.pid))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return latencies, answers, time.perf_counter() - t0


def phase(name: str, spec: str, questions: list[str], clients: int, concurrency: int,
          max_tokens: int | None) -> dict[str, Any]:
    record = Path(tempfile.mkdtemp()) / "serve.jsonl"
    args = ["--model", spec, "--concurrency", str(concurrency), "--max-queued", str(max(64, clients)),
            "--record-to", str(record)]
    with ServeProcess(args) as server:
        health = server.url.removesuffix("/v1") + "/health"
        time.sleep(2)  # let the warm pool fill, so "start" is the idle server
        start = rss_mb(server.pid)
        at_tenth: list[float] = []
        latencies, answers, wall = asyncio.run(load(server, questions, clients, max_tokens, at_tenth))
        end = rss_mb(server.pid)
        idle = httpx.get(health).json()
        tree = psutil.Process(server.pid).children(recursive=True)
        status = server.stop()
    left = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    recorded = sum(1 for _ in record.open())
    lat = sorted(latencies)
    return {
        "phase": name, "requests": len(answers), "clients": clients, "concurrency": concurrency,
        "wall_s": round(wall, 1), "requests_per_s": round(len(answers) / wall, 2),
        "p50_s": round(statistics.median(lat), 3), "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
        "answered": sum(a["finish"] == "answered" for a in answers),
        "finish": {f: sum(a["finish"] == f for a in answers) for f in sorted({a["finish"] for a in answers})},
        "rss_mb": {"start": round(start, 1), "tenth": round(at_tenth[0], 1) if at_tenth else None,
                   "end": round(end, 1)},
        "kernels_live_idle": idle["kernels_live"], "kernels_peak": idle["kernels_peak"],
        "processes_left_after_stop": len(left), "exit": status, "recorded": recorded,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16, help="the server's --concurrency (trajectories in flight)")
    ap.add_argument("--embedded", type=int, default=50, help="requests with the embedded model (0: skip)")
    ap.add_argument("--embedded-concurrency", type=int, default=4)
    ap.add_argument("--embedded-max-tokens", type=int, default=256)
    args = ap.parse_args()
    if not RELEASED.is_file():
        sys.exit(f"needs ToRA's released GSM8K outputs at {RELEASED} (set TORA_DATA_DIR to the data folder)")
    rows = [json.loads(line) for line in RELEASED.read_text().splitlines()]
    questions = [rows[i % len(rows)]["question"] for i in range(args.requests)]
    load1 = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load1[0]:.1f} at start", flush=True)
    results = [phase("replay", f"replay:{RELEASED}", questions, args.clients, args.concurrency, None)]
    print(json.dumps(results[-1]), flush=True)
    if args.embedded:
        results.append(phase("embedded", "embedded-tiny", [r["question"] for r in rows[: args.embedded]], args.clients,
                             args.embedded_concurrency, args.embedded_max_tokens))
        print(json.dumps(results[-1]), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    print(f"{'phase':<9} {'req':>5} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} {'answered':>9} "
          f"{'RSS MB start/tenth/end':>24} {'kernels idle':>13} {'left':>5}")
    for r in results:
        rss = r["rss_mb"]
        print(f"{r['phase']:<9} {r['requests']:>5} {r['requests_per_s']:>7} {r['p50_s']:>7} {r['p99_s']:>7} "
              f"{r['answered']:>9} {str(rss['start']) + '/' + str(rss['tenth']) + '/' + str(rss['end']):>24} "
              f"{r['kernels_live_idle']:>13} {r['processes_left_after_stop']:>5}")


if __name__ == "__main__":
    main()
