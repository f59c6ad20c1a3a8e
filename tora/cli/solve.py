"""`tora solve "problem"`: one trajectory, streamed; with no problem, a REPL."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from sandbox import SandboxPolicy
from tora.backends.base import Backend
from tora.backends.registry import load_backend
from tora.cli.display import PlainPrinter, RichPrinter
from tora.cli.interactive import run_episode
from tora.cli.options import loop_options, loop_settings
from tora.data import problem_from_text
from tora.engine import Episode, KernelSource, SolveConfig
from tora.kernels import FreshKernels
from tora.paths import trajectories_dir
from tora.prompts import PromptTemplate, default_prompt, load_prompt
from tora.record import Problem, Trajectory, TrajectoryWriter

EXIT_BY_FINISH = {"answered": 0, "error": 1, "interrupted": 130}
EXIT_NO_ANSWER = 3


def default_record_path() -> Path:
    return trajectories_dir() / "solve.jsonl"


@click.command()
@click.argument("problem", required=False)
@loop_options
@click.option("--answer", default=None, help="Reference answer, stored with the record.")
@click.option("--json", "as_json", is_flag=True, help="Print the trajectory as one JSON line on stdout, nothing else.")
@click.option("--no-record", is_flag=True, help="Do not append the trajectory to the record file.")
@click.option("--record-to", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Record file [default: trajectories/solve.jsonl, or $TORA_HOME/trajectories/solve.jsonl].")
def solve(problem: str | None, answer: str | None, as_json: bool, no_record: bool, record_to: Path | None,
          **kw: Any) -> int:
    """Solve PROBLEM with tool-integrated reasoning; without PROBLEM, start a REPL.

    PROBLEM '-' reads the problem from standard input. Exit: 0 answered,
    3 no answer, 1 runtime failure, 2 usage error, 130 interrupted.
    """
    settings = loop_settings(kw)
    config, policy = settings.config, settings.policy
    record_path = None if no_record else (record_to or default_record_path())
    if problem is None:
        from tora.cli.repl import run_repl

        return run_repl(kw["model"], kw["prompt"], config, policy, record_path)
    if problem == "-":
        problem = sys.stdin.read()
    if not problem.strip():
        raise click.UsageError("the problem is empty")
    err = Console(stderr=True)
    with err.status("loading model…") if err.is_terminal and not as_json else contextlib.nullcontext():
        backend = load_backend(kw["model"])
    template = load_prompt(kw["prompt"] or default_prompt(kw["model"]))
    backend.prepare(template.prefix)
    writer = TrajectoryWriter(record_path) if record_path else None
    try:
        trajectory = asyncio.run(
            _solve_once(problem_from_text(problem, answer), backend, template, config, policy, kw["model"], as_json,
                        writer)
        )
    finally:
        if writer is not None:
            writer.close()
    if as_json:
        sys.stdout.write(trajectory.model_dump_json() + "\n")
    elif record_path is not None:
        err.print(f"[dim]recorded to {record_path}[/dim]")
    finish = trajectory.result.finish
    if finish == "error":
        err.print(f"[red]error:[/red] {trajectory.result.error}", markup=True)
    return EXIT_BY_FINISH.get(finish, EXIT_NO_ANSWER)


async def _solve_once(
    problem: Problem,
    backend: Backend,
    template: PromptTemplate,
    config: SolveConfig,
    policy: SandboxPolicy,
    spec: str,
    as_json: bool,
    writer: TrajectoryWriter | None,
) -> Trajectory:
    kernels: KernelSource[Any] = FreshKernels(policy)
    episode = Episode(problem, backend=backend, template=template, kernels=kernels, config=config, spec=spec,
                      prefetch_kernel=True)
    subscribers: list[Any] = []
    if not as_json:
        out = Console()
        subscribers.append(RichPrinter(out) if out.is_terminal else PlainPrinter())
    try:
        return await run_episode(episode, subscribers, writer)
    finally:
        await backend.aclose()

