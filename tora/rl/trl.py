"""A `rollout_func` for TRL's `GRPOTrainer`: tora runs the episodes, TRL trains on them.

    rollout = ToraRollout(problems, template="tora-gsm8k")
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=GRPOConfig(...),
                          train_dataset=Dataset.from_list(rollout.dataset_rows()),
                          reward_funcs=tora_reward, rollout_func=rollout)

TRL (1.16) calls `rollout(prompts, trainer)` with this process's prompts, each already
repeated `num_generations` times, and wants one completion per prompt: `prompt_ids`,
`completion_ids`, `logprobs`; every other key goes to the reward functions, except
`env_mask`, which TRL multiplies into its loss mask (1: the model's token, 0: not).

Each prompt becomes one tora trajectory on the scheduler: its own stateful sandboxed
kernel (taken at the first code block, released at the end), tora's tool loop, the grader's
verdict as the reward. Generation runs on the trainer's own model object (`TransformersBackend.from_model`),
so every rollout samples from the weights being trained, and is fed token ids, not
re-tokenised text. Ids, mask and logprobs come from `tora.export.rl.rl_row`, the one place
the mask is built: 0 exactly on the tokens of the ```output blocks tora appended.

`branch_after_cell=N` makes each group (the prompt's `num_generations`
repeats) a tree of depth one, as `tora curate --branch-after-cell` does: the
group's first generation runs as usual, the others continue from its steps
up to its N-th cell's output, on the token path from the exact ids it read,
each in a fork of its kernel (`tora.branching`). Each generation's completion
then starts with the shared prefix's tokens, which the trainer trains on with
that generation's advantage; a leader that ends before its N-th cell shares
nothing.

Sampling follows the trainer's own settings (temperature, top_p, max_completion_length)
so that the logprobs recorded at rollout are those TRL recomputes: TRL scales logits by
its temperature before the log-softmax, and so does the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tora.backends.transformers import TransformersBackend
from tora.branching import Branches
from tora.engine import Limits, RenderSettings, SamplingParams, SolveConfig
from tora.errors import UsageError
from tora.export.rl import RewardRule, RLRow, rl_row
from tora.grading import DEFAULT_GRADER
from tora.kernels import KernelPool, SandboxPolicy, sandbox_policy
from tora.prefix_kernels import PrefixKernels
from tora.prompts import PromptTemplate, load_prompt
from tora.record import Problem
from tora.scheduler import Capacity, Graded, Job, LiveKernels, Scheduler, episode_factory

REWARD_KEY = "tora_reward"


def tora_reward(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """The reward function to pass to GRPOTrainer: the reward tora's rollout computed (grader + rule).
    None where the grader gave no verdict: TRL leaves such a completion out of its group's baseline."""
    rewards = kwargs.get(REWARD_KEY)
    if rewards is None:
        raise UsageError("tora_reward needs the rollout_func to be tora.rl.trl.ToraRollout (no tora_reward field)")
    return [None if r is None else float(r) for r in rewards]


def question_of(prompt: Any) -> str:
    """The question in a TRL prompt: the text itself, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt.strip()
    if isinstance(prompt, list):
        for message in reversed(prompt):
            if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
                return str(message["content"]).strip()
    raise UsageError(f"a TRL prompt must be a question or a list of chat messages with a user turn, not {prompt!r:.80}")


class ToraRollout:
    """TRL's `rollout_func` (see the module doc). Call `close()` when training is done."""

    def __init__(
        self,
        problems: Iterable[Problem],
        *,
        template: PromptTemplate | str = "tora-gsm8k",
        grader: str = DEFAULT_GRADER,
        reward: RewardRule | None = None,
        limits: Limits | None = None,
        render: RenderSettings | None = None,
        policy: SandboxPolicy | None = None,
        capacity: Capacity | None = None,
        run_id: str = "trl",
        branch_after_cell: int | None = None,
    ) -> None:
        self.problems: dict[str, Problem] = {}
        for problem in problems:
            self.problems.setdefault(problem.text.strip(), problem)
        self.template = load_prompt(template) if isinstance(template, str) else template
        self.grader = grader
        self.reward = reward or RewardRule()
        self.limits = limits or Limits()
        self.render = render or RenderSettings()
        self.policy = policy or sandbox_policy(timeout_s=self.limits.timeout_s)  # TORA_SANDBOX_* apply
        self.capacity = capacity or Capacity(in_flight=8, kernels=8, graders=1)
        self.run_id = run_id
        self.branch_after_cell = branch_after_cell
        self.calls = 0
        self.last: list[Graded] = []  # the last call's trajectories, in the trainer's order
        self.rows: list[RLRow] = []  # and their rows
        self._runner: asyncio.Runner | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._scheduler: Scheduler | None = None
        self._backend: TransformersBackend | None = None
        self._kernels: LiveKernels | None = None  # the scheduler's count, kept after close()
        self._stems: PrefixKernels | None = None
        self._branches: Branches | None = None

    def dataset_rows(self) -> list[dict[str, str]]:
        """One row per problem, `{"prompt": question}`: the train dataset for GRPOTrainer."""
        return [{"prompt": text} for text in self.problems]

    # -- the rollout ----------------------------------------------------------

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
        jobs = self._jobs(prompts, trainer)
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()  # no dropout while sampling; TRL puts it back in train mode for the loss anyway
        try:
            if self._runner is None:
                self._runner = asyncio.Runner()
            graded = self._runner.run(self._rollout(model, trainer.processing_class, jobs))
        finally:
            model.train(was_training)
        self.calls += 1
        self.last = graded
        rows = [rl_row(g.trajectory, self.reward) for g in graded]
        missing = [g.trajectory.id for g, row in zip(graded, rows, strict=True) if row is None]
        if missing:
            raise UsageError(f"trajectories {', '.join(missing)} carry no token ids; the live backend must record them")
        self.rows = [row for row in rows if row is not None]
        return {
            "prompt_ids": [row.prompt_ids for row in self.rows],
            "completion_ids": [row.response_ids for row in self.rows],
            "logprobs": [row.response_logprobs for row in self.rows],
            "env_mask": [row.response_mask for row in self.rows],
            REWARD_KEY: [row.reward for row in self.rows],
            "tora_trajectory_id": [g.trajectory.id for g in graded],
        }

    def _jobs(self, prompts: list[Any], trainer: Any) -> list[Job]:
        sampling = SamplingParams(temperature=float(trainer.temperature), top_p=float(trainer.top_p or 1.0))
        limits = self.limits
        if getattr(trainer, "max_completion_length", None):
            limits = replace(limits, max_tokens=int(trainer.max_completion_length))
        config = SolveConfig(sampling=sampling, limits=limits, render=self.render)
        origin = "sampled" if sampling.temperature > 0 else "greedy"
        seen: dict[str, int] = {}
        jobs = []
        for prompt in prompts:
            text = question_of(prompt)
            problem = self.problems.get(text)
            if problem is None:
                raise UsageError(f"the trainer sent a prompt this rollout has no problem for: {text[:80]!r}")
            k = seen[problem.id] = seen.get(problem.id, -1) + 1
            # Distinct sample indices per call and per repeat: (problem, index) names one trajectory.
            jobs.append(Job(problem, sample_index=self.calls * len(prompts) + k, config=config, origin=origin))
        return jobs

    async def _rollout(self, model: Any, tokenizer: Any, jobs: list[Job]) -> list[Graded]:
        scheduler = await self._started(model, tokenizer)
        done: dict[tuple[str, int], Graded] = {}
        try:
            async for result in scheduler.run(self._grouped(jobs)):
                done[result.pair] = result
        finally:
            if self._stems is not None:
                await self._stems.aclose()  # no kernel of this rollout outlives it
        return [done[job.key] for job in jobs]

    def _grouped(self, jobs: list[Job]) -> list[Job]:
        """With branching, each problem's first job leads and the others follow it (`tora.branching`)."""
        branches = self._branches
        if branches is None:
            return jobs
        groups: dict[str, list[int]] = {}
        for job in jobs:
            groups.setdefault(job.problem.id, []).append(job.sample_index)
        for pid, indices in groups.items():
            branches.plan(pid, indices, [], self.limits.timeout_s)
        return [replace(job, resolve=branches.follow) if not branches.is_leader(job.problem.id, job.sample_index)
                and len(groups[job.problem.id]) > 1 else job for job in jobs]

    async def _started(self, model: Any, tokenizer: Any) -> Scheduler:
        if self._backend is not None and self._backend._model is not model:
            raise UsageError("ToraRollout serves one trainer: its model object changed between calls")
        if self._scheduler is None:
            name = Path(str(getattr(model.config, "_name_or_path", "") or "policy")).name
            self._backend = TransformersBackend.from_model(model, tokenizer, name=name)
            self._stack = contextlib.AsyncExitStack()
            pool = KernelPool(self.policy, size=min(self.capacity.kernels, 4))
            await pool.start()
            self._stack.push_async_callback(pool.close)
            self._stems = PrefixKernels(pool)
            self._branches = Branches(self.branch_after_cell, self._stems) if self.branch_after_cell else None
            self._stack.push_async_callback(self._stems.aclose)
            make = episode_factory(self._backend, self.template, f"live:{self._backend.model}", self.run_id,
                                   prefix_states=self._stems, brancher=self._branches)
            self._scheduler = Scheduler(make, pool, grader=self.grader, capacity=self.capacity)
            self._kernels = self._scheduler.kernels
            self._stack.push_async_callback(self._scheduler.aclose)
        return self._scheduler

    # -- bookkeeping ------------------------------------------------------------

    @property
    def kernels_live(self) -> int:
        """Kernels handed out and not yet given back (0 between calls)."""
        return self._kernels.live if self._kernels else 0

    @property
    def kernels_peak(self) -> int:
        """The most kernels out at once, over every call so far."""
        return self._kernels.peak if self._kernels else 0

    def close(self) -> None:
        """Stop the kernel pool and the grading workers."""
        if self._runner is None:
            return
        if self._stack is not None:
            self._runner.run(self._stack.aclose())
        self._runner.close()
        self._runner, self._stack, self._scheduler, self._backend = None, None, None, None
        self._stems, self._branches = None, None

    def __enter__(self) -> ToraRollout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
