"""The `tora` model for lm-evaluation-harness: each generation request is one trajectory.

Importing this module registers the model (lm-eval finds a custom model only
once its module is imported: `tora lm-eval` does that). Model arguments
(`--model_args model=SPEC,concurrency=8,...`) are the loop options of `tora
eval`: `model`, `prompt`, `concurrency`, `kernels`, `max_tool_calls`,
`max_tokens`, `max_tokens_per_call`, `temperature`, `top_p`, `seed`,
`timeout`, `render`, `run_on`, `fresh_namespace`, `isolation`, `memory_mb`,
plus `record` (default true) and `record_to` (default
trajectories/lm-eval.jsonl).

`generate_until` runs every request at once on the scheduler (bounded by
`concurrency`) and returns each trajectory's whole interleaved solution cut
at the request's `until` strings. A request's context is the problem (the
task files under tora/lmeval/tasks/ make it the bare question; the few-shot
prompt is tora's template). `max_gen_toks` is the trajectory's completion
token budget; `temperature`/`do_sample`/`top_p`/`seed` in the task's
generation kwargs win over the model arguments; `tora_prompt` there names
the prompt template (tora_math500 asks for tora-math) unless the model
argument `prompt` says otherwise. Identical contexts are
samples 0, 1, ... of one problem (lm-eval's `repeats`).

The tool loop scores no text: loglikelihood requests raise `UsageError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from tora.backends.base import cut_at_stops
from tora.backends.registry import load_backend
from tora.data import problem_from_text
from tora.engine import Episode, KernelSource, SolveConfig
from tora.errors import ToraError, UsageError
from tora.loop import Loop, LoopSettings
from tora.paths import trajectories_dir
from tora.prompts import PromptTemplate, default_prompt, load_prompt
from tora.record import Trajectory, TrajectoryWriter
from tora.scheduler import Job, origin_for

logger = logging.getLogger(__name__)

# What lm-eval itself passes to every model's constructor; not ours to use.
_HARNESS_ARGS = {"batch_size", "max_batch_size", "device"}
_NO_SCORING = ("the tora model generates tool-integrated solutions and scores no text ({what}); "
               "run generate_until tasks such as tora_gsm8k or tora_math500")


def default_record_path() -> Path:
    return trajectories_dir() / "lm-eval.jsonl"


@register_model("tora")
class ToraLM(LM):  # type: ignore[misc]  # lm_eval is untyped
    def __init__(self, model: str = "embedded", prompt: str | None = None, concurrency: int = 4,
                 kernels: int | None = None, max_tool_calls: int = 4, max_tokens: int = 2048,
                 max_tokens_per_call: int = 1024, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, timeout: float = 10.0, render: str = "default", run_on: str = "close",
                 fresh_namespace: bool = False, isolation: str | None = None, memory_mb: int | None = None,
                 record: bool = True, record_to: str | None = None, **harness: Any) -> None:
        super().__init__()
        unknown = sorted(set(harness) - _HARNESS_ARGS)
        if unknown:
            raise UsageError(f"tora model: unknown model argument(s) {', '.join(unknown)}; see tora/lmeval/model.py")
        try:
            settings = LoopSettings.build(
                temperature=temperature, top_p=top_p, seed=seed, max_tool_calls=max_tool_calls,
                max_tokens=max_tokens, max_tokens_per_call=max_tokens_per_call, timeout_s=timeout,
                render_policy=render, run_on=run_on, fresh_namespace=fresh_namespace, isolation=isolation,
                memory_mb=memory_mb, concurrency=concurrency, kernels=kernels, graders=1)
        except UsageError as exc:
            raise UsageError(f"tora model: {exc}") from exc
        self.spec = str(model)
        self.settings = settings
        self.config = settings.config
        self.prompt = prompt
        self._templates: dict[str, PromptTemplate] = {}
        self._prepared = False
        self.backend = load_backend(self.spec)
        self.record_path = Path(record_to) if record_to else (default_record_path() if record else None)
        self.run_id = f"lm-eval-{time.strftime('%Y%m%d-%H%M%S')}"

    # -- what the tool loop cannot do -------------------------------------------------

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise UsageError(_NO_SCORING.format(what="loglikelihood"))

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        raise UsageError(_NO_SCORING.format(what="loglikelihood_rolling"))

    # -- generation ---------------------------------------------------------------------

    def _config(self, gen: dict[str, Any], sample: int) -> SolveConfig:
        base = self.config
        sampling = base.sampling
        temperature = gen.get("temperature", 0.0 if gen.get("do_sample") is False else sampling.temperature)
        seed = gen.get("seed", sampling.seed)
        sampling = dataclasses.replace(sampling, temperature=float(temperature),
                                       top_p=float(gen.get("top_p", sampling.top_p)),
                                       seed=None if seed is None else int(seed) + sample)
        budget = int(gen.get("max_gen_toks", base.limits.max_tokens))
        limits = dataclasses.replace(base.limits, max_tokens=budget,
                                     max_tokens_per_call=min(base.limits.max_tokens_per_call, budget))
        render = dataclasses.replace(base.render, extra_stop=(*base.render.extra_stop, *_until(gen)))
        return SolveConfig(sampling=sampling, limits=limits, render=render)

    def _template(self, gen: dict[str, Any]) -> PromptTemplate:
        """The model argument `prompt`, else the task's `tora_prompt` generation kwarg, else the default."""
        name = self.prompt or str(gen.get("tora_prompt") or default_prompt(self.spec))
        if name not in self._templates:
            self._templates[name] = load_prompt(name)
            if not self._prepared:  # llama.cpp keeps one prefix's state: the first template's
                self.backend.prepare(self._templates[name].prefix)
                self._prepared = True
        return self._templates[name]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        jobs: list[Job] = []
        templates: dict[tuple[str, int], PromptTemplate] = {}
        samples: dict[str, int] = {}
        for request in requests:
            context, gen = request.args[0], dict(request.args[1] or {})
            problem = problem_from_text(str(context), source="lm-eval")
            if request.task_name:
                problem.meta["task"] = request.task_name
            k = samples.get(problem.id, 0)
            samples[problem.id] = k + 1
            config = self._config(gen, k)
            jobs.append(Job(problem, k, config, origin_for(self.backend, config)))
            templates[jobs[-1].key] = self._template(gen)
        done = asyncio.run(self._run(jobs, templates, disable_tqdm))
        failed = [t for t in done.values() if t.result.finish == "error"]
        if failed and len(failed) == len(done):
            raise ToraError(f"every trajectory failed; the first: {failed[0].result.error}")
        if failed:
            logger.warning("%d of %d trajectories failed (scored as wrong); the first: %s", len(failed), len(done),
                           failed[0].result.error)
        out = []
        for job, request in zip(jobs, requests, strict=True):
            text, _ = cut_at_stops(done[job.key].completion(), _until(dict(request.args[1] or {})))
            out.append(text)
        return out

    async def _run(self, jobs: list[Job], templates: dict[tuple[str, int], PromptTemplate],
                   disable_tqdm: bool) -> dict[tuple[str, int], Trajectory]:
        from tqdm import tqdm

        def make_episode(job: Job, kernels: KernelSource[Any]) -> Episode:
            return Episode(job.problem, backend=self.backend, template=templates[job.key], kernels=kernels,
                           config=job.config, spec=self.spec, sample_index=job.sample_index, origin=job.origin,
                           run_id=self.run_id)

        writer = TrajectoryWriter(self.record_path) if self.record_path else None
        done: dict[tuple[str, int], Trajectory] = {}
        try:
            # The model outlives this call (lm-eval calls generate_until per task): not the loop's to close.
            async with Loop(make_episode, self.settings.policy, self.settings.capacity, grader=None) as loop:
                with tqdm(total=len(jobs), desc="tora trajectories", disable=disable_tqdm) as bar:
                    async with contextlib.aclosing(loop.scheduler.run(jobs)) as results:
                        async for result in results:
                            if writer is not None:
                                await writer.append(result.trajectory)
                            done[result.pair] = result.trajectory
                            bar.update(1)
        finally:
            if writer is not None:
                writer.close()
        return done


def _until(gen: dict[str, Any]) -> list[str]:
    until = gen.get("until") or []
    return [until] if isinstance(until, str) else [s for s in until if s]
