"""`tora sandbox check`, `tora sandbox exec` and `tora sandbox serve`: see, exercise and serve the code sandbox."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from sandbox import CellResult, KernelPool, SandboxPolicy
from sandbox.tiers import check
from tora.cli.options import sandbox_options
from tora.cli.serve import listen, listen_options
from tora.errors import UsageError
from tora.kernels import sandbox_policy

ISOLATION = click.Choice(["auto", "bwrap", "landlock", "none"])
STATUS_STYLE = {"ok": "green", "error": "red", "timeout": "yellow", "died": "magenta"}


@click.group("sandbox")
def sandbox() -> None:
    """Inspect and exercise the sandbox that runs model-written code."""


@sandbox.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--isolation", type=ISOLATION, default=None, envvar="TORA_ISOLATION",
              help="Tier to check [default: auto, or TORA_ISOLATION; other limits: TORA_SANDBOX_<FIELD>].")
def check_cmd(as_json: bool, isolation: str | None) -> None:
    """Print which protections are in force here, and why the others are not."""
    report = check(sandbox_policy(isolation=isolation))  # the policy trajectories get
    if as_json:
        click.echo(report.model_dump_json())
        return
    console = Console(highlight=False)
    title = f"tier [bold]{report.tier}[/bold]" + (
        "" if report.isolated else " [bold red](NOT ISOLATED)[/bold red]"
    )
    console.print(title)
    for p in report.protections:
        mark = "[green]on [/green]" if p.active else "[red]off[/red]"
        console.print(f"  {mark} [bold]{p.name}[/bold]: {p.detail}")
    uid = "own (not root)" if report.host_uid is None else str(report.host_uid)
    console.print(
        f"  bwrap: {report.bwrap or 'unavailable'}; Landlock ABI: {report.landlock_abi or 'none'}; "
        f"pids cgroup: {'yes' if report.pids_cgroup else 'no'}; "
        f"memory cgroup: {'yes' if report.memory_cgroup else 'no'}; "
        f"seccomp: {'yes' if report.seccomp else 'no'}; kernels' host uid: {uid}; Linux {report.kernel_release}"
    )


@sandbox.command("exec")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--timeout", type=float, default=None, help="Seconds per cell.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with every cell's result.")
@click.option("--isolation", type=ISOLATION, default=None, envvar="TORA_ISOLATION",
              help="Sandbox tier [default: auto, or TORA_ISOLATION; other limits: TORA_SANDBOX_<FIELD>].")
@click.option(
    "--parallel", is_flag=True, help="Run each FILE in its own fresh kernel, all at once, from one pool."
)
def exec_cmd(
    files: tuple[Path, ...], timeout: float | None, as_json: bool, isolation: str | None, parallel: bool
) -> None:
    """Run each FILE as one cell in fresh pool kernels (as trajectories run).

    By default the files run in order in one kernel, so state carries over;
    with --parallel each file runs alone in its own kernel, all at once.
    Exits 0 even when cells fail: the results say how each one ended.
    """
    sources: list[tuple[Path, str]] = []
    for path in files:
        try:
            sources.append((path, path.read_text()))
        except FileNotFoundError:
            raise UsageError(f"no such file: {path}") from None
        except IsADirectoryError:
            raise UsageError(f"{path} is a directory, not a file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from None
    if timeout is not None and not timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, not {timeout:g}")
    policy = sandbox_policy(isolation=isolation, timeout_s=timeout)  # the policy trajectories get
    ran = asyncio.run(_run(policy, [code for _, code in sources], parallel))
    if as_json:
        cells = [
            {"file": str(path), **r.model_dump(), **({"kernel": info} if parallel else {})}
            for (path, _), (info, r) in zip(sources, ran, strict=True)
        ]
        click.echo(json.dumps({"kernel": ran[0][0], "parallel": parallel, "cells": cells}))
        return
    console = Console(highlight=False, soft_wrap=True)
    info = ran[0][0]
    how = "one fresh kernel per file, all at once" if parallel else "one fresh kernel, files in order"
    console.print(f"kernel: tier {info['tier']}, python {info['python']}; {how}", style="dim")
    for (path, _), (_, r) in zip(sources, ran, strict=True):
        console.print(_panel(path, r))


async def _run(
    policy: SandboxPolicy, cells: list[str], parallel: bool
) -> list[tuple[dict[str, Any], CellResult]]:
    """Each cell's result with the info of the kernel that ran it (pool kernels, as trajectories get)."""
    async with KernelPool(policy, size=1) as pool:

        async def in_fresh_kernel(codes: list[str]) -> list[tuple[dict[str, Any], CellResult]]:
            kernel = await pool.acquire()
            ran = []
            try:
                for code in codes:
                    result = await kernel.execute(code)
                    ran.append((kernel.info, result))
            finally:
                await pool.release(kernel)
            return ran

        if not parallel:
            return await in_fresh_kernel(cells)
        done = await asyncio.gather(*(in_fresh_kernel([code]) for code in cells))
        return [pair for one in done for pair in one]


@sandbox.command("serve")
@sandbox_options
@listen_options(8080, "every route but /health")
@click.option("--concurrency", "-c", type=click.IntRange(1), default=8, show_default=True,
              help="Stateless requests (/run_code, /run_jupyter, /execute without a session) running at once, "
                   "each in a fresh kernel.")
@click.option("--max-queued", type=click.IntRange(0), default=256, show_default=True,
              help="Stateless requests that may wait for a slot; beyond that: 429.")
@click.option("--max-sessions", type=click.IntRange(1), default=32, show_default=True,
              help="Live sessions (one kernel each); beyond that a new session gets 429 with Retry-After.")
@click.option("--session-ttl", type=click.FloatRange(0.1), default=600.0, show_default=True,
              help="Seconds an idle session lives before its kernel is released.")
@click.option("--pool-size", type=click.IntRange(1), default=None,
              help="Fresh kernels kept warm [default: as --concurrency, at most 8].")
@click.option("--max-timeout", type=click.FloatRange(0.1), default=300.0, show_default=True,
              help="The longest deadline a request may ask for, seconds (longer: 4xx).")
@click.option("--max-body-bytes", type=click.IntRange(1024), default=16 << 20, show_default=True,
              help="The largest request body accepted (larger: 413).")
def serve_cmd(host: str, port: int, api_key: str | None, concurrency: int, max_queued: int, max_sessions: int,
              session_ttl: float, pool_size: int | None, max_timeout: float, max_body_bytes: int,
              **kw: Any) -> None:
    """Serve fresh and session kernels over HTTP in SandboxFusion's and NeMo-Skills' formats.

    SandboxFusion: POST /run_code, POST /run_jupyter. NeMo-Skills: POST /execute
    (X-Session-ID for a session), DELETE /sessions/ID, GET /health. tora's own:
    POST /sessions/ID/fork. Kernels get the same sandbox policy as trajectories
    (--timeout is the deadline of a request that names none). SIGINT or
    SIGTERM stops it and shuts every kernel down.
    """
    from sandbox.service.app import create_app
    from sandbox.service.sessions import Service, ServiceLimits
    from tora.serve.server import run_until_stopped

    sock, api_key = listen(host, port, api_key)
    policy = sandbox_policy(timeout_s=kw["timeout_s"], isolation=kw["isolation"], memory_mb=kw["memory_mb"])
    limits = ServiceLimits(max_sessions=max_sessions, session_ttl_s=session_ttl, concurrency=concurrency,
                           max_queued=max_queued, max_timeout_s=max_timeout)
    pool = KernelPool(policy, size=pool_size or min(concurrency, 8))
    service = Service(pool, limits)

    async def main() -> None:
        try:
            await service.start()
            app = create_app(service, api_key=api_key, max_body_bytes=max_body_bytes)

            def started(url: str) -> None:
                click.echo(f"tora sandbox serve: {url} · tier {pool.launcher.tier} · {concurrency} stateless at "
                           f"once · {max_sessions} sessions, idle {session_ttl:g} s", err=True)

            # Execution clients keep large connection pools (NeMo-Skills: 2048) idle between cells.
            await run_until_stopped(app, sock, "tora sandbox serve", lambda: None, started, keep_alive_s=75)
        finally:
            await service.close()

    try:
        asyncio.run(main())
    finally:
        sock.close()


def _panel(path: Path, r: CellResult) -> Panel:
    body = Text()
    if r.stdout:
        body.append(r.stdout.rstrip("\n") + "\n")
    if r.stderr:
        body.append(r.stderr.rstrip("\n") + "\n", style="yellow")
    for d in r.display:
        body.append(d + "\n", style="cyan")
    if r.error is not None:
        lines = r.error.traceback or [f"{r.error.ename}: {r.error.evalue}"]
        body.append("".join(line if line.endswith("\n") else line + "\n" for line in lines), style="red")
    body.rstrip()
    style = STATUS_STYLE[r.status]
    flags = [f"{r.duration_s * 1000:.0f} ms"]
    if r.truncated:
        flags.append("output truncated")
    if r.restarted:
        flags.append("kernel restarted")
    title = f"[{style}]{r.status}[/{style}]  {path}"
    return Panel(
        body if body.plain else Text("(no output)", style="dim"), title=title, subtitle=", ".join(flags)
    )


if __name__ == "__main__":  # pragma: no cover
    sandbox(sys.argv[1:])
