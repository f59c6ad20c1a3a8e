"""`--engine ray`: its overhead against one process, and how trajectories/s scales with nodes.

    .venv/bin/python benchmarks/bench_ray.py overhead [--repeat 2] [--copies 4,20]
    .venv/bin/python benchmarks/bench_ray.py scaling [--nodes 1,2,4,8,12,16] [--out DIR]

overhead: the same workload (ToRA-Code-34B's first 15 GSM8K completions,
replayed `--copies` times, every cell run by a real sandboxed kernel, graded)
through `tora eval`'s own single-process loop and through `run_on_cluster`
with one Ray worker of the same capacity, on a Ray cluster on loopback that
is already up, alternated `--repeat` times, side by side in one process.
Printed: each wall time and the ratio; the marginal time per trajectory of
each engine (the slope between two workload sizes, free of fixed costs) and
its ratio (goal <= 1.10); Ray's fixed costs (starting the cluster, once;
starting the worker, each run).

scaling: a simulated cluster of `max(--nodes)` one-CPU nodes (Ray's
`cluster_utils.Cluster`: real raylets, real actors, real RPCs, all on this
machine) and `--endpoints` simulated serving endpoints
(`benchmarks/simulate.py`'s `Endpoint`: `--slots` sequences at once,
`--tokens-per-s` each; a request waits for a slot). One worker per node runs
`--concurrency` trajectories at once. What is simulated, and why: the GPUs
(the endpoints pace the replayed tokens instead of computing them) and the
cores (cells sleep `--cell-s` instead of running in kernels, grading is
off), because sixteen nodes' worth of kernels and graders do not fit on
two cores; the scheduler, the workers, the shards, the leases and the merge
are the real ones. Printed: trajectories/s per node count, and the
endpoints' occupancy; written: DIR/scaling.svg and DIR/scaling.html (bars
drawn by `tora.report.charts`, as in `tora report`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from html import escape
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tora.distributed.cluster import LOOPBACK_ENV

os.environ.update(LOOPBACK_ENV)  # before Ray is imported: everything on 127.0.0.1

import ray
import simulate
from rich.console import Console
from simulate import Endpoint, PacedBackend, SleepKernels

from tora.backends.registry import load_backend
from tora.cli.eval import _run as eval_run
from tora.data import load_problems
from tora.distributed.driver import ClusterOptions, ClusterRun, run_on_cluster
from tora.distributed.plan import EvalPlan
from tora.distributed.worker import WorkerSetup
from tora.engine import SolveConfig
from tora.kernels import sandbox_policy
from tora.prompts import load_prompt
from tora.record import Problem, TrajectoryWriter
from tora.report.charts import Bar, hbars
from tora.scheduler import Capacity, Graded

# The workers are Ray processes that cannot import benchmarks/: they get these classes by value.
ray.cloudpickle.register_pickle_by_value(simulate)

ROOT = Path(__file__).resolve().parents[1]
HEAD = ROOT / "tests" / "data" / "released_gsm8k_head.jsonl"  # the first 15 rows (MIT)
SPEC = f"replay:{HEAD}"


def workload(copies: int) -> list[Problem]:
    """The 15 problems `copies` times over, each copy its own id (the replay finds it by question)."""
    base = load_problems("gsm8k", limit=15)
    return [p.model_copy(update={"id": f"{p.id}-c{c}"}) for c in range(copies) for p in base]


def quiet() -> Console:
    return Console(file=io.StringIO())


def count(out: Path) -> int:
    path = out / "trajectories.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def steady_rate(out: Path) -> float:
    """Trajectories/s between the 10th and the 90th percentile of finishing times: no ramp-up, no tail."""
    from datetime import datetime

    times = sorted(datetime.fromisoformat(json.loads(line)["created_at"]).timestamp()
                   for line in (out / "trajectories.jsonl").read_text().splitlines() if line.strip())
    lo, hi = int(0.1 * len(times)), int(0.9 * len(times))
    return (hi - lo) / (times[hi] - times[lo]) if times[hi] > times[lo] else 0.0


# --- overhead -------------------------------------------------------------------


async def one_process(problems: list[Problem], capacity: Capacity, out: Path) -> float:
    template, config = load_prompt("tora-gsm8k"), SolveConfig()
    backend = load_backend(SPEC)
    new: list[Graded] = []
    t0 = time.perf_counter()
    with TrajectoryWriter(out / "trajectories.jsonl") as writer:
        await eval_run([(p, 0) for p in problems], backend, template, config, sandbox_policy(timeout_s=10.0), SPEC,
                       "math-verify", capacity, "bench", 1, writer, new, quiet(), len(problems), 0, 0)
    return time.perf_counter() - t0


async def on_ray(problems: list[Problem], capacity: Capacity, out: Path) -> tuple[float, float]:
    """(wall, the part after the worker was up)."""
    setup = WorkerSetup(model=SPEC, template=load_prompt("tora-gsm8k"), policy=sandbox_policy(timeout_s=10.0),
                        grader="math-verify", capacity=capacity, run_id="bench", plan=EvalPlan(1, SolveConfig()))
    started: list[float] = []
    t0 = time.perf_counter()
    await run_on_cluster(out, problems, setup, ClusterOptions(workers=1), on_started=lambda _: started.append(
        time.perf_counter()))
    end = time.perf_counter()
    return end - t0, end - started[0]


def overhead(args: argparse.Namespace) -> None:
    capacity = Capacity(in_flight=4, kernels=4, graders=1)
    sizes = [int(c) for c in args.copies.split(",")]
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, namespace="tora", log_to_driver=False, logging_level="ERROR")
    init_s = time.perf_counter() - t0
    local: dict[int, list[float]] = {c: [] for c in sizes}
    dist: dict[int, list[tuple[float, float]]] = {c: [] for c in sizes}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        for r in range(args.repeat):
            for c in sizes:
                problems = workload(c)
                a, b = Path(tmp) / f"local{r}-{c}", Path(tmp) / f"ray{r}-{c}"
                a.mkdir()
                local[c].append(asyncio.run(one_process(problems, capacity, a)))
                dist[c].append(asyncio.run(on_ray(problems, capacity, b)))
                assert count(a) == count(b) == len(problems), (count(a), count(b))
                print(f"  run {r + 1}, {len(problems)} trajectories: one process {local[c][-1]:.1f} s, ray "
                      f"{dist[c][-1][0]:.1f} s ({dist[c][-1][1]:.1f} s after the worker was up)", flush=True)
    ray.shutdown()
    print(f"\noverhead: real kernels, math-verify grading, capacity {capacity.in_flight}/{capacity.kernels}/"
          f"{capacity.graders} (in flight/kernels/graders) in one process and in the one Ray worker; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| trajectories | one process: best wall (s) | ray, 1 worker: best wall (s) | ratio | runs (s) |")
    print("|---|---|---|---|---|")
    for c in sizes:
        lo, rw = min(local[c]), min(d[0] for d in dist[c])
        runs = "; ".join(f"{x:.1f} / {d[0]:.1f}" for x, d in zip(local[c], dist[c], strict=True))
        print(f"| {15 * c} | {lo:.1f} | {rw:.1f} | {rw / lo:.2f} | {runs} |")
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        n = 15 * (large - small)
        slope_local = (min(local[large]) - min(local[small])) / n
        slope_ray = (min(d[0] for d in dist[large]) - min(d[0] for d in dist[small])) / n
        fixed = min(d[0] for d in dist[small]) - slope_ray * 15 * small
        print(f"per trajectory, marginal (the slope between {15 * small} and {15 * large}): one process "
              f"{1000 * slope_local:.1f} ms, ray {1000 * slope_ray:.1f} ms: ratio {slope_ray / slope_local:.2f} "
              f"(goal <= 1.10)")
        print(f"fixed cost of a ray run on a running cluster (the intercept): {fixed:.1f} s; "
              f"one process: {min(local[small]) - slope_local * 15 * small:.1f} s")
    print(f"one-off: ray.init of a local cluster {init_s:.1f} s; starting the worker "
          f"{statistics.median(d[0] - d[1] for c in sizes for d in dist[c]):.1f} s (median)")


# --- scaling --------------------------------------------------------------------


def scaling(args: argparse.Namespace) -> None:
    from ray.cluster_utils import Cluster

    nodes = [int(n) for n in args.nodes.split(",")]
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(max(nodes)):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, namespace="tora", log_to_driver=False, logging_level="ERROR")
    cluster.wait_for_nodes()
    print(f"simulated cluster: {max(nodes)} one-CPU nodes + a head, up in {time.perf_counter() - t0:.0f} s", flush=True)
    remote_endpoint = ray.remote(Endpoint).options(num_cpus=0, max_concurrency=10_000)
    endpoints = [remote_endpoint.remote(args.slots, args.tokens_per_s) for _ in range(args.endpoints)]
    ray.get([e.load.remote() for e in endpoints])
    capacity = Capacity(in_flight=args.concurrency, kernels=args.concurrency, graders=1)
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-ray-scale-") as tmp:
        for n in nodes:
            copies = math.ceil((args.per_node * n + 60) / 15)
            problems = workload(copies)
            setup = WorkerSetup(
                model=SPEC, template=load_prompt("tora-gsm8k"), policy=sandbox_policy(timeout_s=10.0), grader=None,
                capacity=capacity, run_id="bench", plan=EvalPlan(1, SolveConfig()),
                backend_factory=functools.partial(PacedBackend, HEAD, endpoints),
                kernels_factory=functools.partial(SleepKernels, args.cell_s))
            started: list[float] = []
            before = ray.get([e.load.remote() for e in endpoints])

            def mark(_: ClusterRun, started: list[float] = started) -> None:
                started.append(time.perf_counter())

            t0 = time.perf_counter()
            run = asyncio.run(run_on_cluster(Path(tmp) / f"n{n}", problems, setup,
                                             ClusterOptions(workers=n, worker_cpus=1.0), on_started=mark))
            end = time.perf_counter()
            after = ray.get([e.load.remote() for e in endpoints])
            elapsed = end - started[0]
            tokens = sum(a["tokens"] - b["tokens"] for a, b in zip(after, before, strict=True))
            occupancy = tokens / args.tokens_per_s / (args.endpoints * args.slots * elapsed)
            made = count(Path(tmp) / f"n{n}")
            assert made == len(problems), (made, len(problems))
            row = {"nodes": n, "workers": len(run.workers), "distinct_nodes": len({w.node for w in run.workers}),
                   "trajectories": made, "seconds": round(elapsed, 1), "traj_per_s": round(made / elapsed, 2),
                   "steady_traj_per_s": round(steady_rate(Path(tmp) / f"n{n}"), 2),
                   "tokens_per_s": round(tokens / elapsed), "endpoint_occupancy": round(occupancy, 2),
                   "worker_start_s": round(started[0] - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    ray.shutdown()
    cluster.shutdown()
    ideal = rows[0]["steady_traj_per_s"] / rows[0]["nodes"]
    cap = args.endpoints * args.slots * args.tokens_per_s
    print(f"\nscaling: {args.endpoints} endpoints x {args.slots} slots x {args.tokens_per_s:g} tok/s per sequence "
          f"(at most {cap:g} tok/s), {args.concurrency} trajectories in flight per worker, cells {args.cell_s} s "
          f"(simulated); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| nodes | traj/s (steady) | traj/s (whole run) | x one node | linear would be | tok/s | "
          "endpoint occupancy | worker start (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['nodes']} | {r['steady_traj_per_s']:.2f} | {r['traj_per_s']:.2f} | "
              f"{r['steady_traj_per_s'] / rows[0]['steady_traj_per_s']:.1f} | {ideal * r['nodes']:.1f} | "
              f"{r['tokens_per_s']} | {100 * r['endpoint_occupancy']:.0f}% | {r['worker_start_s']} |")
    bars = [Bar(f"{r['nodes']} node{'s' if r['nodes'] > 1 else ''}", r["steady_traj_per_s"],
                f"{r['steady_traj_per_s']:.1f}/s · {100 * r['endpoint_occupancy']:.0f}%") for r in rows]
    svg = hbars(bars, title="trajectories/s by node count · endpoint occupancy (simulated endpoints and cells)")
    (out / "scaling.svg").write_text(svg)
    note = (f"{args.endpoints} simulated endpoints × {args.slots} slots × {args.tokens_per_s:g} tok/s; "
            f"{args.concurrency} in flight per worker; cells sleep {args.cell_s} s; one worker per one-CPU node")
    (out / "scaling.html").write_text(
        "<!doctype html><meta charset=utf-8><title>tora on Ray: scaling</title>"
        f"<body style='font-family:system-ui'><h1>tora on Ray: scaling</h1><p>{escape(note)}</p>{svg}"
        f"<pre>{escape(json.dumps(rows, indent=1))}</pre></body>")
    (out / "scaling.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    print(f"written: {out / 'scaling.svg'}, {out / 'scaling.html'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--repeat", type=int, default=2)
    o.add_argument("--copies", default="4,20", help="workload sizes: times the 15 problems are run")
    s = sub.add_parser("scaling")
    s.add_argument("--nodes", default="1,2,4,8,12,16")
    s.add_argument("--endpoints", type=int, default=4)
    s.add_argument("--slots", type=int, default=12)
    s.add_argument("--tokens-per-s", type=float, default=50.0)
    s.add_argument("--concurrency", type=int, default=8)
    s.add_argument("--cell-s", type=float, default=0.3)
    s.add_argument("--per-node", type=int, default=40, help="trajectories per node in a run (plus 60)")
    s.add_argument("--out", default=str(ROOT / "trajectories" / "bench-ray"))
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        overhead(args) if args.part == "overhead" else scaling(args)


if __name__ == "__main__":
    main()
