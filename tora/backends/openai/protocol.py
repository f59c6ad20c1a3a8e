"""What every protocol shares: the object each protocol is, and the reading of one reply.

A protocol turns a `GenerationRequest` into the request of its endpoint and
reads the text out of each choice of the reply; `read` does the rest the same
way for all of them: the loop's stop strings (tora's `StopScanner` cuts the
text, whatever the server does), the stop the server reports, the finish
reason and the token counts.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tora.backends.base import Delta, Done, GenerationRequest, StopScanner, StreamEvent
from tora.backends.openai.connection import Connection
from tora.backends.openai.spec import ServerSpec
from tora.errors import BackendError

# Fields in which servers say which stop string ended a completion.
STOP_REPORTS = ("stop_reason", "matched_stop")


@dataclass
class ToolCall:
    id: str | None
    name: str = ""
    arguments: str = ""


@dataclass
class Reply:
    """What a reply said besides its text, gathered while it is read."""

    finish: str | None = None
    reported: object = None  # the stop string the server says fired
    usage: Any = None
    pieces: int = 0  # streamed pieces: tokens, on the servers we know
    calls: dict[int, ToolCall] = field(default_factory=dict)

    def done(self, finish: Literal["stop", "length", "eos"], stop: str | None, aborted: bool = False) -> Done:
        # The server's count is better than ours when it sent one (not when we
        # closed the stream early).
        if self.usage is not None and not aborted:
            return Done(finish, stop, int(self.usage.prompt_tokens or 0), int(self.usage.completion_tokens or 0))
        return Done(finish, stop, 0, self.pieces)


class Protocol(abc.ABC):
    """How one protocol asks a server for a continuation and reads its answer."""

    endpoint: str  # for messages, e.g. "/completions"
    # Whether the loop's stop strings may go to the server (once it reports which fired).
    sends_stops = True

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec

    @abc.abstractmethod
    def format_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat prompt, as this protocol sends it back."""

    @abc.abstractmethod
    def fields(self, request: GenerationRequest) -> tuple[dict[str, Any], dict[str, Any]]:
        """The endpoint's own request fields: (client arguments, server extensions for extra_body)."""

    @abc.abstractmethod
    def create(self, client: Any) -> Callable[..., Awaitable[Any]]:
        """The client's method for the endpoint."""

    @abc.abstractmethod
    def text(self, choice: Any) -> str:
        """The text of one choice of a streamed chunk or of a whole reply."""

    def gather(self, choice: Any, reply: Reply) -> None:  # noqa: B027 - only tools have more to read
        """Read what a choice holds besides its text into `reply`."""

    def answered(self, request: GenerationRequest) -> list[StreamEvent] | None:
        """A call this protocol answers without asking the server, or None."""
        return None

    def ending(self, reply: Reply, request: GenerationRequest, emitted: str) -> list[StreamEvent] | None:
        """How a reply ends when the protocol says more than its finish reason (tool calls), or None."""
        return None

    def for_episode(self) -> Protocol:
        """The protocol one trajectory talks through: itself, unless it keeps state per trajectory."""
        return self


async def whole(reply: Any) -> AsyncIterator[Any]:
    """A reply that was not streamed, read as one chunk."""
    yield reply


async def read(chunks: AsyncIterator[Any], protocol: Protocol, request: GenerationRequest,
               conn: Connection) -> AsyncGenerator[StreamEvent, None]:
    """The events of one reply: its text cut at the loop's stops, then one Done."""
    scanner = StopScanner(request.stop)
    reply = Reply()
    emitted = ""
    async for chunk in chunks:
        if getattr(chunk, "model", None):
            # What the server says it ran is the record's model (a server
            # with one model may ignore the name asked for).
            conn.model = str(chunk.model)
        if getattr(chunk, "usage", None) is not None:
            reply.usage = chunk.usage
        for choice in chunk.choices or []:
            extra = choice.model_extra or {}
            for key in STOP_REPORTS:
                if key in extra:
                    conn.reports_stops = True
                    reply.reported = extra[key] if extra[key] is not None else reply.reported
            protocol.gather(choice, reply)
            text = protocol.text(choice)
            if text:
                reply.pieces += 1
                out = scanner.feed(text)
                if out:
                    emitted += out
                    yield Delta(out)
                if scanner.matched is not None:
                    yield reply.done("stop", scanner.matched, aborted=True)
                    return
            reply.finish = choice.finish_reason or reply.finish
    rest = scanner.flush()
    if rest:
        emitted += rest
        yield Delta(rest)
    ending = protocol.ending(reply, request, emitted)
    if ending is not None:
        for event in ending:
            yield event
        return
    if reply.finish is None:
        raise BackendError(f"server {conn.url}: the stream ended without a finish reason (the server dropped "
                           "the request; a llama-cpp-python server needs --interrupt_requests False to serve "
                           "several clients)")
    if reply.finish == "length":
        yield reply.done("length", None)
    elif reply.finish == "content_filter":
        raise BackendError(f"server {conn.url} withheld the completion (finish_reason content_filter)")
    elif isinstance(reply.reported, str) and reply.reported in request.stop:
        yield reply.done("stop", reply.reported)
    else:
        yield reply.done("eos", None)
