"""`tora eval DATASET|FILE --model SPEC`: the loop over a data set, graded.

OUT (default trajectories/eval-<dataset>-<timestamp>/) receives
trajectories.jsonl (appended as each trajectory finishes), manifest.json
(written first) and metrics.json (written last, also on Ctrl-C, marked
incomplete). `--resume` continues a killed run: pairs already recorded are
skipped. Exit: 0 the run completed (wrong answers are data), 2 usage or bad
data, 1 infrastructure failure, 130 interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from sandbox import SandboxPolicy
from tora.backends.base import Backend
from tora.backends.registry import load_backend
from tora.cli.batch import (
    backend_ref,
    base_manifest,
    check_unique,
    fail_if_all_failed,
    previous_run,
)
from tora.cli.options import (
    cluster_from,
    engine_options,
    loop_options,
    loop_settings,
    scheduler_options,
)
from tora.cli.output import print_json
from tora.data import load_problems
from tora.distributed.shards import has_shards, merge_shards
from tora.engine import SolveConfig
from tora.errors import UsageError
from tora.evaluate import Pair, load_finished, regrade, work_list
from tora.grading import DEFAULT_GRADER, GRADERS
from tora.loop import Loop, LoopSettings
from tora.metrics import compute_metrics
from tora.progress import BatchProgress
from tora.prompts import PromptTemplate, default_prompt, load_prompt
from tora.record import Problem, Trajectory, TrajectoryWriter
from tora.run_dir import MANIFEST, METRICS, TRAJECTORIES, default_out, latest_out, locked, write_json
from tora.run_settings import RunSettings
from tora.scheduler import Capacity, Graded, Job, episode_factory, origin_for, sample_config

if TYPE_CHECKING:
    from tora.distributed.driver import ClusterOptions, ClusterRun

RESUME_ADVICE = "resume it with the settings it was run with, or pick another --out"




@click.command("eval")
@click.argument("dataset")
@loop_options
@click.option("--limit", "-n", type=click.IntRange(1), default=None, help="Only the first N problems.")
@click.option("--samples", "-k", type=click.IntRange(1), default=1, show_default=True,
              help="Trajectories per problem (maj@k, pass@k).")
@click.option("--grader", type=click.Choice(GRADERS), default=DEFAULT_GRADER, show_default=True)
@scheduler_options
@engine_options
@click.option("--out", "-o", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: trajectories/eval-<dataset>-<timestamp>].")
@click.option("--resume", is_flag=True, help="Continue the run in --out (or this data set's latest run).")
@click.option("--question-field", default=None, help="JSONL files: the field holding the question.")
@click.option("--answer-field", default=None, help="JSONL files: the field holding the reference answer.")
@click.option("--id-field", default=None, help="JSONL files: the field holding a unique problem id.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON line on stdout, nothing else.")
def eval_cmd(dataset: str, limit: int | None, samples: int, grader: str, out: Path | None,
             resume: bool, question_field: str | None, answer_field: str | None, id_field: str | None,
             as_json: bool, **kw: Any) -> int:
    """Evaluate a model on DATASET (gsm8k, math, math500, gsm-hard, svamp, asdiv, mawps) or a JSONL FILE."""
    loop = loop_settings(kw)
    cluster = cluster_from(kw)
    err = Console(stderr=True)
    problems = load_problems(dataset, question_field=question_field, answer_field=answer_field,
                             id_field=id_field, limit=limit)
    if not problems:
        raise UsageError(f"{dataset}: no problems to evaluate")
    check_unique(problems)
    out = _resolve_out(dataset, out, resume)
    with locked(out, "eval"):  # one writer per run folder, as curate and correct
        return _evaluate(dataset, problems, samples, grader, out, resume, as_json, loop, cluster, err, kw)


def _evaluate(dataset: str, problems: list[Problem], samples: int, grader: str, out: Path, resume: bool,
              as_json: bool, loop: LoopSettings, cluster: ClusterOptions | None, err: Console,
              kw: dict[str, Any]) -> int:
    """The run, under the folder's lock."""
    config, capacity = loop.config, loop.capacity
    template = load_prompt(kw["prompt"] or default_prompt(kw["model"], dataset))
    settings = RunSettings.of("eval", kw["model"], config, loop.policy, template=template, dataset=dataset)
    traj_path = out / TRAJECTORIES
    previous = previous_run(out, settings, RESUME_ADVICE) if resume else None
    selected = {(p.id, k) for p in problems for k in range(samples)}
    if resume and has_shards(out):
        merge_shards(out)  # what the workers of a cluster run recorded counts as recorded, whichever engine resumes
    finished = {pair: t for pair, t in load_finished(traj_path).items() if pair in selected} if resume else {}
    if finished:
        err.print(f"resuming {out}: {len(finished)} of {len(selected)} trajectories already recorded", highlight=False)

    def write_manifest(backend: dict[str, str], engine: dict[str, Any]) -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        manifest = _manifest(settings, previous, dataset, problems, samples, grader, capacity, config, backend,
                             template, skipped=len(finished), out=out, engine=engine)
        write_json(out / MANIFEST, manifest)
        if samples > 1 and config.sampling.temperature == 0 and backend["name"] != "replay":
            err.print("[yellow]warning:[/yellow] --samples > 1 at temperature 0: greedy samples are all alike")
        return manifest

    t0 = time.monotonic()
    interrupted = False
    run_id = (previous or {}).get("run_id", out.name)
    new: list[Graded] | None = None
    try:
        if cluster is None:
            new = _eval_local(problems, samples, finished, template, loop, grader, kw, run_id, out,
                              write_manifest, err, len(selected))
        else:
            _eval_on_cluster(problems, samples, finished, template, loop, grader, kw, run_id, out,
                                   write_manifest, err, cluster, previous)
    except KeyboardInterrupt:
        interrupted, new = True, None
    if new is not None and cluster is None:
        graded = regrade(list(finished.values()), grader) + new
    else:  # what this session added is in the records (the workers graded it)
        after = {pair: t for pair, t in load_finished(traj_path).items() if pair in selected}
        graded = regrade(list(after.values()), grader)
        new = [g for g in graded if g.pair not in finished]
    metrics = compute_metrics(graded, problems, samples=samples, grader=grader, wall_s=time.monotonic() - t0)
    metrics.update({"dataset": dataset, "model": kw["model"], "run_id": run_id, "out": str(out),
                    "complete": metrics["missing"] == 0, "resumed": len(finished)})
    write_json(out / METRICS, metrics)
    _report(metrics, Console(stderr=as_json), as_json)
    if interrupted:
        err.print(f"interrupted: continue with --resume --out {out}", highlight=False)
        raise KeyboardInterrupt
    fail_if_all_failed([g.trajectory for g in new])
    return 0


ManifestWriter = Callable[[dict[str, str], dict[str, Any]], dict[str, Any]]


def _eval_local(problems: list[Problem], samples: int, finished: dict[Pair, Trajectory], template: PromptTemplate,
                loop: LoopSettings, grader: str, kw: dict[str, Any], run_id: str, out: Path,
                write_manifest: ManifestWriter, err: Console, total: int) -> list[Graded]:
    with err.status("loading model…") if err.is_terminal else contextlib.nullcontext():
        backend = load_backend(kw["model"])
        backend.prepare(template.prefix)
    write_manifest(backend_ref(backend), {"name": "local"})
    new: list[Graded] = []
    with TrajectoryWriter(out / TRAJECTORIES) as writer:
        asyncio.run(_run(work_list(problems, samples, finished), backend, template, loop.config, loop.policy,
                         kw["model"], grader, loop.capacity, run_id, samples, writer, new, err, total, len(finished),
                         sum(t.result.correct is True for t in finished.values())))
    return new


def _eval_on_cluster(problems: list[Problem], samples: int, finished: dict[Pair, Trajectory],
                     template: PromptTemplate, loop: LoopSettings, grader: str,
                     kw: dict[str, Any], run_id: str, out: Path, write_manifest: ManifestWriter, err: Console,
                     cluster: ClusterOptions, previous: dict[str, Any] | None) -> None:
    from tora.distributed.driver import run_on_cluster
    from tora.distributed.plan import EvalPlan
    from tora.distributed.progress import ClusterProgress
    from tora.distributed.worker import WorkerSetup

    setup = WorkerSetup(model=kw["model"], template=template, policy=loop.policy, grader=grader,
                        capacity=loop.capacity, run_id=run_id, plan=EvalPlan(samples, loop.config))

    def started(run: ClusterRun) -> None:
        write_manifest(run.backend(previous), cluster.describe(run))

    progress = ClusterProgress(err, "eval", len(problems))
    run = asyncio.run(run_on_cluster(out, problems, setup, cluster, samples_hint=samples, progress=progress,
                                     on_started=started))
    for lost in run.lost:
        err.print(f"[yellow]worker lost:[/yellow] {lost}; its unfinished problems were run again", highlight=False)


def _resolve_out(dataset: str, out: Path | None, resume: bool) -> Path:
    if out is None:
        if not resume:
            return default_out(dataset)
        found = latest_out(dataset)
        if found is None:
            raise UsageError(f"--resume: no earlier run of {dataset} found; name it with --out")
        return found
    records = out / TRAJECTORIES
    if not resume and ((records.is_file() and records.stat().st_size > 0) or has_shards(out)):
        raise UsageError(f"{out} already holds trajectories; add --resume to continue that run, or pick another --out")
    return out


def _manifest(settings: RunSettings, previous: dict[str, Any] | None, dataset: str, problems: list[Problem],
              samples: int, grader: str, capacity: Capacity, config: SolveConfig, backend: dict[str, str],
              template: PromptTemplate, *, skipped: int, out: Path, engine: dict[str, Any]) -> dict[str, Any]:
    manifest = base_manifest(settings, previous, dataset, problems, backend, template, capacity, config,
                             out=out, run={"skipped": skipped, "engine": engine})
    manifest.update(samples=samples, grader=grader)
    return manifest


async def _run(work: list[tuple[Problem, int]], backend: Backend, template: PromptTemplate, config: SolveConfig,
               policy: SandboxPolicy, spec: str, grader: str, capacity: Capacity, run_id: str, samples: int,
               writer: TrajectoryWriter, new: list[Graded], err: Console, total: int, already: int,
               already_hits: int) -> None:
    origin = origin_for(backend, config)
    jobs = (Job(p, k, sample_config(config, k, samples), origin) for p, k in work)
    make_episode = episode_factory(backend, template, spec, run_id)
    async with Loop(make_episode, policy, capacity, grader=grader, backend=backend) as loop:
        with BatchProgress(err, "eval", total, done=already, hits=already_hits) as progress:
            async with contextlib.aclosing(loop.scheduler.run(jobs)) as results:
                async for result in results:
                    await writer.append(result.trajectory)
                    new.append(result)
                    progress.advance(result.correct)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _report(m: dict[str, Any], console: Console, as_json: bool) -> None:
    kind, _, arg = str(m["model"]).partition(":")
    model = f"{kind}:{Path(arg).name}" if "/" in arg else m["model"]  # a path in a title wraps badly
    table = Table(title=f"{m['dataset']} · {model} · grader {m['grader']}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows: list[tuple[str, str]] = [("accuracy", f"{_pct(m['accuracy'])}  ({m['correct']}/{m['trajectories']})")]
    if "maj_at_k" in m:
        rows += [(f"pass@1 (mean of {m['samples']})", _pct(m["pass_at_1"])), (f"maj@{m['samples']}", _pct(m["maj_at_k"])),
                 (f"pass@{m['samples']}", _pct(m["pass_at_k"]))]
    rows += [
        ("problems", str(m["problems"])),
        ("missing", str(m["missing"])),
        ("empty answers", str(m["empty_answers"])),
        ("errors", str(m["errors"])),
        ("trajectories with a cell timeout", str(m["timeouts"])),
        ("grading unparsed / timeout", f"{m['unparsed']} / {m['grade_timeouts']}"),
        ("mean tool calls", "-" if m["mean_tool_calls"] is None else f"{m['mean_tool_calls']:.2f}"),
        ("exec error rate", _pct(m["exec_error_rate"])),
        ("wall", f"{m.get('wall_s', 0):.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    for key in ("by_type", "by_level"):
        if key in m:
            sub = Table(title=key.replace("_", " "))
            sub.add_column(key[3:])
            sub.add_column("n", justify="right")
            sub.add_column("accuracy", justify="right")
            for name, cell in m[key].items():
                sub.add_row(name, str(cell["n"]), _pct(cell["accuracy"]))
            console.print(sub)
    console.print(f"[dim]written to {m['out']}[/dim]")
    if as_json:
        print_json(m)
