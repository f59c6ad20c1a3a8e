"""One request's trajectories (one per choice): run, cut at the stop strings, answered or streamed.

A choice's text is the trajectory's whole interleaved solution, the model's
words with its ```python blocks and tora's ```output blocks, exactly as the
model saw it (`Trajectory.completion()`), cut at the first of the request's
stop strings wherever it occurs (the model is also told to stop there; an
output block can still hold one). Streaming sends the same text as it
happens: the model's words as it writes them, each output block when its cell
has run, so the concatenated deltas are the non-streamed text.

The request's connection is watched: when the client goes away its
trajectories are cancelled at once (the engine interrupts the cell and gives
the kernel back), whether it was waiting for a response or reading a stream.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from tora.backends.base import StopScanner, cut_at_stops
from tora.engine import SolveConfig
from tora.events import Event, ExecutionFinished, TextDelta
from tora.record import Problem, Trajectory
from tora.serve import protocol as p
from tora.serve.runner import Runner

Kind = Literal["chat", "text"]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


@dataclass(frozen=True)
class ChoiceSpec:
    problem: Problem
    config: SolveConfig
    sample_index: int


@dataclass(frozen=True)
class _Ended:
    """A choice's task is over: its recorded trajectory, or why there is none."""

    trajectory: Trajectory | None
    error: BaseException | None = None


class TrajectoryFailed(Exception):
    """A choice has no trajectory to show: it ended in `finish="error"`, could not be
    run, or was cancelled by the server's shutdown. The server's failure, not the client's."""

    def __init__(self, message: str, code: str, status: int = 500) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def _ended(task: asyncio.Task[Trajectory]) -> _Ended:
    if task.cancelled():
        return _Ended(None)
    exc = task.exception()
    return _Ended(None, exc) if exc is not None else _Ended(task.result())


def _failure(ended: _Ended) -> TrajectoryFailed | None:
    if ended.error is not None:
        return TrajectoryFailed(f"{type(ended.error).__name__}: {ended.error}", "internal_error")
    t = ended.trajectory
    if t is None:
        return TrajectoryFailed("the server is shutting down; the trajectory was interrupted", "shutting_down", 503)
    if t.result.finish == "error":
        err = t.result.error
        kind = err.kind if err else "internal"
        return TrajectoryFailed(err.message if err else "the trajectory failed", f"{kind}_error")
    return None


class _Cut:
    """The served text of one choice, cut at the request's stop strings."""

    def __init__(self, stops: list[str]) -> None:
        self._scanner = StopScanner(stops)

    def feed(self, text: str) -> str:
        return self._scanner.feed(text)

    def end(self) -> str:
        return self._scanner.flush()

    @property
    def stopped(self) -> bool:
        return self._scanner.matched is not None


def finish_reason(trajectory: Trajectory, stopped: bool) -> p.FinishReason:
    """"length" when the token budget ran out, unless a stop string came first."""
    if not stopped and trajectory.result.finish == "max_tokens":
        return "length"
    return "stop"


def usage(trajectories: list[Trajectory]) -> p.Usage:
    prompt = sum(t.stats.prompt_tokens for t in trajectories)
    completion = sum(t.stats.completion_tokens for t in trajectories)
    return p.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _record(trajectory: Trajectory) -> dict[str, Any]:
    return {"trajectory": trajectory.model_dump(mode="json")}


async def until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Choices:
    """The trajectories of one admitted request, started at once."""

    def __init__(self, runner: Runner, specs: list[ChoiceSpec], stops: list[str], receive: Receive, *,
                 kind: Kind, model: str, stream: bool) -> None:
        self.kind = kind
        self.model = model
        self.stops = stops
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._queue: asyncio.Queue[tuple[int, TextDelta | ExecutionFinished | _Ended]] = asyncio.Queue()
        self._stream = stream
        self.tasks: list[asyncio.Task[Trajectory]] = []
        for i, spec in enumerate(specs):
            task = runner.spawn(runner.solve(spec.problem, spec.config, spec.sample_index,
                                             self._on_event(i) if stream else None))
            # A callback, not code in the task: a task cancelled before it starts still ends.
            task.add_done_callback(self._on_end(i))
            self.tasks.append(task)
        self.disconnected = False
        self._watch = asyncio.create_task(until_disconnected(receive))
        self._watch.add_done_callback(self._gone)

    def _on_event(self, i: int) -> Callable[[Event], None]:
        def put(event: Event) -> None:
            if isinstance(event, TextDelta | ExecutionFinished):
                self._queue.put_nowait((i, event))

        return put

    def _on_end(self, i: int) -> Callable[[asyncio.Task[Trajectory]], None]:
        def put(task: asyncio.Task[Trajectory]) -> None:
            self._queue.put_nowait((i, _ended(task)))

        return put

    def _gone(self, watch: asyncio.Task[None]) -> None:
        if not watch.cancelled():
            self.disconnected = True
            self.cancel()

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()

    def _close(self) -> None:
        self._watch.remove_done_callback(self._gone)
        self._watch.cancel()
        self.cancel()  # no-op for those that finished

    # -- answered whole ---------------------------------------------------------

    async def response(self) -> BaseModel | None:
        """The whole response; None if the client went away first. Raises `TrajectoryFailed`."""
        ended: list[_Ended] = [_Ended(None)] * len(self.tasks)
        try:
            for _ in self.tasks:
                i, item = await self._queue.get()
                assert isinstance(item, _Ended)  # no events are queued when not streaming
                ended[i] = item
                if self.disconnected:
                    return None
                failure = _failure(item)
                if failure is not None:
                    raise failure
        finally:
            self._close()
        trajectories = [e.trajectory for e in ended if e.trajectory is not None]
        texts: list[tuple[str, p.FinishReason]] = []
        for t in trajectories:
            text, stopped = cut_at_stops(t.completion(), self.stops)
            texts.append((text, finish_reason(t, stopped)))
        if self.kind == "chat":
            return p.ChatCompletion(
                id=self.id, created=self.created, model=self.model, usage=usage(trajectories),
                choices=[p.ChatChoice(index=i, message=p.AssistantMessage(content=text), finish_reason=reason,
                                      tora=_record(t))
                         for i, ((text, reason), t) in enumerate(zip(texts, trajectories, strict=True))])
        return p.Completion(
            id=self.id, created=self.created, model=self.model, usage=usage(trajectories),
            choices=[p.CompletionChoice(index=i, text=text, finish_reason=reason, tora=_record(t))
                     for i, ((text, reason), t) in enumerate(zip(texts, trajectories, strict=True))])

    # -- streamed ---------------------------------------------------------------

    def _chunk(self, i: int, text: str | None, *, role: bool = False, reason: p.FinishReason | None = None,
               tora: dict[str, Any] | None = None) -> str:
        chunk: BaseModel
        if self.kind == "chat":
            delta = p.Delta(role="assistant" if role else None, content=text)
            chunk = p.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[
                p.ChatChunkChoice(index=i, delta=delta, finish_reason=reason, tora=tora)])
        else:
            chunk = p.CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[
                p.CompletionChunkChoice(index=i, text=text or "", finish_reason=reason, tora=tora)])
        return sse(chunk)

    def _usage_chunk(self, trajectories: list[Trajectory]) -> str:
        chunk: BaseModel
        if self.kind == "chat":
            chunk = p.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                          usage=usage(trajectories))
        else:
            chunk = p.CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                      usage=usage(trajectories))
        return sse(chunk)

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: OpenAI's chunks, then `data: [DONE]`."""
        cuts = [_Cut(self.stops) for _ in self.tasks]
        done: list[Trajectory] = []
        try:
            if self.kind == "chat":
                for i in range(len(self.tasks)):
                    yield self._chunk(i, "", role=True)
            while len(done) < len(self.tasks):
                i, item = await self._queue.get()
                if isinstance(item, TextDelta):
                    if piece := cuts[i].feed(item.text):
                        yield self._chunk(i, piece)
                elif isinstance(item, ExecutionFinished):
                    piece = cuts[i].feed(item.step.observation)
                    if piece or not cuts[i].stopped:
                        yield self._chunk(i, piece, tora={"execution": {"index": item.index,
                                                                        "status": item.step.status}})
                else:
                    if self.disconnected:
                        return
                    failure = _failure(item)
                    if failure is not None:
                        yield sse(error_body(str(failure), "server_error", code=failure.code))
                        return
                    assert item.trajectory is not None
                    done.append(item.trajectory)
                    if rest := cuts[i].end():
                        yield self._chunk(i, rest)
                    yield self._chunk(i, None if self.kind == "chat" else "",
                                      reason=finish_reason(item.trajectory, cuts[i].stopped), tora=_record(item.trajectory))
            if include_usage:
                yield self._usage_chunk(done)
            yield "data: [DONE]\n\n"
        finally:
            self._close()


def sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> p.ErrorBody:
    return p.ErrorBody(error=p.ErrorDetail(message=message, type=type_, param=param, code=code))
