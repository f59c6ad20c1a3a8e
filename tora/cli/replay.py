"""`tora replay FILE`: re-run recorded code cells in fresh kernels, report what changed.

Exit: 0 every re-executed cell reproduced its recorded output, 4 at least one
cell differs or could not be run (the report names each: a check a script can
rely on), 2 bad file or usage, 1 infrastructure failure (no cell could run at
all), 130 interrupted.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from sandbox import KernelPool
from tora.errors import ToraError, UsageError
from tora.kernels import sandbox_policy
from tora.progress import BatchProgress
from tora.replaying import DEFAULT_TIMEOUT_S, CellReport, Job, Summary, load_jobs, replay_jobs

EXIT_DIFFERS = 4  # some re-executed cell did not reproduce its record (see the module's exit codes)


def short(text: str, width: int = 60) -> str:
    """One line, at most `width` characters, with its repr-style escapes."""
    flat = text.replace("\n", "\\n")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def describe(r: CellReport) -> str:
    where = r.id if r.sample_index == 0 else f"{r.id}#{r.sample_index}"
    if r.verdict == "error":
        return f"{where} cell {r.index}: could not run ({short(r.new, 100)})"
    return f"{where} cell {r.index}: recorded {short(r.recorded)!r} -> new {short(r.new)!r} [{r.status}]"


@click.command("replay")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1), default=None,
              help=f"Wall-time limit per cell, seconds [default: the record's own, else {DEFAULT_TIMEOUT_S:g}].")
@click.option("--limit", "-n", type=click.IntRange(1), default=None, help="Only the first N records.")
@click.option("--concurrency", "-c", type=click.IntRange(1), default=4, show_default=True,
              help="Trajectories replayed at once (each holds one kernel).")
@click.option("--fresh-namespace/--keep-state", "fresh_namespace", default=None,
              help="Run each cell alone, or keep state within a trajectory [default: as recorded; "
                   "ToRA rows keep state].")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary and every differing cell as one JSON line on stdout, nothing else.")
def replay(file: Path, timeout_s: float | None, limit: int | None, concurrency: int, fresh_namespace: bool | None,
           as_json: bool) -> int:
    """Re-execute the code cells recorded in FILE (tora trajectories or ToRA's released
    format) and report each cell whose new output differs from the recorded one."""
    if not file.is_file():
        raise UsageError(f"{file}: no such file")
    jobs = load_jobs(file, timeout_s=timeout_s, fresh_namespace=fresh_namespace, limit=limit)
    err = Console(stderr=True)
    out = err if as_json else Console()
    summary = Summary()
    t0 = time.monotonic()
    interrupted = False
    try:
        asyncio.run(_run(jobs, concurrency, summary, err, out))
    except KeyboardInterrupt:
        interrupted = True
    summary.wall_s = time.monotonic() - t0
    line = (f"{summary.trajectories} trajectories, {summary.cells} cells: {summary.same} same, "
            f"{summary.differ} differ, {summary.errors} errors, {summary.wall_s:.1f} s")
    out.print(line + (" (interrupted)" if interrupted else ""), highlight=False)
    if as_json:
        sys.stdout.write(json.dumps({**summary.as_dict(), "file": str(file), "complete": not interrupted}) + "\n")
        sys.stdout.flush()
    if interrupted:
        raise KeyboardInterrupt
    if summary.cells and summary.errors == summary.cells:
        raise ToraError("no cell could be run; see the reports above")
    return EXIT_DIFFERS if summary.differ or summary.errors else 0


async def _run(jobs: list[Job], concurrency: int, summary: Summary, err: Console, out: Console) -> None:
    timeout = max((j.timeout_s for j in jobs), default=DEFAULT_TIMEOUT_S)
    pool = KernelPool(sandbox_policy(timeout_s=timeout), size=min(concurrency, 4))
    try:
        await pool.start()
        with BatchProgress(err, "replay", len(jobs), score_label="same") as progress:
            stream = replay_jobs(jobs, pool, concurrency)
            try:
                async for _job, reports in stream:
                    summary.add(reports)
                    for r in reports:
                        if r.verdict != "same":
                            out.print(escape(describe(r)), highlight=False)
                    progress.advance(all(r.verdict == "same" for r in reports))
            finally:
                await stream.aclose()
    finally:
        await pool.close()
