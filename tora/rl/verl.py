"""tora as a verl agent loop: `agent_name: tora` (verl 0.9).

verl's `AgentLoopWorker` makes one agent loop per sample and awaits its `run`;
this one runs a tora episode for the sample's question: generation goes
through verl's server manager (`LLMServerClient.generate`, token ids in, token
ids and logprobs out, served by verl's vLLM or SGLang replicas with the
weights verl keeps in sync), code runs in a stateful sandboxed kernel of
tora's, and the grader's verdict is the reward. The result is an
`AgentLoopOutput` built from `tora.export.rl.rl_row`, the one place the mask
is built: 1 on sampled tokens, 0 on the ```output blocks tora appended.

Register it with an agent loop config file (`actor_rollout_ref.rollout.agent.
agent_loop_config_path`; `tora/rl/verl_agent_loop.yaml` is one) or by
importing this module where the workers run; the keys beside `_target_` are
this class's settings (template, grader, max_tool_calls, timeout_s, reward,
kernels). The sample's question is `extra_info.question` or the last user
message of `raw_prompt`; its answer is `reward_model.ground_truth`.

This module imports verl; install verl in its own environment
(`./setup.sh --verl`), not in tora's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from verl.experimental.agent_loop.agent_loop import (  # type: ignore[import-not-found]
    AgentLoopBase,
    AgentLoopMetrics,
    AgentLoopOutput,
    register,
)

from tora.data import problem_from_text
from tora.engine import Limits, SamplingParams, SolveConfig
from tora.errors import UsageError
from tora.export.rl import RewardRule, rl_row
from tora.grading import DEFAULT_GRADER
from tora.kernels import KernelPool, sandbox_policy
from tora.prompts import load_prompt
from tora.record import Problem
from tora.rl.server_backend import TokenServerBackend
from tora.scheduler import Capacity, Job, LiveKernels, Scheduler, episode_factory


@dataclass
class _Kernels:
    """The kernels of one event loop (one AgentLoopWorker): a warm pool, a bound on live kernels."""

    pool: KernelPool
    live: LiveKernels


_KERNELS: dict[int, _Kernels] = {}


async def worker_kernels(limit: int, timeout_s: float) -> LiveKernels:
    """This event loop's kernel source, started on first use and shared by its agent loops."""
    key = id(asyncio.get_running_loop())
    if key not in _KERNELS:
        pool = KernelPool(sandbox_policy(timeout_s=timeout_s), size=min(limit, 4))  # TORA_SANDBOX_* apply
        _KERNELS[key] = _Kernels(pool, LiveKernels(pool, limit))
        await pool.start()
    return _KERNELS[key].live


async def close_worker_kernels() -> None:
    """Stop this event loop's kernel pool (a worker that shuts down, a test)."""
    kernels = _KERNELS.pop(id(asyncio.get_running_loop()), None)
    if kernels is not None:
        await kernels.pool.close()


def problem_of(sample: dict[str, Any]) -> Problem:
    """The problem in a verl sample (RLHFDataset's fields)."""
    extra = sample.get("extra_info") or {}
    question = extra.get("question")
    if not question:
        for message in reversed(list(sample.get("raw_prompt") or [])):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                question = message["content"]
                break
    if not question:
        raise UsageError("verl sample: no question (neither extra_info.question nor a user message in raw_prompt)")
    answer = (sample.get("reward_model") or {}).get("ground_truth")
    problem = problem_from_text(str(question), None if answer is None else str(answer), source="verl")
    if "index" in extra:
        problem = problem.model_copy(update={"id": f"{sample.get('data_source') or 'verl'}-{extra['index']}"})
    return problem


@register("tora")
class ToraAgentLoop(AgentLoopBase):  # type: ignore[misc]
    """verl's agent loop interface over tora's episode (see the module doc)."""

    def __init__(self, *args: Any, template: str = "tora-gsm8k", grader: str = DEFAULT_GRADER,
                 max_tool_calls: int = 4, timeout_s: float = 10.0, reward: str | None = None, kernels: int = 8,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.template = load_prompt(template)
        self.grader = grader
        self.max_tool_calls = max_tool_calls
        self.timeout_s = timeout_s
        self.reward = RewardRule.parse(reward)
        self.kernels = kernels
        self.response_length = int(self.rollout_config.response_length)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        problem = problem_of(kwargs)
        params = dict(sampling_params)
        sampling = SamplingParams(temperature=float(params.pop("temperature", 1.0)),
                                  top_p=float(params.pop("top_p", 1.0)))
        params.pop("logprobs", None)  # always asked for: the row carries them
        backend = TokenServerBackend(self.server_manager, self.tokenizer, request_id=uuid4().hex, extra=params,
                                     model=str(self.config.actor_rollout_ref.model.get("path", "verl")))
        limits = Limits(max_tool_calls=self.max_tool_calls, max_tokens=self.response_length,
                        max_tokens_per_call=self.response_length, timeout_s=self.timeout_s)
        config = SolveConfig(sampling=sampling, limits=limits)
        kernels = await worker_kernels(self.kernels, self.timeout_s)
        scheduler = Scheduler(episode_factory(backend, self.template, "verl", "verl"), kernels, grader=self.grader,
                              capacity=Capacity(in_flight=1, kernels=1, graders=1))
        t0 = time.monotonic()
        try:
            graded = await scheduler.trajectory(Job(problem, int(kwargs.get("sample_index", 0) or 0), config,
                                                    origin="sampled" if sampling.temperature > 0 else "greedy"))
        finally:
            await scheduler.aclose()
        trajectory = graded.trajectory
        row = rl_row(trajectory, self.reward)
        if row is None:
            raise UsageError(f"trajectory {trajectory.id} carries no token ids (finish {trajectory.result.finish})")
        n = self.response_length
        return AgentLoopOutput(
            prompt_ids=row.prompt_ids,
            response_ids=row.response_ids[:n],
            response_mask=row.response_mask[:n],
            response_logprobs=None if row.response_logprobs is None else row.response_logprobs[:n],
            reward_score=row.reward,
            num_turns=row.num_turns,
            metrics=AgentLoopMetrics(generate_sequences=time.monotonic() - t0 - _exec_seconds(trajectory),
                                     tool_calls=_exec_seconds(trajectory)),
            # The whole record too: verl keeps extra fields per sample, for whoever stores rollouts.
            extra_fields={"tora": row.meta, "tora_trajectory": trajectory.model_dump(mode="json")},
        )


def _exec_seconds(trajectory: Any) -> float:
    return float(sum(getattr(s, "duration_s", 0.0) or 0.0 for s in trajectory.steps))
