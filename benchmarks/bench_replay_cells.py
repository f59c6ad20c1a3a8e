"""Re-execute the first code cell of every trajectory of ToRA-Code-34B's released GSM8K outputs.

    .venv/bin/python benchmarks/bench_replay_cells.py [--file F] [--limit N] [--in-flight 8]

Three executors in the same run, on the ```python block of each ``code[0]``:
  1. tora's sandbox: one fresh sandboxed kernel per trajectory (pool, zygote, bwrap tier);
  2. ToRA-style: ``exec`` in a process pool (2 workers, new pool per batch, 5 s timeout);
  3. one reused plain kernel (the floor for any kernel-based executor; state leaks).
Prints wall times, ratios, and every cell whose output differs from the recorded
```output block (goal: 0 beyond nondeterministic ones).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import re
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernel import TreeCpu

from sandbox import CellResult, KernelPool, SandboxPolicy, start_kernel
from sandbox.tiers import check

DEFAULT = (
    Path(__file__).resolve().parents[2]
    / "shared/data/released/tora-code-34b-v1.0/gsm8k/test_tora_-1_seed0_t0.0_s0_e1319.jsonl"
)
CELL = re.compile(r"```python\n(.*?)```\s*```output\n(.*?)```", re.S)
CODE_ONLY = re.compile(r"```python\n(.*?)```", re.S)


def load(path: Path, limit: int | None) -> list[tuple[int, str, str | None]]:
    cells = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        text = row["code"][0]
        m = CELL.search(text)
        if m:
            cells.append((row["idx"], m.group(1), m.group(2)))
        else:
            c = CODE_ONLY.search(text)
            if c:
                cells.append((row["idx"], c.group(1), None))
    return cells[:limit] if limit else cells


def tora_render(stdout: str, error: str | None) -> str:
    """ToRA's rendering: stdout, else the last traceback line; long output cut to 200 + ... + 200."""
    out = stdout if stdout.strip() else (error or "")
    out = out.strip()
    if len(out) > 400:
        out = out[:200] + "..." + out[-200:]
    return out


def from_kernel(r: CellResult) -> str:
    err = None
    if r.error is not None:
        err = f"{r.error.ename}: {r.error.evalue}"
    return tora_render(r.stdout, err)


# --- ToRA-style executor --------------------------------------------------------


def _exec_worker(code: str) -> str:
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            exec(code, {"__name__": "__main__"})
        return tora_render(buf.getvalue(), None)
    except Exception:
        last = traceback.format_exc().strip().splitlines()[-1]
        return tora_render("", last)


def run_tora_style(cells: list[tuple[int, str, str | None]]) -> tuple[float, dict[int, str]]:
    t = time.perf_counter()
    out: dict[int, str] = {}
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        pending = [(idx, pool.apply_async(_exec_worker, (code,))) for idx, code, _ in cells]
        for idx, res in pending:
            try:
                out[idx] = res.get(timeout=5)
            except multiprocessing.TimeoutError:
                out[idx] = "Timeout Error"
    return time.perf_counter() - t, out


# --- kernels ----------------------------------------------------------------------


async def run_fresh_kernels(
    cells: list[tuple[int, str, str | None]], in_flight: int, tree: TreeCpu
) -> tuple[float, dict[int, str]]:
    out: dict[int, str] = {}
    policy = SandboxPolicy(timeout_s=5)
    async with KernelPool(policy, size=in_flight, max_starting=4) as pool:
        while pool.ready < min(in_flight, 4):
            await asyncio.sleep(0.05)
        sem = asyncio.Semaphore(in_flight)

        async def one(idx: int, code: str) -> None:
            async with sem:
                k = await pool.acquire()
                try:
                    out[idx] = from_kernel(await k.execute(code))
                finally:
                    await pool.release(k)

        t, c0 = time.perf_counter(), tree.seconds()
        await asyncio.gather(*(one(idx, code) for idx, code, _ in cells))
        dt, c1 = time.perf_counter() - t, tree.seconds()
        if c0 is not None and c1 is not None:
            print(
                f"fresh sandboxed kernels: {(c1 - c0) / len(cells) * 1000:.1f} ms of CPU per trajectory"
                f" (whole tree, runtime included); load average {os.getloadavg()[0]:.1f}"
            )
        return dt, out


async def run_reused_kernel(cells: list[tuple[int, str, str | None]]) -> tuple[float, dict[int, str]]:
    out: dict[int, str] = {}
    async with await start_kernel(SandboxPolicy(isolation="none", timeout_s=5)) as k:
        t = time.perf_counter()
        for idx, code, _ in cells:
            out[idx] = from_kernel(await k.execute(code))
        return time.perf_counter() - t, out


def diffs(cells: list[tuple[int, str, str | None]], got: dict[int, str]) -> list[tuple[int, str | None, str]]:
    bad = []
    for idx, _, recorded in cells:
        want = None if recorded is None else recorded.strip()
        if want != got.get(idx, "<missing>"):
            bad.append((idx, want, got.get(idx, "<missing>")))
    return bad


async def main(path: Path, limit: int | None, in_flight: int) -> None:
    cells = load(path, limit)
    print(f"{len(cells)} cells from {path.name}; sandbox tier: {check().tier}")
    t_tora, o_tora = run_tora_style(cells)
    t_reuse, o_reuse = await run_reused_kernel(cells)
    t_fresh, o_fresh = await run_fresh_kernels(cells, in_flight, TreeCpu())
    n = len(cells)
    print(f"ToRA-style exec in process pool : {t_tora:7.2f} s  {n / t_tora:7.1f} cells/s")
    print(f"one reused plain kernel         : {t_reuse:7.2f} s  {n / t_reuse:7.1f} cells/s")
    print(f"fresh sandboxed kernel per traj.: {t_fresh:7.2f} s  {n / t_fresh:7.1f} cells/s  ({in_flight} in flight)")
    print(f"ratio fresh-sandboxed / reused-kernel: {t_fresh / t_reuse:.2f}x (goal <= 4x, and <= 30 s for 1319)")
    print(f"ratio fresh-sandboxed / ToRA-style   : {t_fresh / t_tora:.2f}x")
    for name, got in (("ToRA-style", o_tora), ("reused kernel", o_reuse), ("fresh sandboxed", o_fresh)):
        bad = diffs(cells, got)
        print(f"{name}: {len(bad)} cells differ from the recorded output")
        for idx, want, have in bad:
            print(f"    idx {idx}: recorded {want!r:.80} got {have!r:.80}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=DEFAULT)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--in-flight", type=int, default=8)
    args = ap.parse_args()
    asyncio.run(main(args.file, args.limit, args.in_flight))
