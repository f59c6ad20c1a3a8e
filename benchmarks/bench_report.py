"""`tora report` on large runs: build time, file size and (with chromium) the
time the page takes to load and render, for N and 10 x N trajectories side
by side, so the ratio shows how it scales.

The records are the five real ones under tests/data (a replayed ToRA-Code-34B
GSM8K eval) repeated with fresh ids.

    .venv/bin/python benchmarks/bench_report.py [--n 1000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tora.export.source import Source
from tora.record import Trajectory, read_trajectories
from tora.report import build_report

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "eval_gsm8k_replay5.jsonl"


def records(n: int) -> list[Trajectory]:
    base = list(read_trajectories(REAL))
    return [base[i % len(base)].model_copy(update={"id": f"{i:07d}", "sample_index": i // len(base)})
            for i in range(n)]


def browser_load(page: Path) -> float | None:
    chromium = shutil.which("chromium")
    if chromium is None:
        return None
    with tempfile.TemporaryDirectory() as profile:
        t0 = time.perf_counter()
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                        "--dump-dom", page.as_uri()], capture_output=True, timeout=300, check=True)
        return time.perf_counter() - t0


def measure(n: int, folder: Path) -> tuple[float, int, float | None]:
    recs = records(n)
    out = folder / f"report-{n}.html"
    t0 = time.perf_counter()
    build_report(Source(REAL, None), recs, out)
    built = time.perf_counter() - t0
    return built, out.stat().st_size, browser_load(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    n = ap.parse_args().n
    with tempfile.TemporaryDirectory() as tmp:
        browser_load(Path(__file__))  # warm chromium's first start (fonts, profile) out of the figures
        small, large = measure(n, Path(tmp)), measure(10 * n, Path(tmp))
    for count, (built, size, shown) in ((n, small), (10 * n, large)):
        view = "no chromium" if shown is None else f"{shown:.2f} s to load and render (chromium --dump-dom)"
        print(f"{count:>7} trajectories: built in {built:.2f} s, {size / 1e6:.1f} MB, {view}")
    print(f"ratio 10x records: build x{large[0] / small[0]:.1f}, size x{large[1] / small[1]:.1f}"
          + ("" if small[2] is None or large[2] is None else f", browser x{large[2] / small[2]:.1f}"))


if __name__ == "__main__":
    main()
