"""The tool-integrated reasoning loop: generate -> parse fences -> execute -> continue.

An `Episode` solves one problem and yields typed events. It does no I/O of
its own beyond the model and the kernel it is given, so the terminal, the
recorder and batch runners are all just consumers of `Episode.run()`.

Everything awaits: hundreds of episodes can share one event loop, a model
call and a cell are both cancellable, and cancelling an episode interrupts
its cell and leaves a partial trajectory marked `interrupted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol

from tora import __version__, fences
from tora.backends.base import Backend, Delta, GenerationRequest
from tora.events import (
    CodeBlockClosed,
    Event,
    ExecutionFinished,
    FinalAnswer,
    Finished,
    TextDelta,
    TurnStarted,
)
from tora.grading.extract import extract_answer
from tora.prompts import PromptTemplate
from tora.record.schema import (
    CodeStep,
    ExecError,
    ExecutionStep,
    Finish,
    Generation,
    Problem,
    PromptRef,
    Result,
    Runtime,
    Sampling,
    Stats,
    Step,
    TextStep,
    Trajectory,
)
from tora.render import CellLike, get_renderer, observation


class KernelLike(Protocol):
    async def execute(self, code: str, timeout: float | None = None) -> Any: ...

    @property
    def info(self) -> dict[str, Any]: ...


class KernelSource(Protocol):
    """Hands out fresh kernels (sandbox.KernelPool fits)."""

    async def acquire(self) -> Any: ...

    async def release(self, kernel: Any) -> None: ...


@dataclass
class SolveConfig:
    max_tool_calls: int = 4
    max_tokens: int = 2048  # completion tokens for the whole trajectory
    max_tokens_per_call: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    timeout_s: float = 10.0  # wall time per cell
    render_policy: str = "default"
    fresh_namespace: bool = False  # ToRA-compat: each block runs alone
    extra_stop: list[str] = field(default_factory=list)
    # SandboxPolicy fields set by flags (--isolation, --memory-mb); the engine
    # itself never reads them, the verbs build their kernel source from them.
    sandbox: dict[str, Any] = field(default_factory=dict)


def extract_final(completion: str) -> tuple[str | None, str | None]:
    """The final answer (normalised) and the rule that found it."""
    found = extract_answer(completion)
    return found.answer, found.rule


class Episode:
    """One problem, one sample: the state of a single trajectory."""

    def __init__(
        self,
        problem: Problem,
        *,
        backend: Backend,
        template: PromptTemplate,
        kernels: KernelSource,
        config: SolveConfig | None = None,
        spec: str = "",
        sample_index: int = 0,
        origin: str = "greedy",
        run_id: str | None = None,
        kernel: KernelLike | None = None,
    ) -> None:
        self.problem = problem
        self.backend = backend
        self.template = template
        self.kernels = kernels
        self.config = config or SolveConfig()
        self.spec = spec
        self.sample_index = sample_index
        self.origin = origin
        self.run_id = run_id
        # A caller-owned kernel (the REPL keeps one per session) is used as is
        # and never released here.
        self._given_kernel = kernel
        self._render = get_renderer(self.config.render_policy)
        if template.kind == "chat":
            self.prompt = backend.format_chat(template.messages(problem.text))
        else:
            self.prompt = template.fill(problem.text)
        self.steps: list[Step] = []
        self.stats = Stats()
        self._t0 = time.monotonic()
        self._kernel_info: dict[str, Any] = {}
        self.trajectory: Trajectory | None = None

    # -- the loop -------------------------------------------------------------

    async def run(self) -> AsyncGenerator[Event, None]:
        cfg = self.config
        stops = [fences.OUTPUT_FENCE, *self.template.stop, *cfg.extra_stop]
        completion = ""
        finish: Finish = "no_answer"
        error: str | None = None
        kernel_task: asyncio.Task[Any] | None = None
        if self._given_kernel is None and not cfg.fresh_namespace:
            # Start the kernel while the model writes its first block.
            kernel_task = asyncio.create_task(self.kernels.acquire())
        try:
            turn = 0
            while True:
                remaining = cfg.max_tokens - self.stats.completion_tokens
                if remaining <= 0:
                    finish = "max_tokens"
                    break
                yield TurnStarted(turn)
                request = GenerationRequest(
                    prompt=self.prompt + completion,
                    stop=stops,
                    max_tokens=min(cfg.max_tokens_per_call, remaining),
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    seed=cfg.seed,
                    problem=self.problem,
                    sample_index=self.sample_index,
                    turn=turn,
                )
                step = TextStep(content="", t_start=self._elapsed())
                self.steps.append(step)
                # aclosing: a cancelled episode must stop the model *now*, not
                # whenever the garbage collector finalises the stream.
                async with contextlib.aclosing(self.backend.stream(request)) as stream:
                    async for event in stream:
                        if isinstance(event, Delta):
                            step.content += event.text
                            yield TextDelta(event.text)
                        else:
                            done = event
                step.t_end = self._elapsed()
                step.finish_reason = done.finish_reason
                step.prompt_tokens, step.completion_tokens = done.prompt_tokens, done.completion_tokens
                self.stats.prompt_tokens += done.prompt_tokens
                self.stats.completion_tokens += done.completion_tokens
                completion += step.content

                stopped_at_output = done.stop_string == fences.OUTPUT_FENCE
                code = fences.code_to_run(step.content, stopped_at_output)
                if code is None:
                    if fences.in_open_block(step.content) or done.finish_reason == "length":
                        # Cut off mid-thought: not a final answer, whatever it says.
                        finish = "max_tokens" if done.finish_reason == "length" else "no_answer"
                    else:
                        finish = "answered" if fences.final_boxed(step.content) is not None else "no_answer"
                    break
                if self.stats.tool_calls >= cfg.max_tool_calls:
                    finish = "max_tool_calls"
                    break
                self.stats.tool_calls += 1
                self.steps.append(CodeStep(content=code))
                yield CodeBlockClosed(code, self.stats.tool_calls)
                exec_step = await self._execute(code, kernel_task, after=completion)
                self.steps.append(exec_step)
                completion += exec_step.observation
                yield ExecutionFinished(exec_step, self.stats.tool_calls)
                turn += 1
        except (asyncio.CancelledError, KeyboardInterrupt):
            self._finalize("interrupted", None)
            raise
        except Exception as exc:
            finish, error = "error", f"{type(exc).__name__}: {exc}"
        finally:
            if kernel_task is not None:
                await self._release(kernel_task)
        trajectory = self._finalize(finish, error)
        if trajectory.result.final_answer is not None and finish == "answered":
            yield FinalAnswer(trajectory.result.final_answer, trajectory.result.extracted_by or "")
        yield Finished(trajectory)

    async def _execute(self, code: str, kernel_task: asyncio.Task[Any] | None, after: str) -> ExecutionStep:
        cfg = self.config
        fresh: Any = None
        if self._given_kernel is not None:
            kernel: Any = self._given_kernel
        elif kernel_task is not None:
            kernel = await kernel_task
        else:  # fresh namespace: a new kernel for this block alone
            kernel = fresh = await self.kernels.acquire()
        try:
            self._kernel_info = dict(kernel.info)
            cell: CellLike = await kernel.execute(code, timeout=cfg.timeout_s)
        finally:
            if fresh is not None:
                await self.kernels.release(fresh)
        rendered = self._render(cell, cfg.timeout_s)
        if cell.status != "ok":
            self.stats.exec_errors += 1
        err = cell.error
        return ExecutionStep(
            status=cell.status,  # type: ignore[arg-type]
            stdout=cell.stdout,
            stderr=cell.stderr,
            display=list(cell.display),
            error=None if err is None else ExecError(ename=err.ename, evalue=err.evalue, traceback=list(err.traceback)),
            truncated=bool(getattr(cell, "truncated", False)),
            duration_s=cell.duration_s,
            render_policy=cfg.render_policy,
            rendered=rendered,
            observation=observation(rendered, after),
        )

    async def _release(self, kernel_task: asyncio.Task[Any]) -> None:
        if not kernel_task.done():
            kernel_task.cancel()
        try:
            kernel = await asyncio.shield(kernel_task)
        except BaseException:
            return
        await asyncio.shield(self.kernels.release(kernel))

    # -- the record -----------------------------------------------------------

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._t0, 4)

    def _finalize(self, finish: Finish, error: str | None) -> Trajectory:
        cfg = self.config
        completion = "".join(s.context_text() for s in self.steps)
        answer, rule = extract_final(completion) if finish != "error" else (None, None)
        self.stats.wall_s = self._elapsed()
        trajectory = Trajectory(
            run_id=self.run_id,
            problem=self.problem,
            sample_index=self.sample_index,
            origin=self.origin,  # type: ignore[arg-type]
            generation=Generation(
                backend=self.backend.name,
                model=self.backend.model,
                spec=self.spec,
                prompt_template=PromptRef(name=self.template.name, sha256=self.template.sha256),
                sampling=Sampling(
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    max_tokens=cfg.max_tokens,
                    max_tokens_per_call=cfg.max_tokens_per_call,
                    seed=cfg.seed,
                    stop=[fences.OUTPUT_FENCE, *self.template.stop, *cfg.extra_stop],
                ),
                max_tool_calls=cfg.max_tool_calls,
            ),
            runtime=Runtime(
                executor="ipykernel",
                python=platform.python_version(),
                kernel=self._kernel_info,
                render_policy=cfg.render_policy,
                fresh_namespace=cfg.fresh_namespace,
                tora_version=__version__,
            ),
            prompt=self.prompt,
            steps=list(self.steps),
            result=Result(final_answer=answer, extracted_by=rule, finish=finish, error=error),
            stats=self.stats.model_copy(),
        )
        trajectory.content_hash = trajectory.compute_content_hash()
        self.trajectory = trajectory
        return trajectory
