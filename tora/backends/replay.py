"""Replay: plays back the model's side of recorded trajectories.

The recorded outputs are *not* replayed: each model segment ends where a
```output block began, and tora's own kernel produces the output again. So a
replay re-checks recorded data through tora's loop, and it is the
deterministic model for tests.

Reads tora's own records and ToRA's released format (`idx`, `question`,
`code`: a list of completions). Problems are matched by id, else by the
question text (whitespace-normalised).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

from tora import fences
from tora.backends.base import Delta, Done, GenerationRequest, StreamEvent
from tora.errors import BackendError, ModelSpecError
from tora.jsonl import file_format
from tora.record.schema import ExecutionStep, TextStep, Trajectory
from tora.record.writer import read_trajectories
from tora.released import read_released


@dataclass(frozen=True)
class Segment:
    text: str
    ends_at_output: bool  # the model stopped because an ```output block followed
    completion_tokens: int = 0


def split_completion(completion: str) -> list[Segment]:
    """Cut a ToRA-style completion into model segments at its ```output blocks."""
    segments: list[Segment] = []
    pos = 0
    for block in fences.blocks(completion):
        if block.lang == "output":
            segments.append(Segment(completion[pos : block.start], True))
            pos = block.end
    segments.append(Segment(completion[pos:], False))
    return segments


def segments_of(trajectory: Trajectory) -> list[Segment]:
    out: list[Segment] = []
    steps = trajectory.steps
    for i, step in enumerate(steps):
        if isinstance(step, TextStep):
            followed = any(isinstance(s, ExecutionStep) for s in steps[i + 1 : i + 3])
            out.append(Segment(step.content, followed, step.completion_tokens))
    return out


def _norm(text: str) -> str:
    return " ".join(text.split())


def replay_source(path: Path) -> list[tuple[str, str, list[list[Segment]]]]:
    """(id, question, segments per sample) for each problem of a recorded file."""
    problems: dict[str, tuple[str, str, dict[int, list[Segment]]]] = {}
    if file_format(path).format == "trajectories":
        for t in read_trajectories(path):
            entry = problems.setdefault(t.problem.id, (t.problem.id, t.problem.text, {}))
            entry[2][t.sample_index] = segments_of(t)
    else:
        for item in read_released(path):
            key = str(item.idx)
            entry = problems.setdefault(key, (key, item.question, {}))
            for k, completion in enumerate(item.code):
                entry[2][k] = split_completion(completion)
    return [(pid, q, [s[k] for k in sorted(s)]) for pid, q, s in problems.values()]


class ReplayBackend:
    name = "replay"

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelSpecError(f"replay file not found: {path}")
        self.model = f"replay:{path.name}"
        self.path = path
        self._by_id: dict[str, list[list[Segment]]] = {}
        self._by_question: dict[str, list[list[Segment]]] = {}
        for pid, question, samples in replay_source(path):
            self._by_id[pid] = samples
            self._by_question.setdefault(_norm(question), samples)

    def problem_ids(self) -> list[str]:
        return list(self._by_id)

    def _lookup(self, request: GenerationRequest) -> list[Segment]:
        p = request.problem
        if p is None:
            raise BackendError("replay needs to know the problem being solved")
        samples = self._by_id.get(p.id) or self._by_question.get(_norm(p.text))
        if samples is None:
            # Data set ids often carry a prefix ("gsm8k-12") the recording lacks.
            samples = self._by_id.get(p.id.rsplit("-", 1)[-1])
        if samples is None:
            raise BackendError(f"{self.path}: no recorded trajectory for problem {p.id!r}")
        if request.sample_index >= len(samples):
            raise BackendError(f"{self.path}: problem {p.id!r} has {len(samples)} recorded samples, not {request.sample_index + 1}")
        return samples[request.sample_index]

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        segments = self._lookup(request)
        if request.turn >= len(segments):
            yield Done("eos")
            return
        seg = segments[request.turn]
        for line in seg.text.splitlines(keepends=True):
            yield Delta(line)
        if seg.ends_at_output:
            yield Done("stop", fences.OUTPUT_FENCE, 0, seg.completion_tokens)
        else:
            yield Done("eos", None, 0, seg.completion_tokens)

    async def aclose(self) -> None:
        return None
