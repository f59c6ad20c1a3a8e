"""The loop's settings and resources, in one place for every caller.

`LoopSettings` is what a caller of the loop decides (sampling, budgets,
rendering, the sandbox policy, the three capacity limits), built once from
typed arguments: the CLI's options (`tora.cli.options.loop_settings`), the
lm-eval model's arguments, or a worker's setup. `Loop` opens what runs it: a
kernel pool (or the kernels a caller brings), a scheduler over it, and,
when handed one, the model; closed in reverse, however the loop is left.
The batch verbs, `tora serve`, the lm-eval model and the Ray workers all
open theirs here.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from sandbox import KernelPool, SandboxPolicy
from tora.backends.base import Backend
from tora.engine import K, KernelSource, Limits, RenderSettings, SamplingParams, SolveConfig
from tora.errors import UsageError
from tora.kernels import sandbox_policy
from tora.render import RENDERERS
from tora.scheduler import Capacity, EpisodeFactory, Scheduler

POOL_MAX = 8  # warm kernels kept ready at most; more live kernels start on demand


@dataclass(frozen=True)
class LoopSettings:
    """How every trajectory of one run is produced, and how many run at once."""

    config: SolveConfig
    policy: SandboxPolicy
    capacity: Capacity

    @classmethod
    def build(cls, *, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
              max_tool_calls: int = 4, max_tokens: int = 2048, max_tokens_per_call: int = 1024,
              timeout_s: float = 10.0, render_policy: str = "default", run_on: str = "close",
              fresh_namespace: bool = False, isolation: str | None = None, memory_mb: int | None = None,
              concurrency: int = 4, kernels: int | None = None, graders: int = 2) -> LoopSettings:
        """The settings from options; the sandbox's also from TORA_ISOLATION / TORA_SANDBOX_* (see
        `tora.kernels.sandbox_policy`)."""
        if render_policy not in RENDERERS:
            raise UsageError(f"render: {render_policy!r} is not one of {', '.join(sorted(RENDERERS))}")
        if run_on not in ("close", "output"):
            raise UsageError(f"run_on: {run_on!r} is neither 'close' nor 'output'")
        config = SolveConfig(
            sampling=SamplingParams(temperature=float(temperature), top_p=float(top_p),
                                    seed=None if seed is None else int(seed)),
            limits=Limits(max_tool_calls=int(max_tool_calls), max_tokens=int(max_tokens),
                          max_tokens_per_call=int(max_tokens_per_call), timeout_s=float(timeout_s)),
            render=RenderSettings(policy=render_policy, run_on=run_on, fresh_namespace=bool(fresh_namespace)),  # type: ignore[arg-type]
        )
        policy = sandbox_policy(timeout_s=float(timeout_s), isolation=isolation, memory_mb=memory_mb)
        capacity = Capacity(in_flight=int(concurrency), kernels=int(kernels or concurrency), graders=int(graders))
        return cls(config, policy, capacity)


def kernel_pool(policy: SandboxPolicy, capacity: Capacity) -> KernelPool:
    """The pool a loop runs on (made first by a caller that also forks its kernels: tora.prefix_kernels)."""
    return KernelPool(policy, size=min(capacity.kernels, POOL_MAX))


class ManagedKernels(KernelSource[K], Protocol[K]):
    """A kernel source the loop starts and closes (sandbox.KernelPool fits)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Loop:
    """A started kernel pool and a scheduler over it; `aclose` (or leaving `async with`) stops the
    grading workers, the kernels and, if it was handed one, the model."""

    def __init__(self, make_episode: EpisodeFactory, policy: SandboxPolicy, capacity: Capacity, *,
                 grader: str | None, backend: Backend | None = None,
                 kernels: ManagedKernels[Any] | None = None) -> None:
        self.kernels: ManagedKernels[Any] = kernels if kernels is not None else kernel_pool(policy, capacity)
        self.scheduler = Scheduler(make_episode, self.kernels, grader=grader, capacity=capacity)
        self.backend = backend  # closed with the loop; None: the caller keeps its model

    async def start(self) -> None:
        try:
            await self.kernels.start()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        try:
            await self.scheduler.aclose()
        finally:
            try:
                await self.kernels.close()
            finally:
                if self.backend is not None:
                    await self.backend.aclose()

    async def __aenter__(self) -> Loop:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
