"""What the batch verbs (eval, curate, correct) share: problems in, a manifest,
one scheduler over one kernel pool, and the episodes it runs."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from sandbox import KernelPool, SandboxPolicy
from tora.backends.base import Backend
from tora.data import source_path
from tora.engine import SolveConfig
from tora.errors import ToraError, UsageError
from tora.prompts import PromptTemplate
from tora.record import Problem, Trajectory
from tora.run_dir import package_versions, read_manifest, sha256_file
from tora.scheduler import Capacity, EpisodeFactory, Scheduler


def check_unique(problems: Sequence[Problem]) -> None:
    seen: set[str] = set()
    for p in problems:
        if p.id in seen:
            raise UsageError(f"problem id {p.id!r} occurs twice; results and resuming need unique ids (see --id-field)")
        seen.add(p.id)


def previous_run(out: Path, model: str, dataset: str, command: str) -> dict[str, Any] | None:
    """The manifest of the run in `out` to continue, checked to be the same kind of run."""
    previous = read_manifest(out)
    if previous is None:
        return None
    if previous.get("command", command) != command:
        raise UsageError(f"{out} holds a `tora {previous.get('command')}` run, not a `tora {command}` one")
    if previous.get("model") != model:
        raise UsageError(f"resume: {out} was run with --model {previous.get('model')}, not {model}")
    data = previous.get("dataset")
    data_name = data.get("name") if isinstance(data, dict) else None
    if data_name != dataset:
        raise UsageError(f"resume: {out} ran on {data_name}, not {dataset}")
    return previous


def check_fixed(previous: dict[str, Any] | None, settings: dict[str, Any], fixed: Sequence[str], what: str,
                advice: str) -> None:
    """Refuse to resume a run with settings that decide what it keeps ("RUN was WHAT with --FLAG X, not Y")."""
    if previous is None:
        return
    for name in fixed:
        if name in previous and previous[name] != settings[name]:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"resume: {what} with {flag} {previous[name]}, not {settings[name]}; {advice}")


def fail_if_all_failed(new: Sequence[Trajectory], what: str = "trajectory") -> None:
    """A run whose every new trajectory failed is itself a failure (exit 1), shown with the first cause."""
    if new and all(t.result.finish == "error" for t in new):
        raise ToraError(f"every {what} failed; the first: {new[0].result.error}")


def backend_ref(backend: Backend) -> dict[str, str]:
    """What a manifest says of the model (on a cluster the workers report it: the driver loads none)."""
    return {"name": backend.name, "model": backend.model}


def base_manifest(command: str, previous: dict[str, Any] | None, dataset: str, problems: Sequence[Problem],
                  model: str, backend: dict[str, str], template: PromptTemplate, capacity: Capacity,
                  config: SolveConfig, *, out: Path, run: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields every batch verb writes; `run` describes this invocation."""
    path = source_path(dataset)  # the copy load_problems read, resolved
    run = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:], **run}
    return {
        **(previous or {}),  # what other verbs added (`tora correct`'s section) stays
        "command": command,
        "run_id": (previous or {}).get("run_id", out.name),
        "argv": sys.argv[1:] if previous is None else previous.get("argv"),
        "dataset": {"name": dataset, "path": str(path), "sha256": sha256_file(path), "problems": len(problems)},
        "model": model,
        "backend": backend,
        "prompt": {"name": template.name, "sha256": template.sha256},
        "capacity": dataclasses.asdict(capacity),
        "config": dataclasses.asdict(config),
        "versions": package_versions(),
        "runs": [*(previous or {}).get("runs", []), run],
    }


@contextlib.asynccontextmanager
async def scheduled(make_episode: EpisodeFactory, backend: Backend, policy: SandboxPolicy, grader: str,
                    capacity: Capacity) -> AsyncIterator[Scheduler]:
    """A scheduler over a started kernel pool; the pool, the grading workers and the model are
    closed on the way out, however it is left."""
    pool = KernelPool(policy, size=min(capacity.kernels, 8))
    scheduler = Scheduler(make_episode, pool, grader=grader, capacity=capacity)
    try:
        await pool.start()
        yield scheduler
    finally:
        await scheduler.aclose()
        await pool.close()
        await backend.aclose()
