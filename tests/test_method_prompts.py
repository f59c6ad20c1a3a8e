"""The method prompts (chain of thought, program only, hybrid, hint first) load, are
recorded by name and sha256, and the loop handles each format against the real kernel:
a chain of thought never takes a kernel."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, write_released

from tora.backends.replay import ReplayBackend
from tora.engine import Episode, Limits, SolveConfig
from tora.events import Finished
from tora.kernels import FreshKernels, SandboxPolicy
from tora.prompts import load_prompt
from tora.record import ExecutionStep, Problem

METHODS = {
    "cot": "Each box holds 12, and 3 * 12 = 36.\nThe answer is $\\boxed{36}$.",
    "pot": "```python\nboxes = 3\nper_box = 12\nprint(boxes * per_box)\n```\n```output\n36\n```\n$\\boxed{36}$",
    "hybrid": "Counting by hand is easy to get wrong, so let's compute.\n```python\nprint(3 * 12)\n```\n"
              "```output\n36\n```\nThere are $\\boxed{36}$ eggs.",
    "hint": " Multiply the boxes by what each holds.\n\nSolution:\n```python\nprint(3 * 12)\n```\n```output\n36\n```\n"
            "So $\\boxed{36}$.",
}


class Counting(FreshKernels):
    def __init__(self, policy: SandboxPolicy) -> None:
        super().__init__(policy)
        self.acquired = 0

    async def acquire(self) -> Any:
        self.acquired += 1
        return await super().acquire()


def test_each_method_prompt_is_a_completion_template_with_its_own_examples() -> None:
    for name in METHODS:
        t = load_prompt(name)
        assert t.kind == "completion" and t.description and t.stop == ["\n---", "\nQuestion:"]
        assert t.sha256 == hashlib.sha256((ROOT / "prompts" / f"{name}.md").read_bytes()).hexdigest()
        assert t.fill("How many?").count("Question:") == 4  # three worked examples, then the question
    assert "```python" not in load_prompt("cot").body  # the chain of thought shows no code at all
    assert load_prompt("hint").fill("Q").endswith("Question: Q\n\nHint:\n")


@pytest.mark.parametrize("name", sorted(METHODS))
async def test_the_loop_runs_each_method_format(tmp_path: Path, name: str) -> None:
    path = write_released(tmp_path / "r.jsonl", [{"idx": "e", "question": "3 boxes of 12 eggs?", "code": [METHODS[name]]}])
    kernels = Counting(SandboxPolicy(timeout_s=10))
    episode = Episode(Problem(id="e", text="3 boxes of 12 eggs?", answer="36"), backend=ReplayBackend(path),
                      template=load_prompt(name), kernels=kernels, config=SolveConfig(limits=Limits(timeout_s=10)))
    events = [e async for e in episode.run()]
    assert isinstance(events[-1], Finished)
    t = events[-1].trajectory
    assert t.result.finish == "answered" and t.result.final_answer == "36"
    assert t.generation.prompt_template.name == name
    assert t.generation.prompt_template.sha256 == load_prompt(name).sha256
    assert t.context() == load_prompt(name).fill("3 boxes of 12 eggs?") + METHODS[name]
    cells = [s for s in t.steps if isinstance(s, ExecutionStep)]
    if name == "cot":
        assert cells == [] and kernels.acquired == 0 and t.stats.tool_calls == 0
    else:
        assert [c.stdout for c in cells] == ["36\n"] and kernels.acquired == 1
