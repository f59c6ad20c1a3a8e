"""Output-space shaping: where a wrong trajectory may be cut for a teacher to continue it.

A prefix is the parent's first N lines of completion (text and observations
as the model saw them). It may end only at a line boundary in prose: never
inside a fenced block (code or output), and never between a python block
and the output block that answered it, so the teacher starts writing where
a model could have, and the kernel state the prefix implies is exactly the
state of re-running its cells.
"""

from __future__ import annotations

import random

from tora import fences
from tora.engine import Prefix
from tora.record.schema import CodeStep, ExecutionStep, Step, TextStep, Trajectory


def cut_points(trajectory: Trajectory) -> list[int]:
    """Every N (1 <= N < lines of the completion) at which the completion may be cut."""
    completion = trajectory.completion()
    inside = [(b.start, b.end) for b in fences.blocks(completion)]
    observations = set()
    at = 0
    for step in trajectory.steps:
        if isinstance(step, ExecutionStep):
            observations.add(at)
        at += len(step.context_text())
    points: list[int] = []
    offset = 0
    lines = completion.split("\n")[:-1]  # each element is one line that ends in "\n"
    for n, line in enumerate(lines, 1):
        offset += len(line) + 1
        if offset >= len(completion):
            break  # the whole completion: nothing left to correct
        if offset in observations or any(start < offset < end for start, end in inside):
            continue
        points.append(n)
    return points


def choose_prefixes(trajectory: Trajectory, count: int | None, seed: int) -> list[int]:
    """All cut points, or `count` of them drawn with a seed of their own per trajectory.

    Seeding per trajectory (not one stream over the run) keeps the choice the
    same whatever order trajectories come in and on every resume.
    """
    points = cut_points(trajectory)
    if count is None or count >= len(points):
        return points
    return sorted(random.Random(f"{seed}:{trajectory.id}").sample(points, count))


def prefix_of(trajectory: Trajectory, lines: int) -> Prefix:
    """The parent's prompt and steps up to its first `lines` lines, copied as recorded.

    A text step cut part-way keeps its recorded timing; its token count is not
    known for the part kept, so it counts 0 (the stats of a continuation then
    cover whole steps only).
    """
    if lines not in cut_points(trajectory):
        raise ValueError(f"trajectory {trajectory.id}: line {lines} is not a place to cut it")
    offset = sum(len(line) + 1 for line in trajectory.completion().split("\n")[:lines])
    steps: list[Step] = []
    at = 0
    for step in trajectory.steps:
        text = step.context_text()
        if isinstance(step, CodeStep) or at + len(text) <= offset:
            steps.append(step.model_copy(deep=True))
        elif isinstance(step, TextStep) and at < offset:
            steps.append(step.model_copy(update={"content": step.content[: offset - at], "completion_tokens": 0,
                                                 "finish_reason": None}, deep=True))
        if at + len(text) >= offset:
            break
        at += len(text)
    return Prefix(parent=trajectory.id, lines=lines, prompt=trajectory.prompt, steps=tuple(steps))
