"""The loop against the real kernel, driven by the replay backend (scripted
completions in ToRA's released format)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import HEAD5, write_released

from tora.backends.replay import ReplayBackend, split_completion
from tora.engine import Episode, SolveConfig
from tora.events import CodeBlockClosed, Finished, TextDelta
from tora.kernels import FreshKernels, SandboxPolicy
from tora.prompts import load_prompt
from tora.record import Problem, Trajectory
from tora.record.schema import ExecutionStep

TWO_BLOCKS = (
    "Set x.\n```python\nx = 21\nprint(x)\n```\n```output\n21\n```\n"
    "Double it.\n```python\nprint(x * 2)\n```\n```output\n42\n```\n"
    "The answer is $\\boxed{42}$."
)


async def solve(tmp_path: Path, completion: str, **cfg: object) -> tuple[Trajectory, list[object]]:
    path = write_released(tmp_path / "r.jsonl", [{"idx": "p1", "question": "Q?", "code": [completion]}])
    timeout = float(cfg.pop("timeout_s", 5.0))  # type: ignore[arg-type]
    episode = Episode(
        Problem(id="p1", text="Q?"),
        backend=ReplayBackend(path),
        template=load_prompt("tora-gsm8k"),
        kernels=FreshKernels(SandboxPolicy(timeout_s=timeout)),
        config=SolveConfig(timeout_s=timeout, **cfg),  # type: ignore[arg-type]
    )
    events = [e async for e in episode.run()]
    final = events[-1]
    assert isinstance(final, Finished)
    return final.trajectory, events


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


async def test_cancelling_interrupts_the_cell_and_marks_the_trajectory(tmp_path: Path) -> None:
    path = write_released(tmp_path / "r.jsonl", [
        {"idx": "p1", "question": "Q?", "code": ["```python\nimport time\ntime.sleep(60)\n```\n```output\n\n```\n"]}])
    episode = Episode(Problem(id="p1", text="Q?"), backend=ReplayBackend(path), template=load_prompt("tora-gsm8k"),
                      kernels=FreshKernels(SandboxPolicy(timeout_s=60)), config=SolveConfig(timeout_s=60))

    async def consume() -> None:
        async for event in episode.run():
            if isinstance(event, CodeBlockClosed):
                started.set()

    started = asyncio.Event()
    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 15)
    assert episode.trajectory is not None and episode.trajectory.result.finish == "interrupted"


async def test_replaying_released_trajectories_reproduces_their_outputs(tmp_path: Path) -> None:
    head = HEAD5
    backend = ReplayBackend(head)
    kernels = FreshKernels(SandboxPolicy(timeout_s=10))
    for line in head.read_text().splitlines():
        row = json.loads(line)
        recorded = [s for s in split_completion(row["code"][0])]
        episode = Episode(Problem(id=str(row["idx"]), text=row["question"]), backend=backend,
                          template=load_prompt("tora-gsm8k"), kernels=kernels,
                          config=SolveConfig(render_policy="tora-compat"))
        t = [e async for e in episode.run()][-1].trajectory  # type: ignore[attr-defined]
        assert t.completion() == row["code"][0], row["idx"]
        assert len(executions(t)) == len(recorded) - 1
        assert t.result.final_answer == row["pred"][0]
