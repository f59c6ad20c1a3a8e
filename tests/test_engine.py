"""The loop against the real kernel, driven by the replay backend (scripted
completions in ToRA's released format), plus small misbehaving backends
that check the loop holds every backend to its stream contract."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HEAD5, write_released

from tora import fences
from tora.backends.base import Backend, Delta, Done, GenerationRequest, StreamEvent
from tora.backends.replay import ReplayBackend, model_calls
from tora.engine import Episode, Limits, RenderSettings, SolveConfig
from tora.events import CodeBlockClosed, ExecutionFinished, Finished, TextDelta
from tora.kernels import FreshKernels, SandboxPolicy
from tora.prompts import load_prompt
from tora.record import Problem, Trajectory
from tora.record.schema import ExecutionStep, TextStep

RELEASED_HEAD5 = HEAD5

TWO_BLOCKS = (
    "Set x.\n```python\nx = 21\nprint(x)\n```\n```output\n21\n```\n"
    "Double it.\n```python\nprint(x * 2)\n```\n```output\n42\n```\n"
    "The answer is $\\boxed{42}$."
)


def config(timeout_s: float = 5.0, *, run_on: str = "close", max_tool_calls: int = 4, max_tokens: int = 2048,
           max_tokens_per_call: int = 1024, render_policy: str = "default", fresh_namespace: bool = False) -> SolveConfig:
    return SolveConfig(
        limits=Limits(max_tool_calls=max_tool_calls, max_tokens=max_tokens,
                      max_tokens_per_call=max_tokens_per_call, timeout_s=timeout_s),
        render=RenderSettings(policy=render_policy, run_on=run_on, fresh_namespace=fresh_namespace),  # type: ignore[arg-type]
    )


class CountingKernels(FreshKernels):
    """Fresh kernels that remember how many are out."""

    def __init__(self, policy: SandboxPolicy) -> None:
        super().__init__(policy)
        self.acquired = 0
        self.released = 0

    async def acquire(self) -> Any:
        kernel = await super().acquire()
        self.acquired += 1
        return kernel

    async def release(self, kernel: Any) -> None:
        self.released += 1
        await super().release(kernel)


async def run(episode: Episode) -> tuple[Trajectory, list[object]]:
    events = [e async for e in episode.run()]
    final = events[-1]
    assert isinstance(final, Finished)
    return final.trajectory, events


async def solve(tmp_path: Path, completion: str, **cfg: Any) -> tuple[Trajectory, list[object]]:
    path = write_released(tmp_path / "r.jsonl", [{"idx": "p1", "question": "Q?", "code": [completion]}])
    cfg.setdefault("timeout_s", 5.0)
    episode = Episode(Problem(id="p1", text="Q?"), backend=ReplayBackend(path), template=load_prompt("tora-gsm8k"),
                      kernels=FreshKernels(SandboxPolicy(timeout_s=cfg["timeout_s"])), config=config(**cfg))
    return await run(episode)


def executions(t: Trajectory) -> list[ExecutionStep]:
    return [s for s in t.steps if isinstance(s, ExecutionStep)]


async def test_state_survives_between_blocks_and_context_round_trips(tmp_path: Path) -> None:
    t, events = await solve(tmp_path, TWO_BLOCKS)
    assert [e.stdout for e in executions(t)] == ["21\n", "42\n"]
    assert t.result.finish == "answered" and t.result.final_answer == "42"
    assert t.context() == t.prompt + TWO_BLOCKS  # outputs reproduced byte for byte
    assert sum(isinstance(e, CodeBlockClosed) for e in events) == 2
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).startswith("Set x.")
    assert t.stats.tool_calls == 2 and t.runtime.kernel
    assert t.generation.run_on == "close" and fences.CLOSE_FENCE in t.generation.sampling.stop


async def test_events_carry_the_trajectory_id_and_a_sequence(tmp_path: Path) -> None:
    t, events = await solve(tmp_path, TWO_BLOCKS)
    assert {e.trajectory_id for e in events} == {t.id}  # type: ignore[attr-defined]
    assert [e.seq for e in events] == list(range(len(events)))  # type: ignore[attr-defined]


# -- when code runs ------------------------------------------------------------------

# A weak model's habit: it closes one python block after another and never
# writes ```output itself.
NEVER_ASKS = "First.\n```python\nprint(6 * 7)\n```\nThen.\n```python\nprint(1 + 1)\n```\nSo $\\boxed{42}$."


async def test_a_closed_python_block_runs_at_once_by_default(tmp_path: Path) -> None:
    t, _ = await solve(tmp_path, NEVER_ASKS)
    assert [e.stdout for e in executions(t)] == ["42\n", "2\n"]
    # The context stays ToRA's: the block, then its output block.
    assert "```python\nprint(6 * 7)\n```\n```output\n42\n```\nThen." in t.completion()
    assert t.result.finish == "answered" and t.result.final_answer == "42"


async def test_run_on_output_keeps_toras_protocol(tmp_path: Path) -> None:
    t, _ = await solve(tmp_path, NEVER_ASKS, run_on="output")
    assert executions(t) == []  # the model never asked for output, so nothing ran
    assert t.generation.run_on == "output" and fences.CLOSE_FENCE not in t.generation.sampling.stop
    assert t.completion() == NEVER_ASKS


async def test_other_closed_fences_let_the_model_go_on(tmp_path: Path) -> None:
    completion = ("A table:\n```text\na b\n```\nNow code.\n```python\nprint('ran')\n```\n```output\nran\n```\n"
                  "$\\boxed{1}$")
    t, _ = await solve(tmp_path, completion)
    assert [e.stdout for e in executions(t)] == ["ran\n"]
    first = next(s for s in t.steps if isinstance(s, TextStep))
    assert first.content == "A table:\n```text\na b\n```\nNow code.\n```python\nprint('ran')\n```\n"
    assert t.context() == t.prompt + completion


async def test_the_model_sees_the_stop_list_it_was_given(tmp_path: Path) -> None:
    """Replay honours stop strings: with the output fence left out of the stop
    list, the recorded model would talk past its code and nothing would run."""
    completion = "```python\nprint(5)\n```\n```output\n5\n```\n$\\boxed{5}$"
    t, _ = await solve(tmp_path, completion, run_on="output")
    assert [e.stdout for e in executions(t)] == ["5\n"]
    path = write_released(tmp_path / "r2.jsonl", [{"idx": "p1", "question": "Q?", "code": [completion]}])

    class WithoutOutputFence(Episode):
        @property
        def stops(self) -> list[str]:
            return ["<nothing>"]

    episode = WithoutOutputFence(Problem(id="p1", text="Q?"), backend=ReplayBackend(path),
                                 template=load_prompt("tora-gsm8k"), kernels=FreshKernels(SandboxPolicy(timeout_s=5)),
                                 config=config(run_on="output"))
    broken, _ = await run(episode)
    assert executions(broken) == []


async def test_the_token_budget_cuts_generation(tmp_path: Path) -> None:
    long = "word " * 200 + "\\boxed{3}"
    t, _ = await solve(tmp_path, long, max_tokens=50)
    assert t.result.finish == "max_tokens" and t.stats.completion_tokens == 50
    assert "\\boxed" not in t.completion()


async def test_the_per_call_budget_cuts_one_call(tmp_path: Path) -> None:
    t, _ = await solve(tmp_path, "word " * 100 + "\\boxed{3}", max_tokens_per_call=10)
    text = next(s for s in t.steps if isinstance(s, TextStep))
    assert text.finish_reason == "length" and text.completion_tokens == 10 and t.result.finish == "max_tokens"


# -- budgets, errors, timeouts -----------------------------------------------------


async def test_fresh_namespace_runs_each_block_alone(tmp_path: Path) -> None:
    t, _ = await solve(tmp_path, TWO_BLOCKS, fresh_namespace=True)
    second = executions(t)[1]
    assert second.status == "error" and second.error is not None and second.error.ename == "NameError"
    assert t.runtime.fresh_namespace and t.stats.exec_errors == 1


async def test_tool_call_budget(tmp_path: Path) -> None:
    t, _ = await solve(tmp_path, TWO_BLOCKS, max_tool_calls=1)
    assert t.result.finish == "max_tool_calls" and len(executions(t)) == 1


async def test_error_and_timeout_are_shown_and_the_trajectory_goes_on(tmp_path: Path) -> None:
    completion = (
        "```python\nprint(undefined_name)\n```\n```output\nx\n```\n"
        "```python\nwhile True:\n    pass\n```\n```output\nx\n```\n"
        "```python\nprint('alive')\n```\n```output\nalive\n```\nSo $\\boxed{1}$"
    )
    t, _ = await solve(tmp_path, completion, timeout_s=1.5)
    first, second, third = executions(t)
    assert first.status == "error" and "NameError" in first.rendered
    assert second.status == "timeout" and second.rendered.startswith("TimeoutError")
    assert third.status == "ok" and third.stdout == "alive\n"
    assert t.result.finish == "answered"


async def test_cut_off_inside_a_block_is_not_an_answer(tmp_path: Path) -> None:
    t, _ = await solve(tmp_path, "Let me compute \\boxed{3}\n```python\nprint(3)")
    assert t.result.finish == "no_answer" and not executions(t)


SLEEPER = "```python\nimport time\ntime.sleep(60)\n```\n```output\n\n```\n"


async def _sleeping_episode(tmp_path: Path, kernels: FreshKernels) -> Episode:
    path = write_released(tmp_path / "r.jsonl", [{"idx": "p1", "question": "Q?", "code": [SLEEPER]}])
    return Episode(Problem(id="p1", text="Q?"), backend=ReplayBackend(path), template=load_prompt("tora-gsm8k"),
                   kernels=kernels, config=config(timeout_s=60))


async def test_cancelling_interrupts_the_cell_and_marks_the_trajectory(tmp_path: Path) -> None:
    kernels = CountingKernels(SandboxPolicy(timeout_s=60))
    episode = await _sleeping_episode(tmp_path, kernels)
    started = asyncio.Event()

    async def consume() -> None:
        async for event in episode.run():
            if isinstance(event, CodeBlockClosed):
                started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 15)
    assert episode.trajectory is not None and episode.trajectory.result.finish == "interrupted"
    assert kernels.acquired == kernels.released  # a kernel still starting is abandoned, not leaked


async def test_a_timeout_around_an_episode_stops_it_promptly_and_frees_its_kernel(tmp_path: Path) -> None:
    kernels = CountingKernels(SandboxPolicy(timeout_s=60))
    episode = await _sleeping_episode(tmp_path, kernels)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(5):
            async for _ in episode.run():
                pass
    assert loop.time() - t0 < 10  # the 60 s cell did not hold it
    assert kernels.acquired == kernels.released == 1
    assert episode.trajectory is not None and episode.trajectory.result.finish == "interrupted"


async def test_the_kernel_is_taken_at_the_first_code_block(tmp_path: Path) -> None:
    kernels = CountingKernels(SandboxPolicy(timeout_s=5))
    path = write_released(tmp_path / "r.jsonl", [{"idx": "p1", "question": "Q?", "code": ["No code: $\\boxed{2}$"]}])
    episode = Episode(Problem(id="p1", text="Q?"), backend=ReplayBackend(path), template=load_prompt("tora-gsm8k"),
                      kernels=kernels, config=config())
    t, _ = await run(episode)
    assert t.result.finish == "answered" and kernels.acquired == 0


# -- backends that break their contract ----------------------------------------------


class Scripted(Backend):
    """A backend that streams whatever a test scripts, contract or not."""

    name = "scripted"
    model = "scripted"

    def __init__(self, *calls: list[StreamEvent | Exception]) -> None:
        self.calls = list(calls)
        self.requests: list[GenerationRequest] = []

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return ""

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        self.requests.append(request)
        for item in self.calls.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


async def scripted(backend: Scripted) -> Trajectory:
    episode = Episode(Problem(id="p", text="Q?"), backend=backend, template=load_prompt("tora-gsm8k"),
                      kernels=FreshKernels(SandboxPolicy(timeout_s=5)), config=config())
    t, _ = await run(episode)
    return t


CODE = "```python\nprint(2)"


async def test_a_stream_that_ends_without_done_is_a_backend_error() -> None:
    t = await scripted(Scripted([Delta("hello")]))
    assert t.result.finish == "error" and t.result.error is not None
    assert t.result.error.kind == "backend" and "scripted" in t.result.error.message
    assert "without" in t.result.error.message


async def test_no_stale_done_is_reused_on_the_next_turn() -> None:
    # First call asks for output properly; the second breaks off without a Done.
    backend = Scripted([Delta(CODE + "\n"), Done("stop", fences.OUTPUT_FENCE, 5, 7)], [Delta("The answer")])
    t = await scripted(backend)
    assert t.result.finish == "error" and t.result.error is not None and t.result.error.kind == "backend"
    assert t.stats.completion_tokens == 7  # the first call's tokens counted once
    assert len(executions(t)) == 1


async def test_a_stream_that_breaks_is_a_backend_error_naming_the_cause() -> None:
    t = await scripted(Scripted([Delta("hi"), ConnectionResetError("peer went away")]))
    assert t.result.error is not None and t.result.error.kind == "backend"
    assert "ConnectionResetError" in t.result.error.message and "peer went away" in t.result.error.message


async def test_events_after_done_are_a_backend_error() -> None:
    t = await scripted(Scripted([Done("eos"), Delta("more")]))
    assert t.result.error is not None and t.result.error.kind == "backend" and "after" in t.result.error.message


async def test_an_internal_failure_is_typed_with_its_traceback() -> None:
    class Broken(Scripted):
        def format_chat(self, messages: list[dict[str, str]]) -> str:
            return ""

        async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
            yield Delta(CODE + "\n")
            yield Done("stop", fences.OUTPUT_FENCE)

    episode = Episode(Problem(id="p", text="Q?"), backend=Broken(), template=load_prompt("tora-gsm8k"),
                      kernels=FreshKernels(SandboxPolicy(timeout_s=5)), config=config())

    def explode(cell: Any, timeout: float | None) -> str:
        raise ZeroDivisionError("renderer bug")

    episode._render = explode  # type: ignore[assignment]
    t, _ = await run(episode)
    assert t.result.error is not None and t.result.error.kind == "internal"
    assert t.result.error.traceback and "ZeroDivisionError" in t.result.error.traceback


async def test_an_old_record_with_a_string_error_is_still_read() -> None:
    t = await scripted(Scripted([Done("eos")]))
    raw = json.loads(t.model_dump_json())
    raw["schema_version"], raw["result"]["error"] = "1.0", "BackendError: gone"
    old = Trajectory.model_validate(raw)
    assert old.result.error is not None and old.result.error.kind == "internal" and old.result.error.message == "BackendError: gone"


# -- replaying recorded data ----------------------------------------------------------


@pytest.mark.parametrize("run_on", ["close", "output"])
async def test_replaying_released_trajectories_reproduces_their_outputs(run_on: str) -> None:
    backend = ReplayBackend(RELEASED_HEAD5)
    kernels = FreshKernels(SandboxPolicy(timeout_s=10))
    for line in RELEASED_HEAD5.read_text().splitlines():
        row = json.loads(line)
        calls = model_calls(row["code"][0])
        episode = Episode(Problem(id=str(row["idx"]), text=row["question"]), backend=backend,
                          template=load_prompt("tora-gsm8k"), kernels=kernels,
                          config=config(10, render_policy="tora-compat", run_on=run_on))
        t, events = await run(episode)
        assert t.completion() == row["code"][0], row["idx"]
        assert len(executions(t)) == calls - 1
        assert sum(isinstance(e, ExecutionFinished) for e in events) == calls - 1
        assert t.result.final_answer == row["pred"][0]
