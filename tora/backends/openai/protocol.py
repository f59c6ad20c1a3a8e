"""What every protocol shares: the object each protocol is, and the reading of one reply.

A protocol turns a `GenerationRequest` into the request of its endpoint and
reads the text out of each choice of the reply; `read` does the rest the same
way for all of them: the loop's stop strings (tora's `StopScanner` cuts the
text, whatever the server does), the stop the server reports, the finish
reason and the token counts.

Tokens (the contract in tora.backends.base). What a server gives is passed
on and nothing else: the sampled ids where it returns them (vLLM's
`return_token_ids`: a choice's `token_ids`, per chunk), each token's logprob
where it returns one. Servers report the logprob of the raw logits (vLLM's
default `logprobs-mode`, llama-cpp-python's), which is the contract's
quantity only at temperature 0 or 1: at any other temperature none is kept.
The alternatives (`top_logprobs`) are kept only when the server names them
by id (vLLM's `return_tokens_as_token_ids`). With ids, the text of the
sampled tokens past a stop string is `Done.tail`: the stream is then cut
here, never at the server, so that every id's text was seen.
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
# How vLLM names a token by its id (`return_tokens_as_token_ids`).
TOKEN_ID = "token_id:"
# Temperatures at which a server's raw-logit logprob is the one sampled from.
RAW_LOGPROB_TEMPERATURES = (0.0, 1.0)


def top_by_id(entries: list[tuple[str, float]]) -> dict[int, float] | None:
    """Alternatives named "token_id:N" as {N: logprob}; None if any is named otherwise."""
    top: dict[int, float] = {}
    for token, logprob in entries:
        if not token.startswith(TOKEN_ID) or not token[len(TOKEN_ID) :].isdigit():
            return None
        top[int(token[len(TOKEN_ID) :])] = float(logprob)
    return top


@dataclass(frozen=True)
class Logprobs:
    """One choice's logprobs: per token, and the alternatives by id (None: not given)."""

    values: list[float]
    top: list[dict[int, float]] | None = None


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
    sampled: int | None = None  # how many ids the server returned, when it returns them
    received: str = ""  # all the text the reply held, past a stop too

    def done(self, finish: Literal["stop", "length", "eos"], stop: str | None, aborted: bool = False,
             tail: str = "") -> Done:
        # The server's count is better than ours when it sent one (not when we
        # closed the stream early).
        if self.usage is not None and not aborted:
            return Done(finish, stop, int(self.usage.prompt_tokens or 0), int(self.usage.completion_tokens or 0),
                        tail=tail)
        return Done(finish, stop, 0, self.pieces if self.sampled is None else self.sampled, tail=tail)


class Protocol(abc.ABC):
    """How one protocol asks a server for a continuation and reads its answer."""

    endpoint: str  # for messages, e.g. "/completions"
    # Whether the loop's stop strings may go to the server (once it reports which fired).
    sends_stops = True
    # Whether the sampled tokens are the recorded text's (ids and logprobs are asked for and kept).
    records_tokens = True

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

    def logprob_fields(self, top: int) -> dict[str, Any]:
        """The request fields that ask for each sampled token's logprob and `top` alternatives."""
        return {}

    def logprobs(self, choice: Any) -> Logprobs | None:
        """The logprobs a choice holds, or None."""
        return None

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
    """The events of one reply: its text cut at the loop's stops, with the tokens the server
    gave, then one Done."""
    scanner = StopScanner(request.stop)
    reply = Reply()
    emitted = ""
    keep_logprobs = request.temperature in RAW_LOGPROB_TEMPERATURES
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
            ids = extra.get("token_ids") if protocol.records_tokens else None
            ids = tuple(int(i) for i in ids) if isinstance(ids, list) else ()
            found = protocol.logprobs(choice) if keep_logprobs and protocol.records_tokens else None
            if ids:
                reply.sampled = (reply.sampled or 0) + len(ids)
                if found is not None and len(found.values) != len(ids):
                    found = None  # they would not line up
            if text:
                reply.pieces += 1
                reply.received += text
            out = scanner.feed(text) if text else ""
            if out or ids or found is not None:
                emitted += out
                top = found.top if found is not None and request.top_logprobs else None
                yield Delta(out, ids, None if found is None else tuple(found.values),
                            None if top is None else tuple(top))
            if scanner.matched is not None:
                # With ids, the sampled text past the cut is the tail (it starts with the stop).
                tail = reply.received[len(emitted):] if reply.sampled is not None else ""
                yield reply.done("stop", scanner.matched, aborted=True, tail=tail)
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
