"""Replay: plays back the model's side of recorded trajectories.

The recorded outputs are *not* replayed: where the recorded model asked for
output, tora's own kernel produces it again. So a replay re-checks recorded
data through tora's loop, and it is the deterministic model for tests.

It behaves like a model, not like a script: a recording is one text (the
model's words with its ```output blocks in place, as the model saw them),
streamed in word-sized "tokens" through the request's stop strings and
`max_tokens`. A loop that stops elsewhere than the recording did (another
stop list, a smaller budget) is therefore replayed faithfully, and a broken
stop list shows: without ```output among the stops, the "model" talks on
through the recorded output as a real one would. Each trajectory's place in
its recording is kept by the per-episode view (`for_episode`).

Reads tora's own records and ToRA's released format (`idx`, `question`,
`code`: a list of completions). Problems are matched by id, else by the
question text (whitespace-normalised).
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from pathlib import Path

from tora import fences
from tora.backends import transcript
from tora.backends.base import Backend, Delta, Done, GenerationRequest, StopScanner, StreamEvent
from tora.errors import BackendError, ModelSpecError
from tora.jsonl import file_format
from tora.record.schema import Problem
from tora.record.writer import read_trajectories
from tora.released import read_released

_TOKEN = re.compile(r"\S+\s*|\s+")


def _norm(text: str) -> str:
    return " ".join(text.split())


def replay_source(path: Path) -> list[tuple[str, str, list[str]]]:
    """(id, question, recorded completion per sample) for each problem of a recorded file."""
    problems: dict[str, tuple[str, str, dict[int, str]]] = {}
    if file_format(path).format == "trajectories":
        for t in read_trajectories(path):
            entry = problems.setdefault(t.problem.id, (t.problem.id, t.problem.text, {}))
            entry[2][t.sample_index] = t.completion()
    else:
        for item in read_released(path):
            key = str(item.idx)
            entry = problems.setdefault(key, (key, item.question, {}))
            for k, completion in enumerate(item.code):
                entry[2][k] = completion
    return [(pid, q, [s[k] for k in sorted(s)]) for pid, q, s in problems.values()]


def model_calls(completion: str) -> int:
    """How many times the recorded model was called: once, plus once after each output block."""
    return 1 + sum(b.lang == "output" for b in fences.blocks(completion))


class ReplayBackend(Backend):
    name = "replay"

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelSpecError(f"replay file not found: {path}")
        self.model = f"replay:{path.name}"
        self.path = path
        self._by_id: dict[str, list[str]] = {}
        self._by_question: dict[str, list[str]] = {}
        for pid, question, samples in replay_source(path):
            self._by_id[pid] = samples
            self._by_question.setdefault(_norm(question), samples)

    def recording(self, problem: Problem, sample_index: int) -> str:
        samples = self._by_id.get(problem.id) or self._by_question.get(_norm(problem.text))
        if samples is None:
            # Data set ids often carry a prefix ("gsm8k-12") the recording lacks.
            samples = self._by_id.get(problem.id.rsplit("-", 1)[-1])
        if samples is None:
            raise BackendError(f"{self.path}: no recorded trajectory for problem {problem.id!r}")
        if sample_index >= len(samples):
            raise BackendError(f"{self.path}: problem {problem.id!r} has {len(samples)} recorded samples, "
                               f"not {sample_index + 1}")
        return samples[sample_index]

    def for_episode(self, problem: Problem, sample_index: int) -> Backend:
        return ReplayEpisode(self, self.recording(problem, sample_index))

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return transcript.render(messages)

    def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        raise BackendError("replay plays one recorded trajectory at a time: use backend.for_episode(problem, k)")


class ReplayEpisode(Backend):
    """One trajectory's recording, played from where the trajectory stands."""

    name = "replay"

    def __init__(self, parent: ReplayBackend, recording: str) -> None:
        self.model = parent.model
        self._parent = parent
        self._text = recording
        self._outputs = {b.start: b.end for b in fences.blocks(recording) if b.lang == "output"}
        self._pos = 0

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return self._parent.format_chat(messages)

    def _skip_recorded_output(self) -> None:
        """The loop ran the code and appended its own output: pass over the recorded one."""
        rest = self._text[self._pos :]
        at = self._pos + len(rest) - len(rest.lstrip())
        if at in self._outputs:
            self._pos = self._outputs[at]

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        if _ends_with_output(request.prompt):
            self._skip_recorded_output()
        scanner = StopScanner(request.stop)
        emitted = tokens = 0
        for piece in _TOKEN.findall(self._text[self._pos :]):
            if tokens >= request.max_tokens:
                self._pos += emitted
                yield Done("length", None, 0, tokens)
                return
            tokens += 1
            out = scanner.feed(piece)
            emitted += len(out)
            if out:
                yield Delta(out)
            if scanner.matched is not None:
                # A closing fence is the model's own text (the loop keeps it);
                # any other stop string is left where it stands, as a model's
                # next call would write it again.
                kept = len(scanner.matched) if scanner.matched == fences.CLOSE_FENCE else 0
                self._pos += emitted + kept
                yield Done("stop", scanner.matched, 0, tokens)
                return
        rest = scanner.flush()
        if rest:
            yield Delta(rest)
        self._pos = len(self._text)
        yield Done("eos", None, 0, tokens)


def _ends_with_output(prompt: str) -> bool:
    """True when the context ends with an ```output block: the loop executed since the last call."""
    at = prompt.rfind(fences.OUTPUT_FENCE)
    if at < 0:
        return False
    found = fences.blocks(prompt[at:])
    return bool(found) and found[0].lang == "output" and found[0].closed and not prompt[at + found[0].end :].strip()
