"""`tora curate PROBLEMS --model SPEC --samples K --out RUN_DIR`: training data from sampled trajectories.

Per problem: K trajectories (optionally a greedy one first), each graded;
kept are those that answered correctly with every cell running cleanly
(`--keep-tool-errors` drops the second condition), without duplicates (same
`content_hash`), at most M per problem (`--max-per-problem`) chosen by a
seeded rank (`--select-seed`). `--stop-when-full` stops sampling a problem
once M are kept: its jobs not yet started are withdrawn. `--branch-after-cell
N` lets the K samples of a problem share one generated prefix, up to and
including its N-th cell's output, and continue from a fork of its kernel
(`tora.branching`).

RUN_DIR holds manifest.json, trajectories.jsonl (every trajectory, appended
and fsynced as it is graded), curated.jsonl (the kept ones), contamination.jsonl
(problems that overlap an evaluation set) and metrics.json. A problem's kept
set is appended to curated.jsonl in one write when the problem is final (all
K done, or full); see `tora.curation` for why a kill at any moment loses,
duplicates and corrupts nothing. Running the same command again resumes:
done is what trajectories.jsonl holds as valid records, a torn last line is
moved aside to <file>.torn, and final problems whose kept set was cut short
are completed first. `--retry-errors` runs infrastructure failures again
(the new record supersedes; the old one stays in the history).

Exit: 0 done (wrong answers are data), 2 usage or bad data, 1 infrastructure
failure, 130 interrupted (run the same command again to continue).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from tora.backends.base import Backend
from tora.backends.registry import load_backend
from tora.branching import Branches
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
from tora.contamination import DEFAULT_N, DEFAULT_THRESHOLD, NgramIndex, Overlap
from tora.curation import KeepRule, Ledger, Work
from tora.data import DATASETS, dataset_path, load_problems
from tora.distributed.shards import has_shards, merge_shards
from tora.engine import Prefix, SamplingParams, SolveConfig
from tora.errors import DataError, UsageError
from tora.evaluate import Pair, load_finished, regrade
from tora.grading import DEFAULT_GRADER, GRADERS
from tora.loop import Loop, LoopSettings, kernel_pool
from tora.metrics import compute_metrics
from tora.prefix_kernels import PrefixKernels
from tora.progress import BatchProgress
from tora.prompts import PromptTemplate, default_prompt, load_prompt
from tora.record import Problem, TrajectoryWriter, read_trajectories, repair_tail
from tora.run_dir import (
    CONTAMINATION,
    CURATED,
    MANIFEST,
    METRICS,
    TRAJECTORIES,
    locked,
    update_json,
    write_json,
    write_jsonl,
)
from tora.run_settings import RunSettings
from tora.scheduler import Job, episode_factory, origin_for, sample_config

if TYPE_CHECKING:
    from tora.distributed.driver import ClusterOptions

# Curate's own settings a resumed run must share with the run it continues (with those of every
# batch verb, tora.run_settings): they decide what is sampled and what is kept.
_FIXED = ("grader", "keep_tool_errors", "max_per_problem", "select_seed", "greedy_first", "branch_after_cell")


def _sets(value: str | None) -> list[str] | None:
    return [s.strip() for s in value.split(",") if s.strip()] if value else None


@click.command("curate")
@click.argument("problems_arg", metavar="PROBLEMS")
@loop_options
@click.option("--limit", "-n", type=click.IntRange(1), default=None, help="Only the first N problems.")
@click.option("--samples", "-k", type=click.IntRange(1), default=4, show_default=True,
              help="Trajectories sampled per problem.")
@click.option("--greedy-first", is_flag=True, help="Sample 0 of each problem is greedy; the others use --temperature.")
@click.option("--max-per-problem", "-M", "cap", type=click.IntRange(1), default=None,
              help="Keep at most M trajectories per problem [default: all that qualify].")
@click.option("--select-seed", type=int, default=0, show_default=True,
              help="Seed of the rank that picks which M are kept.")
@click.option("--stop-when-full", is_flag=True, help="Stop sampling a problem once M are kept (needs -M).")
@click.option("--keep-tool-errors", is_flag=True, help="Also keep correct trajectories in which a cell failed.")
@click.option("--branch-after-cell", type=click.IntRange(1), default=None,
              help="The K samples of a problem share one generated prefix up to and including its N-th cell's "
                   "output, then continue independently, each in a fork of that prefix's kernel.")
@click.option("--retry-errors", is_flag=True,
              help="Run again the samples whose record is an infrastructure failure (backend, kernel, sandbox, internal).")
@click.option("--grader", type=click.Choice(GRADERS), default=DEFAULT_GRADER, show_default=True)
@scheduler_options
@engine_options
@click.option("--eval-sets", default=None,
              help="Comma-separated evaluation sets (names or JSONL files) to check problems against "
                   "[default: every built-in set found].")
@click.option("--ngram", type=click.IntRange(1), default=DEFAULT_N, show_default=True,
              help="Contamination check: n-gram length in words.")
@click.option("--overlap", "threshold", type=click.FloatRange(0.0, 1.0, min_open=True), default=DEFAULT_THRESHOLD,
              show_default=True, help="Contamination check: flag a problem when this fraction of its n-grams "
                                      "occurs in an evaluation set.")
@click.option("--allow-contaminated", is_flag=True, help="Report overlapping problems but curate them anyway.")
@click.option("--out", "-o", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The run folder; running the same command again resumes it.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON line on stdout, nothing else.")
@click.option("--question-field", default=None, help="JSONL files: the field holding the question.")
@click.option("--answer-field", default=None, help="JSONL files: the field holding the reference answer.")
@click.option("--id-field", default=None, help="JSONL files: the field holding a unique problem id.")
def curate(problems_arg: str, limit: int | None, samples: int, greedy_first: bool, cap: int | None,
           select_seed: int, stop_when_full: bool, keep_tool_errors: bool, branch_after_cell: int | None,
           retry_errors: bool, grader: str,
           eval_sets: str | None, ngram: int, threshold: float, allow_contaminated: bool, out: Path,
           question_field: str | None, answer_field: str | None, id_field: str | None, as_json: bool,
           **kw: Any) -> int:
    """Sample, grade and keep training trajectories for PROBLEMS (a data set name or a JSONL file
    with reference answers)."""
    if stop_when_full and cap is None:
        raise UsageError("--stop-when-full needs --max-per-problem M")
    loop = loop_settings(kw)
    config = loop.config
    cluster = cluster_from(kw)
    if branch_after_cell is not None and cluster is not None:
        raise UsageError("--branch-after-cell runs on one machine: a prefix's kernel is forked where it lives")
    err = Console(stderr=True)
    problems = load_problems(problems_arg, question_field=question_field, answer_field=answer_field,
                             id_field=id_field, limit=limit)
    if not problems:
        raise UsageError(f"{problems_arg}: no problems to curate")
    check_unique(problems)
    unanswered = next((p for p in problems if not p.answer), None)
    if unanswered is not None:
        raise UsageError(f"{problems_arg}: problem {unanswered.id!r} has no reference answer; curation grades "
                         "against references (see --answer-field)")
    chosen = {"samples": samples, "greedy_first": greedy_first, "grader": grader,
                "keep_tool_errors": keep_tool_errors, "max_per_problem": cap, "select_seed": select_seed,
                "stop_when_full": stop_when_full, "branch_after_cell": branch_after_cell}
    template = load_prompt(kw["prompt"] or default_prompt(kw["model"], problems_arg))
    settings = RunSettings.of("curate", kw["model"], config, loop.policy, template=template, dataset=problems_arg,
                              verb={name: chosen[name] for name in _FIXED})
    with locked(out, "curate"):
        previous = previous_run(out, settings, "these decide what is made and kept: use another --out", _FIXED)
        for name in (TRAJECTORIES, CURATED):
            moved = repair_tail(out / name)
            if moved:
                err.print(f"{out / name}: moved a torn last line ({moved} bytes) to {name}.torn", highlight=False)
        if has_shards(out):
            merge_shards(out)  # what the workers of a cluster run recorded, whichever engine resumes
        flagged, checked = _guard(problems, _sets(eval_sets), ngram, threshold, err)
        excluded = {o.problem.id for o in flagged} if not allow_contaminated else set()
        write_jsonl(out / CONTAMINATION, [{**o.row(), "excluded": o.problem.id in excluded} for o in flagged])
        _report_contamination(flagged, len(problems), checked, ngram, threshold, allow_contaminated, out, err)
        problems = [p for p in problems if p.id not in excluded]
        if not problems:
            raise UsageError(f"nothing to curate: every problem overlaps an evaluation set (see {out / CONTAMINATION}); "
                             "--allow-contaminated keeps them")
        state = Curation(problems, samples, KeepRule(keep_tool_errors), cap, select_seed, stop_when_full,
                         retry_errors, greedy_first, branch_after_cell)
        state.load(out)
        contamination = {"n": ngram, "threshold": threshold, "checked_against": checked, "flagged": len(flagged),
                         "excluded": len(excluded)}
        capacity = loop.capacity
        run_id = (previous or {}).get("run_id", out.name)

        def write_manifest(backend: dict[str, str], engine: dict[str, Any]) -> None:
            manifest = base_manifest(settings, previous, problems_arg, problems, backend, template,
                                     capacity, config, out=out, run={"resumed_records": state.loaded,
                                                                     "retry_errors": retry_errors, "engine": engine})
            manifest.update(chosen, contamination=contamination)
            write_json(out / MANIFEST, manifest)
            if samples > 1 and config.sampling.temperature == 0 and backend["name"] != "replay":
                err.print("[yellow]warning:[/yellow] --samples > 1 at temperature 0: greedy samples are all alike")

        if state.loaded:
            err.print(f"resuming {out}: {state.loaded} trajectories recorded", highlight=False)
        t0 = time.monotonic()
        interrupted = False
        try:
            if cluster is None:
                with err.status("loading model…") if err.is_terminal else contextlib.nullcontext():
                    backend = load_backend(kw["model"])
                    backend.prepare(template.prefix)
                write_manifest(backend_ref(backend), {"name": "local"})
                asyncio.run(state.run(out, backend, template, loop, kw["model"], grader, run_id, err))
            else:
                state = _curate_on_cluster(state, problems, out, template, loop, kw, grader, run_id,
                                           cluster, previous, write_manifest, err)
        except KeyboardInterrupt:
            interrupted = True
            if cluster is not None:
                state = state.reloaded(out)
        metrics = state.metrics(problems, grader, time.monotonic() - t0, contamination)
        metrics.update({"dataset": problems_arg, "model": kw["model"], "run_id": run_id, "out": str(out),
                        "complete": not interrupted and len(state.work.closed) == len(problems)})
        update_json(out / METRICS, metrics)  # `tora correct`'s section stays
    c = metrics["curation"]
    err.print(f"kept {c['kept']} trajectories for {c['problems_with_kept']} of {len(problems)} problems "
              f"({metrics['trajectories']} sampled, accuracy {_pct(metrics['accuracy'])}, {c['duplicates']} duplicates "
              f"dropped); written to {out}", highlight=False)
    if as_json:
        print_json(metrics)
    if interrupted:
        err.print("interrupted: run the same command again to continue", highlight=False)
        raise KeyboardInterrupt
    fail_if_all_failed(state.work.new)
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _curate_on_cluster(state: Curation, problems: list[Problem], out: Path, template: PromptTemplate,
                       loop: LoopSettings, kw: dict[str, Any], grader: str, run_id: str,
                       cluster: ClusterOptions, previous: dict[str, Any] | None,
                       write_manifest: Callable[[dict[str, str], dict[str, Any]], None], err: Console) -> Curation:
    """The same curation sharded by problem over Ray workers (`tora.distributed`); returns the state
    read back from the merged files."""
    from tora.distributed.driver import ClusterRun, run_on_cluster
    from tora.distributed.plan import CuratePlan
    from tora.distributed.progress import ClusterProgress
    from tora.distributed.worker import WorkerSetup

    ledger, work = state.ledger, state.work
    plan = CuratePlan(state.samples, loop.config, state.rule, ledger.cap, ledger.seed, work.stop_when_full,
                      work.retry_errors, state.greedy_first)
    setup = WorkerSetup(model=kw["model"], template=template, policy=loop.policy, grader=grader,
                        capacity=loop.capacity, run_id=run_id, plan=plan)

    def started(run: ClusterRun) -> None:
        write_manifest(run.backend(previous), cluster.describe(run))

    run = asyncio.run(run_on_cluster(out, problems, setup, cluster, samples_hint=state.samples,
                                     progress=ClusterProgress(err, "curate", len(problems)), on_started=started))
    for lost in run.lost:
        err.print(f"[yellow]worker lost:[/yellow] {lost}; its unfinished problems were run again", highlight=False)
    return state.reloaded(out)


def _available(name: str) -> bool:
    try:
        path = dataset_path(name)
    except DataError:  # not shipped, and no copy in the data folders
        return False
    return path is not None and path.is_file()


def _guard(problems: list[Problem], eval_sets: list[str] | None, n: int, threshold: float,
           err: Console) -> tuple[list[Overlap], list[str]]:
    """The problems that overlap the evaluation sets, and the sets checked."""
    t0 = time.monotonic()
    if eval_sets is None:
        eval_sets = [d for d in DATASETS if _available(d)]
    evals = [p for name in eval_sets for p in load_problems(name)]
    if not evals:
        err.print("[yellow]warning:[/yellow] contamination check: no evaluation set found (set TORA_DATA_DIR or "
                  "--eval-sets); nothing was checked")
        return [], []
    found = NgramIndex(evals, n).check(problems, threshold)
    err.print(f"contamination check: {len(problems)} problems against {len(evals)} evaluation problems "
              f"({', '.join(eval_sets)}), {n}-grams, in {time.monotonic() - t0:.1f} s", highlight=False, style="dim")
    return found, eval_sets


def _report_contamination(flagged: list[Overlap], total: int, checked: list[str], n: int, threshold: float,
                          allowed: bool, out: Path, err: Console) -> None:
    if not flagged or not checked:
        return
    fate = "kept (--allow-contaminated)" if allowed else "excluded"
    err.print(f"[yellow]contamination:[/yellow] {len(flagged)} of {total} problems share ≥ {threshold:g} of their "
              f"{n}-grams with an evaluation set: {fate}; see {out / CONTAMINATION}")
    by_source: dict[str, int] = {}
    for o in flagged:
        by_source[o.match.source or "?"] = by_source.get(o.match.source or "?", 0) + 1
    err.print("  " + ", ".join(f"{name}: {count}" for name, count in sorted(by_source.items())), highlight=False)


class Curation:
    """One curation run's work: problems x samples, grouped by problem, and the feed of jobs still to run."""

    def __init__(self, problems: list[Problem], samples: int, rule: KeepRule, cap: int | None, seed: int,
                 stop_when_full: bool, retry_errors: bool, greedy_first: bool,
                 branch_after_cell: int | None = None) -> None:
        self.problems = problems
        self.samples = samples
        self.rule = rule
        self.greedy_first = greedy_first
        self.branch_after_cell = branch_after_cell
        ledger = Ledger(key=lambda t: (t.problem.id, t.sample_index), group=lambda t: t.problem.id,
                        eligible=rule.keeps, cap=cap, seed=seed)
        self.work = Work(ledger, {p.id: [(p.id, k) for k in range(samples)] for p in problems},
                         retry_errors=retry_errors, stop_when_full=stop_when_full)
        self.ledger = ledger
        self.loaded = 0
        self.retry: set[Pair] = set()

    def load(self, out: Path) -> None:
        """What an earlier run left: valid records only, the latest per sample."""
        ids = set(self.work.units)
        records = [t for (pid, k), t in load_finished(out / TRAJECTORIES).items() if pid in ids and k < self.samples]
        curated = list(read_trajectories(out / CURATED, skip_invalid=True)) if (out / CURATED).is_file() else []
        kept = [t for t in curated if t.origin != "teacher_corrected" and t.problem.id in ids]
        self.ledger.load(records, kept, seen=curated)
        self.loaded = len(records)
        self.retry = self.work.to_retry()

    def reloaded(self, out: Path) -> Curation:
        """The same run read back from its files (after the workers of a cluster wrote them):
        what this session added counts as new, final problems as closed."""
        fresh = Curation(self.problems, self.samples, self.rule, self.ledger.cap, self.ledger.seed,
                         self.work.stop_when_full, self.work.retry_errors, self.greedy_first, self.branch_after_cell)
        fresh.load(out)
        before = {t.id for t in self.work.latest()}
        fresh.work.new = [t for t in fresh.work.latest() if t.id not in before]
        fresh.work.attempted = {(t.problem.id, t.sample_index) for t in fresh.work.new}
        fresh.work.closed = {p.id for p in self.problems if fresh.work.final(p.id)}
        fresh.loaded = self.loaded
        fresh.retry = self.retry
        return fresh

    def jobs(self, config: SolveConfig, backend: Backend, branches: Branches | None = None) -> Iterator[Job]:
        """Problem-major, drawn lazily: a problem that became final is passed over. With `branches`,
        a problem's samples start from one shared prefix where they can (`tora.branching`)."""
        greedy = SolveConfig(sampling=SamplingParams(), limits=config.limits, render=config.render)
        for p in self.problems:
            plan: dict[int, Prefix | None] = {}
            if branches is not None:
                pending = [k for _, k in self.work.pending(p.id)]
                plan = branches.plan(p.id, pending, self.ledger.done(p.id).values(), config.limits.timeout_s)
            for _, k in self.work.pending(p.id):
                cfg = greedy if self.greedy_first and k == 0 else sample_config(config, k, self.samples)
                job = Job(p, k, cfg, origin_for(backend, cfg), prefix=plan.get(k))
                if branches is not None and k in plan and plan[k] is None and not branches.is_leader(p.id, k):
                    job = dataclasses.replace(job, resolve=branches.follow)
                yield job

    async def run(self, out: Path, backend: Backend, template: PromptTemplate, loop: LoopSettings, spec: str,
                  grader: str, run_id: str, err: Console) -> None:
        work = self.work
        with TrajectoryWriter(out / TRAJECTORIES) as records, TrajectoryWriter(out / CURATED) as curated:
            await work.close_finished(curated)
            loaded = work.latest()
            with BatchProgress(err, "curate", len(self.problems), done=len(work.closed), scored=len(loaded),
                               hits=sum(t.result.correct is True for t in loaded), rate_unit=" traj/s",
                               counters=("kept", "exec errors")) as progress:
                progress.add(kept=self.ledger.kept_count(), **{"exec errors": sum(t.stats.exec_errors for t in loaded)})
                pool = kernel_pool(loop.policy, loop.capacity)
                stems = PrefixKernels(pool)
                branches = Branches(self.branch_after_cell, stems) if self.branch_after_cell else None
                make_episode = episode_factory(backend, template, spec, run_id, prefix_states=stems, brancher=branches)
                feed = self.jobs(loop.config, backend, branches)

                def wanted(job: Job) -> bool:
                    if work.open(job.problem.id):
                        return True
                    if branches is not None:
                        branches.withdrawn(job)
                    return False

                async with (Loop(make_episode, loop.policy, loop.capacity, grader=grader, backend=backend,
                                 kernels=pool) as running,
                            contextlib.aclosing(stems),  # after the trajectories, before the pool
                            contextlib.aclosing(running.scheduler.run(feed, wanted=wanted)) as results):
                    async for result in results:
                        t = result.trajectory
                        progress.score(result.correct, **{"exec errors": t.stats.exec_errors})
                        kept = await work.record(t, (t.problem.id, t.sample_index), records, curated)
                        if kept is not None:
                            progress.complete()
                            progress.add(kept=kept)

    def metrics(self, problems: list[Problem], grader: str, wall_s: float,
                contamination: dict[str, Any]) -> dict[str, Any]:
        latest = self.work.latest()
        metrics = compute_metrics(regrade(latest, grader), problems, samples=self.samples, grader=grader,
                                  wall_s=wall_s)
        kept = self.ledger.kept
        metrics["curation"] = {
            "kept": self.ledger.kept_count(),
            "problems_with_kept": sum(1 for p in problems if kept.get(p.id)),
            "problems_final": len(self.work.closed),
            "duplicates": self.ledger.duplicate_candidates(),
            "eligible": sum(self.rule.keeps(t) for t in latest),
            "samples_not_run": self.work.not_run(),  # of problems that were full first (--stop-when-full)
            "retried": len(self.retry & self.work.attempted),
            "contamination": contamination,
        }
        return metrics
