"""`tora correct RUN_DIR --teacher SPEC`: output-space shaping of a curation run.

For each wrong trajectory of RUN_DIR (graded `correct: false`, not an
infrastructure failure), for its line prefixes (`--prefixes all`, or N of
them drawn with `--prefix-seed`; see `tora.correction` for where a prefix may
end), the teacher continues it through the same runtime: a new episode
starts from the parent's exact prompt and first steps, the rendering as the
parent recorded it, and a kernel holding the prefix's state: the parent's
cells run once per wrong trajectory in a shared kernel, forked for each of its
continuations (`tora.prefix_kernels`; each record's `kernel_state` says how its
kernel was made and which prefix cells came out differently from the parent's
record).

RUN_DIR receives corrections.jsonl (every continuation, graded, appended and
fsynced: the record of this verb's work, keyed by parent and prefix length)
and, in curated.jsonl beside curate's kept trajectories, the kept
corrections: correct, answered, every cell the teacher ran clean (unless
`--keep-tool-errors`), no duplicates, at most `--max-per-parent` per wrong
trajectory. They have `origin: teacher_corrected`, `parent` (the wrong
trajectory's id) and `prefix_lines`. A wrong trajectory's kept corrections
are appended once all its prefixes are done, exactly as curate appends a
problem's, so running the same command again resumes with nothing lost or
doubled. metrics.json gets a `correction` section.

Exit: 0 done, 2 usage or bad data, 1 infrastructure failure, 130 interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from tora import fences
from tora.backends.base import Backend
from tora.backends.registry import load_backend
from tora.cli.batch import fail_if_all_failed
from tora.cli.options import MODEL_SPECS, continuation_options, loop_settings, scheduler_options
from tora.cli.output import print_json
from tora.correction import choose_prefixes, prefix_of
from tora.curation import KeepRule, Ledger, Work, content_hash, tool_errors
from tora.engine import Episode, KernelSource, RenderSettings, SolveConfig
from tora.errors import DataError, UsageError
from tora.evaluate import load_finished
from tora.grading import GRADERS
from tora.loop import Loop, LoopSettings, kernel_pool
from tora.prefix_kernels import PrefixKernels
from tora.progress import BatchProgress
from tora.prompts import PLACEHOLDER, PromptTemplate
from tora.record import Trajectory, TrajectoryWriter, read_trajectories, repair_tail
from tora.run_dir import (
    CORRECTIONS,
    CURATED,
    MANIFEST,
    METRICS,
    TRAJECTORIES,
    locked,
    read_manifest,
    update_json,
    write_json,
)
from tora.run_settings import RunSettings, check_resume
from tora.scheduler import Job

Attempt = tuple[str, int]  # (parent id, prefix lines): the unit of work and of resume
# A section written before `settings` existed: what it held of them (its `seed` drew the prefixes).
_LEGACY = {"teacher": "model", "prefixes": "prefixes", "seed": "prefix_seed", "grader": "grader",
           "keep_tool_errors": "keep_tool_errors", "max_per_parent": "max_per_parent"}


def _stored(section: dict[str, Any]) -> dict[str, Any]:
    """The settings an earlier correction of this folder ran with (see `tora.run_settings`)."""
    settings = section.get("settings")
    if isinstance(settings, dict):
        return settings
    return {"command": "correct", **{new: section[old] for old, new in _LEGACY.items() if old in section}}


def _prefixes(value: str) -> int | None:
    if value == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise UsageError(f"--prefixes: {value!r} is neither 'all' nor a positive number")
    return count


@click.command("correct")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--teacher", required=True,
              help=f"Model spec of the teacher: {MODEL_SPECS} (see `tora models`).")
@click.option("--prefixes", "prefixes", default="all", show_default=True,
              help="Line prefixes of each wrong trajectory to continue: all, or N drawn with --prefix-seed.")
@click.option("--prefix-seed", type=int, default=0, show_default=True,
              help="Seed of the draw of N prefixes (and of the rank that picks which M are kept); --seed seeds "
                   "the teacher's sampling.")
@continuation_options
@click.option("--keep-tool-errors", is_flag=True, help="Also keep corrections in which a teacher's cell failed.")
@click.option("--max-per-parent", type=click.IntRange(1), default=None,
              help="Keep at most M corrections per wrong trajectory [default: all that qualify].")
@click.option("--retry-errors", is_flag=True, help="Run again the continuations that failed for infrastructure reasons.")
@click.option("--grader", type=click.Choice(GRADERS), default=None, help="[default: the run's grader]")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line on stdout, nothing else.")
@scheduler_options
def correct(run_dir: Path, teacher: str, prefixes: str, prefix_seed: int, keep_tool_errors: bool,
            max_per_parent: int | None, retry_errors: bool, grader: str | None, as_json: bool, **kw: Any) -> int:
    """Let a teacher continue the wrong trajectories of a `tora curate` RUN_DIR from their line prefixes."""
    count = _prefixes(prefixes)
    loop = loop_settings(kw)  # the recorded rendering of each parent replaces loop.config.render
    err = Console(stderr=True)
    if not (run_dir / TRAJECTORIES).is_file():
        raise UsageError(f"{run_dir}: no {TRAJECTORIES}; point tora correct at a `tora curate` run folder")
    with locked(run_dir, "correct"):
        manifest = read_manifest(run_dir)
        if manifest is None or manifest.get("command") != "curate":
            raise DataError(run_dir / MANIFEST, None, "command", "not a `tora curate` run")
        grader = grader or str(manifest.get("grader") or "math-verify")
        chosen = {"teacher": teacher, "prefixes": prefixes, "prefix_seed": prefix_seed, "grader": grader,
                  "keep_tool_errors": keep_tool_errors, "max_per_parent": max_per_parent}
        settings = RunSettings.of("correct", teacher, loop.config, loop.policy, render=False,
                                  verb={k: v for k, v in chosen.items() if k != "teacher"})
        section = manifest.get("correct")
        previous = section if isinstance(section, dict) else None
        if previous is not None:
            check_resume(_stored(previous), settings, str(run_dir), "finish that run with the same flags first")
        for name in (CORRECTIONS, CURATED):
            moved = repair_tail(run_dir / name)
            if moved:
                err.print(f"{run_dir / name}: moved a torn last line ({moved} bytes) to {name}.torn", highlight=False)
        state = Correction(KeepRule(keep_tool_errors), max_per_parent, prefix_seed, count, retry_errors, loop.config)
        state.load(run_dir)
        if not state.parents:
            err.print(f"{run_dir}: no wrong trajectory to correct", highlight=False)
            if as_json:
                print_json({**state.summary(0.0, complete=True), "out": str(run_dir)})
            return 0
        with err.status("loading teacher…") if err.is_terminal else contextlib.nullcontext():
            backend = load_backend(teacher)
        run = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_records": state.loaded}
        manifest["correct"] = {**chosen, "backend": {"name": backend.name, "model": backend.model},
                               "capacity": dataclasses.asdict(loop.capacity),
                               "limits": dataclasses.asdict(loop.config.limits),
                               "settings": settings.stored(),
                               "runs": [*(previous or {}).get("runs", []), run]}
        write_json(run_dir / MANIFEST, manifest)
        if state.loaded:
            err.print(f"resuming {run_dir}: {state.loaded} continuations recorded, {len(state.work.closed)} of "
                      f"{len(state.parents)} wrong trajectories final", highlight=False)
        interrupted = False
        t0 = time.monotonic()
        try:
            asyncio.run(state.run(run_dir, backend, teacher, str(manifest["run_id"]), loop, grader, err))
        except KeyboardInterrupt:
            interrupted = True
        summary = state.summary(time.monotonic() - t0, complete=not interrupted)
        update_json(run_dir / METRICS, {"correction": summary})
    err.print(f"kept {summary['kept']} corrections of {summary['parents_corrected']} of {summary['parents']} wrong "
              f"trajectories ({summary['continuations']} continuations, {summary['correct']} correct); "
              f"written to {run_dir}", highlight=False)
    if as_json:
        print_json({**summary, "out": str(run_dir)})
    if interrupted:
        err.print("interrupted: run the same command again to continue", highlight=False)
        raise KeyboardInterrupt
    fail_if_all_failed(state.work.new, "continuation")
    return 0


def template_of(parent: Trajectory) -> PromptTemplate:
    """The parent's template as its record names it, with its stop strings.

    The prompt itself comes from the record (the teacher sees the parent's
    exact context), so only the name, the sha256 and the stops matter here.
    """
    loop_stops = {fences.OUTPUT_FENCE, fences.CLOSE_FENCE}
    ref = parent.generation.prompt_template
    return PromptTemplate(name=ref.name, kind="completion", body=PLACEHOLDER, sha256=ref.sha256,
                          stop=[s for s in parent.generation.sampling.stop if s not in loop_stops])


def render_of(parent: Trajectory) -> RenderSettings:
    """Code runs and shows its results as it did in the parent, so the context stays one protocol."""
    return RenderSettings(policy=parent.runtime.render_policy, run_on=parent.generation.run_on,
                          fresh_namespace=parent.runtime.fresh_namespace)


class Correction:
    """One correction run's work: wrong trajectories x their prefixes, grouped by wrong trajectory."""

    def __init__(self, rule: KeepRule, cap: int | None, seed: int, count: int | None, retry_errors: bool,
                 config: SolveConfig) -> None:
        self.rule = rule
        self.cap = cap
        self.seed = seed
        self.count = count
        self.retry_errors = retry_errors
        self.config = config
        self.parents: dict[str, Trajectory] = {}
        self.prefix_steps: dict[Attempt, int] = {}
        self.ledger = Ledger(key=_attempt, group=lambda t: t.parent or "", eligible=self._eligible, cap=cap,
                             seed=seed)
        self.work = Work(self.ledger, {}, retry_errors=retry_errors)
        self.loaded = 0

    def _eligible(self, t: Trajectory) -> bool:
        steps = self.prefix_steps.get(_attempt(t))
        return steps is not None and self.rule.keeps(t, since_step=steps)

    def load(self, run_dir: Path) -> None:
        seen: set[str] = set()
        for t in load_finished(run_dir / TRAJECTORIES).values():
            if t.result.correct is False and t.result.finish != "error":
                lines = choose_prefixes(t, self.count, self.seed)
                if not lines or content_hash(t) in seen:
                    continue  # nowhere to cut it (one line, or all code and output), or a duplicate
                seen.add(content_hash(t))
                self.parents[t.id] = t
                self.work.units[t.id] = [(t.id, n) for n in lines]
                for n in lines:
                    self.prefix_steps[(t.id, n)] = len(prefix_of(t, n).steps)
        records: list[Trajectory] = []
        if (run_dir / CORRECTIONS).is_file():
            records = [t for t in read_trajectories(run_dir / CORRECTIONS, skip_invalid=True)
                       if t.result.finish != "interrupted" and _attempt(t) in self.prefix_steps]
        curated = list(read_trajectories(run_dir / CURATED, skip_invalid=True)) if (run_dir / CURATED).is_file() else []
        kept = [t for t in curated if t.origin == "teacher_corrected" and t.parent in self.parents]
        # In file order: a later record of an attempt supersedes. Curate's kept ones count as
        # seen, so a continuation identical to a kept sample is a duplicate too.
        self.ledger.load(records, kept, seen=curated)
        self.loaded = len({_attempt(t) for t in records})

    def jobs(self, stems: PrefixKernels | None = None) -> Iterator[Job]:
        for pid, parent in self.parents.items():
            config = SolveConfig(sampling=self.config.sampling, limits=self.config.limits, render=render_of(parent))
            prefixes = [prefix_of(parent, n) for _, n in self.work.pending(pid)]
            if stems is not None:  # the parent's cells run once; its continuations fork that kernel
                stems.expect(pid, parent.steps, config.limits.timeout_s, [len(p.cells) for p in prefixes])
            for prefix in prefixes:
                yield Job(parent.problem, parent.sample_index, config, "teacher_corrected", prefix)

    async def run(self, run_dir: Path, backend: Backend, spec: str, run_id: str, loop: LoopSettings, grader: str,
                  err: Console) -> None:
        templates = {pid: template_of(p) for pid, p in self.parents.items()}
        pool = kernel_pool(loop.policy, loop.capacity)
        stems = PrefixKernels(pool)

        def make_episode(job: Job, kernels: KernelSource[Any]) -> Episode:
            assert job.prefix is not None
            return Episode(job.problem, backend=backend, template=templates[job.prefix.parent], kernels=kernels,
                           config=job.config, spec=spec, sample_index=job.sample_index, origin=job.origin,
                           run_id=run_id, prefix=job.prefix, prefix_states=stems)

        work = self.work
        with TrajectoryWriter(run_dir / CORRECTIONS) as records, TrajectoryWriter(run_dir / CURATED) as curated:
            await work.close_finished(curated)
            loaded = work.latest()
            with BatchProgress(err, "correct", len(self.parents), done=len(work.closed), scored=len(loaded),
                               hits=sum(t.result.correct is True for t in loaded), rate_unit=" traj/s",
                               score_label="correct", counters=("kept", "exec errors")) as progress:
                progress.add(kept=self.ledger.kept_count())
                async with Loop(make_episode, loop.policy, loop.capacity, grader=grader, backend=backend,
                                kernels=pool) as running:
                    try:
                        async with contextlib.aclosing(running.scheduler.run(self.jobs(stems), wanted=self._wanted)) \
                                as results:
                            async for result in results:
                                t = result.trajectory
                                attempt = _attempt(t)
                                progress.score(result.correct,
                                               **{"exec errors": tool_errors(t, self.prefix_steps[attempt])})
                                kept = await work.record(t, attempt, records, curated)
                                if kept is not None:
                                    progress.complete()
                                    progress.add(kept=kept)
                                    await stems.drop(attempt[0])
                    finally:
                        await stems.aclose()

    def _wanted(self, job: Job) -> bool:
        return job.prefix is None or self.work.open(job.prefix.parent)

    def summary(self, wall_s: float, *, complete: bool) -> dict[str, Any]:
        latest = self.work.latest()
        return {
            "parents": len(self.parents),
            "prefixes": len(self.prefix_steps),
            "continuations": len(latest),
            "correct": sum(t.result.correct is True for t in latest),
            "errors": sum(t.result.finish == "error" for t in latest),
            "kept": self.ledger.kept_count(),
            "parents_corrected": sum(1 for pid in self.parents if self.ledger.kept.get(pid)),
            "duplicates": self.ledger.duplicate_candidates(),
            "complete": complete and len(self.work.closed) == len(self.parents),
            "wall_s": round(wall_s, 3),
        }


def _attempt(t: Trajectory) -> Attempt:
    return (t.parent or "", t.prefix_lines or 0)
