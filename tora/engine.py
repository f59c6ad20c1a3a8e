"""The tool-integrated reasoning loop: generate -> parse fences -> execute -> continue.

An `Episode` solves one problem and yields typed events. It does no I/O of
its own beyond the model and the kernel it is given, so the terminal, the
recorder and batch runners are all just consumers of `Episode.run()`.

When code runs (`RenderSettings.run_on`): by default a python block runs
as soon as the model closes it (generation stops at a closing fence on its
own line as well as at ```output), because weak or differently trained
models close block after block and never ask for output themselves; any
other closed fence lets generation go on. The context stays ToRA's either
way: the block, then ```output ... ```. `run_on="output"` keeps ToRA's own
protocol (run only when the model writes ```output).

Everything awaits: hundreds of episodes can share one event loop, a model
call and a cell are both cancellable, and cancelling an episode (or a
timeout around it) interrupts its cell, releases its kernel and leaves a
partial trajectory marked `interrupted`. Backends are held to their stream
contract (`checked_stream`); a failure becomes `finish="error"` with a typed
`result.error`, never an exception out of `run()`.

An episode can also start part-way (`Prefix`): from another trajectory's
prompt and first steps, copied as they were, with its kernel state rebuilt
before the model continues: a fork of a kernel that holds the prefix's state
where the run shares one (`tora.prefix_kernels`), else by re-running the
prefix's cells; the record says which (`kernel_state`). `tora correct` uses
it to let a teacher continue a wrong trajectory, `tora curate
--branch-after-cell` to let K samples continue one generated prefix; the
budgets then bound what the continuation adds. An episode handed a `Brancher`
offers it its kernel and steps after each cell until it takes them (the
samples that share its prefix fork that kernel).

Two paths (`Generation.token_path`). On a backend that takes token ids
(`Backend.accepts_token_ids`: llama.cpp, transformers, vLLM in process) the
episode carries the exact id sequence: the prompt tokenised once, then each
call's sampled ids and each output block's ids, tokenised once when it is
appended; every call is fed that sequence, so the model never reads a
re-tokenisation of its own text, and the record holds it (`prompt_ids`,
`token_ids`, `observation_ids`). Other backends take the text path, as
before. A backend whose stream carries ids keeps whole tokens at a stop
string (`Done.tail`, see `tora.record.schema` for how the text is cut). A
teacher's continuation (`Prefix`) takes the text path: its prefix was written
by another model. A sample that continues a shared prefix with its ids (the
same run's model wrote it) goes on from that exact sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import platform
import time
import traceback
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from tora import __version__, fences
from tora.backends.base import Backend, Delta, Done, GenerationRequest, StreamEvent, checked_stream
from tora.errors import PromptError, error_kind
from tora.events import (
    CodeBlockClosed,
    Event,
    EventBase,
    ExecutionFinished,
    FinalAnswer,
    Finished,
    TextDelta,
    TurnStarted,
)
from tora.grading.extract import extract_answer
from tora.prefix_kernels import recorded_cells, rerun
from tora.prompts import PromptTemplate
from tora.record.schema import (
    CodeStep,
    ErrorInfo,
    ExecError,
    ExecutionStep,
    Finish,
    Generation,
    KernelState,
    ModelId,
    Problem,
    PromptRef,
    Result,
    RunOn,
    Runtime,
    Sampling,
    SharedPrefix,
    Stats,
    Step,
    Stop,
    TextStep,
    TokenizerId,
    Trajectory,
    token_sequence,
)
from tora.render import CellLike, get_renderer, observation


class KernelLike(Protocol):
    """A kernel as the loop sees it (sandbox.Kernel fits)."""

    async def execute(self, code: str, timeout: float | None = None) -> CellLike: ...

    @property
    def info(self) -> Mapping[str, Any]: ...


K = TypeVar("K", bound=KernelLike)


class KernelSource(Protocol[K]):
    """Hands out fresh kernels and takes them back (sandbox.KernelPool fits)."""

    async def acquire(self) -> K: ...

    async def release(self, kernel: K) -> None: ...


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Limits:
    max_tool_calls: int = 4
    max_tokens: int = 2048  # completion tokens for the whole trajectory
    max_tokens_per_call: int = 1024
    timeout_s: float = 10.0  # wall time per cell


@dataclass(frozen=True)
class RenderSettings:
    """How the model and the kernel meet: when code runs and how its result is shown.

    All of it is part of the training data, so all of it is recorded.
    """

    policy: str = "default"  # see tora.render
    run_on: RunOn = "close"  # run a python block at its closing fence, or only at ```output (ToRA)
    fresh_namespace: bool = False  # ToRA-compat: each block runs alone in a fresh kernel
    extra_stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class SolveConfig:
    sampling: SamplingParams = field(default_factory=SamplingParams)
    limits: Limits = field(default_factory=Limits)
    render: RenderSettings = field(default_factory=RenderSettings)

    def with_seed(self, seed: int | None) -> SolveConfig:
        return replace(self, sampling=replace(self.sampling, seed=seed))


# Model calls in one turn (a turn goes on past closed fences that run nothing).
MAX_CALLS_PER_TURN = 64


@dataclass(frozen=True)
class Prefix:
    """Where a continued trajectory starts: a parent's exact prompt and its first steps.

    `steps` end outside every fenced block (see `tora.correction`), so the
    model continues in prose; the prefix's code steps are re-run, in order, in
    the new trajectory's kernel before it does, and their new outputs are not
    shown (the context keeps the recorded ones).
    """

    parent: str  # the parent trajectory's id
    lines: int  # how many lines of the parent's completion the prefix keeps
    prompt: str
    steps: tuple[Step, ...]
    # Set where the prefix is one the samples of a problem share (`tora curate
    # --branch-after-cell`): the sample that generated it. The record then has
    # `shared_prefix`, not `parent` and `prefix_lines`.
    shared_from: int | None = None
    # The prompt's ids as the sample that generated a shared prefix read them (token path): with
    # the prefix steps' ids, where the continuation starts on the token path too.
    prompt_ids: tuple[int, ...] | None = None

    @property
    def token_ids(self) -> list[int] | None:
        """The exact id sequence of a shared prefix (prompt and steps), None where it has none."""
        if self.shared_from is None:
            return None  # another model's words: re-tokenised text is all a continuation has
        return token_sequence(self.prompt_ids, self.steps)

    @property
    def completion(self) -> str:
        return "".join(s.context_text() for s in self.steps)

    @property
    def cells(self) -> list[str]:
        return [s.content for s in self.steps if isinstance(s, CodeStep)]


class PrefixStates(Protocol):
    """Kernels already holding a prefix's state (tora.prefix_kernels.PrefixKernels fits)."""

    async def kernel(self, prefix: Prefix, kernels: Any) -> tuple[Any, KernelState] | None: ...


class Brancher(Protocol):
    """Offered an episode's kernel and steps after each of its cells, takes them (the shared prefix
    it returns) for the samples that continue from there (tora.branching fits: after the N-th
    cell); `ended` is called once the episode is over."""

    async def branch(self, episode: Episode, kernel: Any) -> SharedPrefix | None: ...

    async def ended(self, episode: Episode) -> None: ...


def extract_final(completion: str) -> tuple[str | None, str | None]:
    """The final answer (normalised) and the rule that found it."""
    found = extract_answer(completion)
    return found.answer, found.rule


E = TypeVar("E", bound=EventBase)


class Episode:
    """One problem, one sample: the state of a single trajectory."""

    def __init__(
        self,
        problem: Problem,
        *,
        backend: Backend,
        template: PromptTemplate,
        kernels: KernelSource[Any],
        config: SolveConfig | None = None,
        spec: str = "",
        sample_index: int = 0,
        origin: str = "greedy",
        run_id: str | None = None,
        kernel: KernelLike | None = None,
        prefetch_kernel: bool = False,
        prefix: Prefix | None = None,
        record_tokens: bool = True,
        prefix_states: PrefixStates | None = None,
        brancher: Brancher | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.problem = problem
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
        # Otherwise the kernel is taken at the first code block (a trajectory
        # waiting on the model holds none), or at the start when a cold start
        # is worth hiding behind generation (`tora solve`).
        self._prefetch = prefetch_kernel
        self._kernel_task: asyncio.Future[Any] | None = None
        self._render = get_renderer(self.config.render.policy)
        # A backend that cannot serve this problem (a replay without its
        # recording) fails this trajectory, not the batch it is part of.
        self._setup_error: Exception | None = None
        self.backend = backend
        self.prefix = prefix
        self.prefix_states = prefix_states
        self.brancher = brancher
        self.kernel_state: KernelState | None = None
        self.shared_prefix = (SharedPrefix(sample_index=prefix.shared_from, steps=len(prefix.steps))
                              if prefix is not None and prefix.shared_from is not None else None)
        if prefix is not None:
            self.prompt = prefix.prompt  # the parent's context, whatever template made it
        else:
            self.prompt = template.fill(problem.text) if template.kind == "completion" else ""
        try:
            self.backend = backend.for_episode(problem, sample_index)
            if template.kind == "chat" and prefix is None:
                self.prompt = self.backend.format_chat(template.messages(problem.text))
        except PromptError:
            raise  # a bad template is the user's, and the same for every problem
        except Exception as exc:
            self._setup_error = exc
        self.steps: list[Step] = list(prefix.steps) if prefix else []
        self.stats = _prefix_stats(self.steps)
        # The budgets bound what this episode generates, not what a prefix brought; a prefix the
        # samples of a problem share is part of each sample, and counts.
        shared = prefix is not None and prefix.shared_from is not None
        self._base_tokens = 0 if shared else self.stats.completion_tokens
        self._base_calls = 0 if shared else self.stats.tool_calls
        self._t0 = time.monotonic()
        self._seq = itertools.count()
        self._kernel_info: dict[str, Any] = {}
        self.trajectory: Trajectory | None = None
        # The token path: the exact sequence so far (prompt ids included), set in run().
        # `record_tokens=False` takes the text path, logprobs off, on any backend
        # (the control of benchmarks/bench_rollout.py).
        self.record_tokens = record_tokens
        self.tokens = (record_tokens and self.backend.accepts_token_ids
                       and (prefix is None or prefix.token_ids is not None) and self._setup_error is None)
        self.prompt_ids: list[int] | None = None
        self._ids: list[int] = []
        self._tokenizer_id: TokenizerId | None = None
        self._model_id: ModelId | None = None

    @property
    def stops(self) -> list[str]:
        render = self.config.render
        close = [fences.CLOSE_FENCE] if render.run_on == "close" else []
        return [fences.OUTPUT_FENCE, *close, *self.template.stop, *render.extra_stop]

    def _event(self, cls: type[E], **fields: Any) -> E:
        return cls(trajectory_id=self.id, seq=next(self._seq), **fields)

    def _remaining(self) -> int:
        return self.config.limits.max_tokens - (self.stats.completion_tokens - self._base_tokens)

    # -- the loop -------------------------------------------------------------

    async def run(self) -> AsyncGenerator[Event, None]:
        limits = self.config.limits
        completion = "".join(s.context_text() for s in self.steps)
        finish: Finish = "no_answer"
        error: ErrorInfo | None = None
        if self._prefetch and self._given_kernel is None and not self.config.render.fresh_namespace:
            self._kernel_task = asyncio.ensure_future(self.kernels.acquire())
        try:
            if self._setup_error is not None:
                raise self._setup_error
            await self._identify()
            if self.tokens and self.prefix is not None:  # a shared prefix: the ids its sample read
                self.prompt_ids = list(self.prefix.prompt_ids or ())
                self._ids = self.prefix.token_ids or []
            elif self.tokens:
                self.prompt_ids = self.backend.encode_prompt(self.prompt)
                self._ids = list(self.prompt_ids)
            await self._rebuild_state()
            turn = 0
            while True:
                if self._remaining() <= 0:
                    finish = "max_tokens"
                    break
                yield self._event(TurnStarted, turn=turn)
                step = TextStep(content="", t_start=self._elapsed())
                if self.tokens:  # a call that samples nothing still has its (empty) ids
                    step.token_ids, step.logprobs = [], []
                self.steps.append(step)
                # What the loop decides on: the step's text as the text path
                # has it (cut at each stop string; a closing fence kept).
                # `step.content` also holds the tails of whole tokens past a cut.
                view = ""
                done: Done | None = None
                out_of_tokens = False
                # One turn is one model call, or several when the model closes a
                # fence that runs nothing (a ```text block): it simply goes on.
                # Bounded, for a backend that reports no token usage.
                for _call in range(MAX_CALLS_PER_TURN):
                    budget = min(limits.max_tokens_per_call, self._remaining())
                    if budget <= 0:
                        out_of_tokens = True
                        break
                    done = None
                    async for event in self._generate(completion + step.content, budget):
                        if isinstance(event, Delta):
                            step.content += event.text
                            view += event.text
                            _add_tokens(step, event)
                            if event.text:
                                yield self._event(TextDelta, text=event.text)
                        else:
                            done = event
                    assert done is not None  # checked_stream guarantees it
                    step.prompt_tokens = done.prompt_tokens
                    step.completion_tokens += done.completion_tokens
                    self.stats.prompt_tokens += done.prompt_tokens
                    self.stats.completion_tokens += done.completion_tokens
                    step.stop = Stop(kind=done.stop, string=done.stop_string)
                    # The whole last token, when the backend gives tokens: the
                    # ids are what was sampled, so the text is too.
                    if done.tail:
                        step.content += done.tail
                        yield self._event(TextDelta, text=done.tail)
                    if done.stop_string != fences.CLOSE_FENCE:
                        break
                    # The closing fence is the model's text: keep it, as it saw it.
                    view += fences.CLOSE_FENCE
                    if not done.tail:
                        step.content += fences.CLOSE_FENCE
                        yield self._event(TextDelta, text=fences.CLOSE_FENCE)
                    if fences.code_to_run(view, False) is not None:
                        break
                assert done is not None
                step.t_end = self._elapsed()
                step.finish_reason = done.finish_reason
                completion += step.content
                if self.tokens:
                    self._ids += step.token_ids or []

                opened = done.stop_string == fences.OUTPUT_FENCE
                code = fences.code_to_run(view, opened)
                if code is None:
                    if out_of_tokens or done.finish_reason == "length":
                        finish = "max_tokens"  # cut off: not a final answer, whatever it says
                    elif fences.in_open_block(view):
                        finish = "no_answer"
                    else:
                        finish = "answered" if fences.final_boxed(view) is not None else "no_answer"
                    break
                if self.stats.tool_calls - self._base_calls >= limits.max_tool_calls:
                    finish = "max_tool_calls"
                    break
                self.stats.tool_calls += 1
                self.steps.append(CodeStep(content=code))
                yield self._event(CodeBlockClosed, code=code, index=self.stats.tool_calls)
                # The model's "```output" is in its text when its whole token was kept.
                exec_step = await self._execute(code, after=completion, opened=opened and bool(done.tail))
                if self.tokens:
                    exec_step.observation_ids = self.backend.tokenize(exec_step.observation)
                    self._ids += exec_step.observation_ids
                self.steps.append(exec_step)
                completion += exec_step.observation
                if self.brancher is not None and self.shared_prefix is None and self._kernel_task is not None:
                    self.shared_prefix = await self.brancher.branch(self, self._kernel_task.result())
                yield self._event(ExecutionFinished, step=exec_step, index=self.stats.tool_calls)
                turn += 1
        except (asyncio.CancelledError, KeyboardInterrupt, GeneratorExit):
            self._finalize("interrupted", None)
            raise
        except Exception as exc:
            finish, error = "error", _error_info(exc)
        finally:
            try:
                if self.brancher is not None:
                    await asyncio.shield(self.brancher.ended(self))
            finally:
                await self._release_kernel()
        trajectory = self._finalize(finish, error)
        if trajectory.result.final_answer is not None and finish == "answered":
            yield self._event(FinalAnswer, answer=trajectory.result.final_answer,
                              extracted_by=trajectory.result.extracted_by or "")
        yield self._event(Finished, trajectory=trajectory)

    async def _generate(self, completion: str, budget: int) -> AsyncGenerator[StreamEvent, None]:
        sampling = self.config.sampling
        step = self.steps[-1]
        ids = None
        if self.tokens and isinstance(step, TextStep):
            ids = (*self._ids, *(step.token_ids or ()))  # the ids sampled so far in this turn too
        request = GenerationRequest(
            prompt=self.prompt + completion,
            stop=self.stops,
            max_tokens=budget,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            prompt_ids=ids,
            logprobs=self.record_tokens,
        )
        # aclosing: a cancelled episode must stop the model *now*, not
        # whenever the garbage collector finalises the stream.
        async with contextlib.aclosing(checked_stream(self.backend, request)) as stream:
            async for event in stream:
                yield event

    async def _identify(self) -> None:
        """The tokenizer's and the model's identity, once per backend (hashing
        weights takes a while the first time: off the event loop)."""
        backend = self.backend
        kind = type(backend)
        if kind.tokenizer_identity is Backend.tokenizer_identity and kind.model_identity is Backend.model_identity:
            return  # a backend with no identity to compute (replay, text-only servers): no thread hop

        def both() -> tuple[TokenizerId | None, ModelId | None]:
            return backend.tokenizer_identity(), backend.model_identity()

        self._tokenizer_id, self._model_id = await asyncio.to_thread(both)

    async def _rebuild_state(self) -> None:
        """Give the kernel the state the prefix's context says it holds: a fork of a kernel that
        holds it where the run has one, else the prefix's cells re-run here."""
        if self.prefix is None or not self.prefix.cells or self.config.render.fresh_namespace:
            return
        states, prefix = self.prefix_states, self.prefix
        if states is not None and self._given_kernel is None:
            async def prefixed() -> Any:
                got = await states.kernel(prefix, self.kernels)
                if got is None:
                    return None
                kernel, self.kernel_state = got
                return kernel

            # As the episode's kernel task: a kernel made while the episode is cancelled is released.
            self._kernel_task = asyncio.ensure_future(prefixed())
            made = await self._kernel_task
            if made is None:
                self._kernel_task = None
        else:
            made = None
        if made is None:
            made, _ = await self._kernel()
            cells = recorded_cells(prefix.steps, self.config.limits.timeout_s)
            self.kernel_state = KernelState(method="replay", cells=len(cells), diverged=await rerun(made, cells))
        self._kernel_info = dict(made.info)

    async def _kernel(self) -> tuple[KernelLike, bool]:
        """The kernel for the next cell, and whether it is this cell's alone."""
        if self._given_kernel is not None:
            return self._given_kernel, False
        if self.config.render.fresh_namespace:
            return await self.kernels.acquire(), True
        if self._kernel_task is None:
            self._kernel_task = asyncio.ensure_future(self.kernels.acquire())
        return await self._kernel_task, False

    async def _execute(self, code: str, after: str, opened: bool = False) -> ExecutionStep:
        timeout = self.config.limits.timeout_s
        kernel, alone = await self._kernel()
        try:
            self._kernel_info = dict(kernel.info)
            cell = await kernel.execute(code, timeout=timeout)
        finally:
            if alone:
                await asyncio.shield(self.kernels.release(kernel))
        rendered = self._render(cell, timeout)
        if cell.status != "ok":
            self.stats.exec_errors += 1
        err = cell.error
        return ExecutionStep(
            status=cell.status,  # type: ignore[arg-type]
            stdout=cell.stdout,
            stderr=cell.stderr,
            display=list(cell.display),
            error=None if err is None else ExecError(ename=err.ename, evalue=err.evalue, traceback=list(err.traceback)),
            truncated=cell.truncated,
            duration_s=cell.duration_s,
            render_policy=self.config.render.policy,
            rendered=rendered,
            observation=observation(rendered, after, opened=opened),
        )

    async def _release_kernel(self) -> None:
        """Give the trajectory's kernel back; a cancellation of our own caller still propagates."""
        task, self._kernel_task = self._kernel_task, None
        if task is None:
            return
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
        if task.cancelled() or task.exception() is not None or task.result() is None:
            return
        await asyncio.shield(self.kernels.release(task.result()))

    # -- the record -----------------------------------------------------------

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._t0, 4)

    def _finalize(self, finish: Finish, error: ErrorInfo | None) -> Trajectory:
        cfg = self.config
        completion = "".join(s.context_text() for s in self.steps)
        answer, rule = extract_final(completion) if finish != "error" else (None, None)
        self.stats.wall_s = self._elapsed()
        trajectory = Trajectory(
            id=self.id,
            run_id=self.run_id,
            problem=self.problem,
            sample_index=self.sample_index,
            origin=self.origin,  # type: ignore[arg-type]
            parent=self.prefix.parent if self.prefix and self.shared_prefix is None else None,
            prefix_lines=self.prefix.lines if self.prefix and self.shared_prefix is None else None,
            shared_prefix=self.shared_prefix,
            kernel_state=self.kernel_state,
            generation=Generation(
                backend=self.backend.name,
                model=self.backend.model,
                spec=self.spec,
                prompt_template=PromptRef(name=self.template.name, sha256=self.template.sha256),
                sampling=Sampling(
                    temperature=cfg.sampling.temperature,
                    top_p=cfg.sampling.top_p,
                    max_tokens=cfg.limits.max_tokens,
                    max_tokens_per_call=cfg.limits.max_tokens_per_call,
                    seed=cfg.sampling.seed,
                    stop=self.stops,
                ),
                max_tool_calls=cfg.limits.max_tool_calls,
                run_on=cfg.render.run_on,
                token_path="tokens" if self.tokens else "text",
                tokenizer=self._tokenizer_id,
                model_id=self._model_id,
            ),
            runtime=Runtime(
                executor="ipykernel",
                python=platform.python_version(),
                kernel=self._kernel_info,
                render_policy=cfg.render.policy,
                fresh_namespace=cfg.render.fresh_namespace,
                tora_version=__version__,
            ),
            prompt=self.prompt,
            prompt_ids=self.prompt_ids,
            steps=list(self.steps),
            result=Result(final_answer=answer, extracted_by=rule, finish=finish, error=error),
            stats=self.stats.model_copy(),
        )
        trajectory.content_hash = trajectory.compute_content_hash()
        self.trajectory = trajectory
        return trajectory


def _add_tokens(step: TextStep, delta: Delta) -> None:
    """Record a Delta's sampled ids and logprobs in its text step. Logprobs are
    kept only while every id has one: a list that skips some would misalign."""
    if not delta.token_ids:
        return
    if step.token_ids is None:
        step.token_ids = []
        step.logprobs = [] if delta.logprobs is not None else None
    elif delta.logprobs is None:
        step.logprobs = None
    step.token_ids += delta.token_ids
    if step.logprobs is not None and delta.logprobs is not None:
        step.logprobs += delta.logprobs


def _prefix_stats(steps: list[Step]) -> Stats:
    """What a prefix's steps already count: its tool calls, failed cells and tokens."""
    cells = [s for s in steps if isinstance(s, ExecutionStep)]
    return Stats(
        tool_calls=sum(isinstance(s, CodeStep) for s in steps),
        exec_errors=sum(c.status != "ok" for c in cells),
        prompt_tokens=sum(s.prompt_tokens for s in steps if isinstance(s, TextStep)),
        completion_tokens=sum(s.completion_tokens for s in steps if isinstance(s, TextStep)),
    )


def _error_info(exc: Exception) -> ErrorInfo:
    kind = error_kind(exc)
    return ErrorInfo(
        kind=kind,  # type: ignore[arg-type]
        message=f"{type(exc).__name__}: {exc}" if kind == "internal" else str(exc),
        traceback="".join(traceback.format_exception(exc)) if kind == "internal" else None,
    )
