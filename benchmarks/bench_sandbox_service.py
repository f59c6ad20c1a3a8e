"""`tora sandbox serve` against a subprocess-per-request runner, side by side in one run.

The runner is the design SandboxFusion uses for python (a fresh `python` process per
request, stdout and stderr captured, no isolation), served here over HTTP the same way
(FastAPI + uvicorn, one process) so both pay the same HTTP costs. Figures:

1. requests/s and p50/p99 latency of `print(1+1)` and of a sympy cell through
   SandboxFusion's /run_code, at 1, 8 and 64 concurrent clients, for both;
2. load: S sessions x R requests each through NeMo-Skills' /execute, all at once:
   answered, the server's RSS (with its kernels' tree) at the start and end, and
   that no process of it is left after shutdown;
3. fork: POST /sessions/{id}/fork latency p50/p99 on a 4-cell session (after a cell each
   time, and in a row with none between), and that fork against re-running the 4 cells in a
   fresh session; each once the pool's refills are done.

    python benchmarks/bench_sandbox_service.py [--requests 64] [--load-sessions 64 --load-requests 200]

The machine is usually shared: say so with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tora.serve.process import SandboxServeProcess

PRINT = "print(1+1)"
SYMPY = "import sympy\nx = sympy.symbols('x')\nprint(sympy.solve(x**2 - 4, x))"
LEVELS = (1, 8, 64)

# The baseline: a fresh interpreter per request, as SandboxFusion runs python.
BASELINE_APP = r'''
import asyncio, sys, time
from fastapi import FastAPI, Request
app = FastAPI()

@app.post("/run_code")
async def run_code(request: Request):
    req = await request.json()
    t0 = time.monotonic()
    p = await asyncio.create_subprocess_exec(sys.executable, "-c", req["code"], stdin=asyncio.subprocess.DEVNULL,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(p.communicate(), req.get("run_timeout", 10))
    except asyncio.TimeoutError:
        p.kill()
        await p.wait()
        return {"status": "Failed", "message": "", "run_result": {"status": "TimeLimitExceeded"}}
    return {"status": "Success" if p.returncode == 0 else "Failed", "message": "",
            "run_result": {"status": "Finished", "execution_time": time.monotonic() - t0,
                           "return_code": p.returncode, "stdout": out.decode(), "stderr": err.decode()}}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Baseline:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Baseline:
        code = BASELINE_APP + f"\nimport uvicorn\nuvicorn.run(app, host='127.0.0.1', port={self.port}, log_level='warning')\n"
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.post(f"{self.url}/run_code", json={"code": "pass"}, timeout=5)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the baseline server did not start")

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def drive(url: str, code: str, clients: int, total: int, sessions: bool = False) -> dict[str, float]:
    """`total` /run_code requests from `clients` concurrent clients; every answer checked.

    ``sessions``: NeMo-Skills' /execute instead, each client in a session of its own
    (one kernel per client, reused), as a stateful RL rollout calls it."""
    latencies: list[float] = []
    failures = 0
    queue = list(range(total))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        sids = [str(uuid.uuid4()) for _ in range(clients)]
        if sessions:
            # The sessions' kernels are started before the clock starts.
            await asyncio.gather(*(http.post("/execute", headers={"X-Session-ID": sid}, json={"generated_code": "pass"})
                                   for sid in sids))

        async def client(sid: str) -> None:
            nonlocal failures
            while queue:
                queue.pop()
                t0 = time.perf_counter()
                if sessions:
                    r = await http.post("/execute", headers={"X-Session-ID": sid},
                                        json={"generated_code": code, "timeout": 60, "language": "ipython"})
                    ok = r.status_code == 200 and r.json()["process_status"] == "completed"
                else:
                    r = await http.post("/run_code", json={"code": code, "language": "python", "run_timeout": 60})
                    ok = r.status_code == 200 and r.json()["status"] == "Success"
                latencies.append(time.perf_counter() - t0)
                failures += not ok

        t0 = time.perf_counter()
        await asyncio.gather(*(client(sid) for sid in sids))
        wall = time.perf_counter() - t0
        if sessions:
            await asyncio.gather(*(http.delete(f"/sessions/{sid}") for sid in sids))
    return {"rps": total / wall, "p50_ms": pct(latencies, 0.5) * 1000, "p99_ms": pct(latencies, 0.99) * 1000,
            "failures": failures, "n": total}


def tree_rss_mb(pid: int) -> float:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


async def load(url: str, sessions: int, requests: int) -> dict[str, Any]:
    """`sessions` NeMo-Skills sessions at once, `requests` cells each, each request checked."""
    answered = wrong = 0
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=sessions, max_keepalive_connections=sessions)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:

        async def session() -> None:
            nonlocal answered, wrong
            sid = str(uuid.uuid4())
            for i in range(requests):
                code = "n = 0" if i == 0 else "n += 1\nprint(n)"
                t0 = time.perf_counter()
                r = await http.post("/execute", headers={"X-Session-ID": sid}, json={
                    "generated_code": code, "timeout": 30, "language": "ipython", "std_input": "",
                    "max_output_characters": 1000, "traceback_verbosity": "Plain"})
                latencies.append(time.perf_counter() - t0)
                answered += r.status_code == 200
                if i and (r.status_code != 200 or r.json()["stdout"] != f"{i}\n"):
                    wrong += 1
            await http.delete(f"/sessions/{sid}")

        t0 = time.perf_counter()
        await asyncio.gather(*(session() for _ in range(sessions)))
        wall = time.perf_counter() - t0
    return {"answered": answered, "wrong": wrong, "total": sessions * requests, "rps": sessions * requests / wall,
            "p50_ms": pct(latencies, 0.5) * 1000, "p99_ms": pct(latencies, 0.99) * 1000}


PREFIX = [
    "import numpy as np\nimport sympy as sp",
    "x = sp.symbols('x')\nroots = sp.solve(x**3 - 6*x**2 + 11*x - 6, x)",
    "a = np.arange(10000)\ns = int((a ** 2).sum())",
    "table = {r: sp.factorint(s + int(r)) for r in roots}\nprint(len(table))",
]


async def fork_bench(url: str, forks: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:

        async def execute(sid: str, code: str) -> None:
            r = await http.post("/execute", headers={"X-Session-ID": sid},
                                json={"generated_code": code, "timeout": 60, "language": "ipython"})
            assert r.status_code == 200 and r.json()["process_status"] == "completed", r.text

        async def settle() -> None:
            # The pool's refills done (the steady state of a server not saturated): what a fork
            # costs itself, not the kernel starts that the previous one set off.
            while (await http.get("/health")).json()["pool"]["starting"]:
                await asyncio.sleep(0.01)

        source = str(uuid.uuid4())
        for cell in PREFIX:
            await execute(source, cell)
        fork_s: list[float] = []
        again_s: list[float] = []
        method = ""
        for i in range(2 * forks):
            if i < forks:
                # A cell since the last fork: the source takes a new snapshot. After these, forks in a
                # row of a source that ran nothing since (it keeps its snapshot: sandbox/README.md).
                await execute(source, "pass")
            await settle()
            t0 = time.perf_counter()
            r = await http.post(f"/sessions/{source}/fork")
            (fork_s if i < forks else again_s).append(time.perf_counter() - t0)
            body = r.json()
            method = body["method"]
            await http.delete(f"/sessions/{body['session_id']}")
        rerun_s: list[float] = []
        for _ in range(forks):
            sid = str(uuid.uuid4())
            await settle()
            t0 = time.perf_counter()
            for cell in PREFIX:
                await execute(sid, cell)
            rerun_s.append(time.perf_counter() - t0)
            await http.delete(f"/sessions/{sid}")
        await http.delete(f"/sessions/{source}")
    return {"method": method, "fork_p50_ms": pct(fork_s, 0.5) * 1000, "fork_p99_ms": pct(fork_s, 0.99) * 1000,
            "fork_again_p50_ms": pct(again_s, 0.5) * 1000, "fork_again_p99_ms": pct(again_s, 0.99) * 1000,
            "rerun_p50_ms": pct(rerun_s, 0.5) * 1000, "n": forks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64, help="requests per level for print(1+1)")
    ap.add_argument("--sympy-requests", type=int, default=32, help="requests per level for the sympy cell")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    ap.add_argument("--load-sessions", type=int, default=64)
    ap.add_argument("--load-requests", type=int, default=200)
    ap.add_argument("--forks", type=int, default=20)
    ap.add_argument("--skip-throughput", action="store_true", help="only the load and fork figures")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    load1 = os.getloadavg()[0]
    out: dict[str, Any] = {"cpus": os.cpu_count(), "loadavg_start": load1}
    server_args = ["--concurrency", "8", "--pool-size", "8", "--max-sessions", str(max(72, args.load_sessions + 8)),
                   "--max-queued", "4096", "--timeout", "60"]
    print(f"machine: {os.cpu_count()} CPUs, load average {load1:.1f} at start (shared with other work)")
    rows = []
    with SandboxServeProcess(server_args) as tora, Baseline() as base:
        for name, code, n in () if args.skip_throughput else (
                ("print(1+1)", PRINT, args.requests), ("sympy", SYMPY, args.sympy_requests)):
            for clients in levels:
                total = max(n, clients)
                b = asyncio.run(drive(base.url, code, clients, total))
                t = asyncio.run(drive(tora.url, code, clients, total))
                ts = asyncio.run(drive(tora.url, code, clients, total, sessions=True))
                rows.append({"cell": name, "clients": clients, "tora_fresh": t, "tora_session": ts, "subprocess": b})
                print(f"{name:10s} {clients:3d} clients | subprocess {b['rps']:6.1f} req/s p50 {b['p50_ms']:7.1f} "
                      f"p99 {b['p99_ms']:7.1f} ms | tora fresh kernel {t['rps']:6.1f} req/s p50 {t['p50_ms']:7.1f} "
                      f"p99 {t['p99_ms']:7.1f} ms {t['rps'] / b['rps']:5.2f}x | tora session {ts['rps']:6.1f} req/s "
                      f"p50 {ts['p50_ms']:6.1f} p99 {ts['p99_ms']:6.1f} ms {ts['rps'] / b['rps']:5.2f}x "
                      f"| failures {b['failures']}/{t['failures']}/{ts['failures']}", flush=True)
        out["throughput"] = rows
        server = psutil.Process(tora.pid)
        rss_start, server_start = tree_rss_mb(tora.pid), server.memory_info().rss / 2**20
        try:
            ld = asyncio.run(load(tora.url, args.load_sessions, args.load_requests))
        except httpx.HTTPError:
            print("".join(tora.stderr[-40:]), file=sys.stderr)
            raise
        # The released sessions' kernels are torn down in the background: measure once they are.
        time.sleep(3)
        rss_end, server_end = tree_rss_mb(tora.pid), server.memory_info().rss / 2**20
        ld.update(rss_start_mb=rss_start, rss_end_mb=rss_end, server_rss_start_mb=server_start,
                  server_rss_end_mb=server_end)
        out["load"] = ld
        print(f"load {args.load_sessions} sessions x {args.load_requests}: {ld['answered']}/{ld['total']} answered, "
              f"{ld['wrong']} wrong, {ld['rps']:.0f} req/s, p50 {ld['p50_ms']:.1f} ms p99 {ld['p99_ms']:.1f} ms; "
              f"RSS of the server process {server_start:.0f} MB -> {server_end:.0f} MB, with its zygote and "
              f"warm kernels {rss_start:.0f} MB -> {rss_end:.0f} MB", flush=True)
        fk = asyncio.run(fork_bench(tora.url, args.forks))
        out["fork"] = fk
        print(f"fork ({fk['method']}): p50 {fk['fork_p50_ms']:.1f} ms p99 {fk['fork_p99_ms']:.1f} ms; "
              f"re-running the 4 cells in a new session p50 {fk['rerun_p50_ms']:.1f} ms "
              f"({fk['rerun_p50_ms'] / fk['fork_p50_ms']:.2f}x); forks in a row of an unchanged session "
              f"p50 {fk['fork_again_p50_ms']:.1f} ms p99 {fk['fork_again_p99_ms']:.1f} ms "
              f"({fk['rerun_p50_ms'] / fk['fork_again_p50_ms']:.2f}x)", flush=True)
        # Every process of the server: its zygote, the zygote's bwrap and every kernel.
        tree = [psutil.Process(tora.pid), *psutil.Process(tora.pid).children(recursive=True)]
    time.sleep(1)
    left = [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    out["left_after_shutdown"] = left
    out["loadavg_end"] = os.getloadavg()[0]
    print(f"after shutdown: {len(left)} of the server's {len(tree)} processes left; "
          f"load average {out['loadavg_end']:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
