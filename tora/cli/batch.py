"""What the batch verbs (eval, curate, correct) share: problems in, a manifest whose settings a
resume must match, and the episodes they run (on a `tora.loop.Loop`)."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tora.backends.base import Backend
from tora.data import source_path
from tora.engine import SolveConfig
from tora.errors import ToraError, UsageError
from tora.prompts import PromptTemplate
from tora.record import Problem, Trajectory
from tora.run_dir import package_versions, read_manifest, sha256_file
from tora.run_settings import RunSettings, check_resume, stored_settings
from tora.scheduler import Capacity


def check_unique(problems: Sequence[Problem]) -> None:
    seen: set[str] = set()
    for p in problems:
        if p.id in seen:
            raise UsageError(f"problem id {p.id!r} occurs twice; results and resuming need unique ids (see --id-field)")
        seen.add(p.id)


def previous_run(out: Path, settings: RunSettings, advice: str, verb_keys: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The manifest of the run in `out` to continue, refused (exit 2) if any setting that decides
    what its trajectories are differs from `settings` (see `tora.run_settings`)."""
    previous = read_manifest(out)
    if previous is not None:
        check_resume(stored_settings(previous, verb_keys), settings, str(out), advice)
    return previous


def fail_if_all_failed(new: Sequence[Trajectory], what: str = "trajectory") -> None:
    """A run whose every new trajectory failed is itself a failure (exit 1), shown with the first cause."""
    if new and all(t.result.finish == "error" for t in new):
        raise ToraError(f"every {what} failed; the first: {new[0].result.error}")


def backend_ref(backend: Backend) -> dict[str, str]:
    """What a manifest says of the model (on a cluster the workers report it: the driver loads none)."""
    return {"name": backend.name, "model": backend.model}


def base_manifest(settings: RunSettings, previous: dict[str, Any] | None, dataset: str, problems: Sequence[Problem],
                  backend: dict[str, str], template: PromptTemplate, capacity: Capacity,
                  config: SolveConfig, *, out: Path, run: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields every batch verb writes; `run` describes this invocation. On a resume
    `settings` (hence the prompt and config) equal the stored ones: `previous_run` checked them."""
    path = source_path(dataset)  # the copy load_problems read, resolved
    run = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:], **run}
    return {
        **(previous or {}),  # what other verbs added (`tora correct`'s section) stays
        "command": settings.command,
        "run_id": (previous or {}).get("run_id", out.name),
        "argv": sys.argv[1:] if previous is None else previous.get("argv"),
        "dataset": {"name": dataset, "path": str(path), "sha256": sha256_file(path), "problems": len(problems)},
        "model": settings.model,
        "backend": backend,
        "prompt": {"name": template.name, "sha256": template.sha256},
        "capacity": dataclasses.asdict(capacity),
        "config": dataclasses.asdict(config),
        "settings": settings.stored(),
        "versions": package_versions(),
        "runs": [*(previous or {}).get("runs", []), run],
    }
