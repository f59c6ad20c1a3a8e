"""The backend contract: a prompt in, streamed text out.

A backend knows nothing of code blocks or kernels. `stream()` yields `Delta`s
and ends with exactly one `Done` saying why it stopped. Stop strings are
applied here, in `StopScanner`, the same way for every engine, so that the
loop always learns *which* stop string fired (llama.cpp and transformers do
not report it).

The loop never trusts a backend to keep that contract: it reads every stream
through `checked_stream`, which turns a stream that breaks, ends without a
`Done` or goes on after one into a `BackendError` naming the backend.

Backends subclass `Backend`; the optional hooks (`prepare`, `for_episode`,
`aclose`) have defaults, so a plugin overrides only what it needs.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from tora.errors import BackendError

if TYPE_CHECKING:
    from tora.record.schema import Problem

FinishReason = Literal["stop", "length", "eos"]


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    stop: list[str] = field(default_factory=list)
    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: FinishReason
    stop_string: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


StreamEvent = Delta | Done


class Backend(abc.ABC):
    name: str  # backend kind, e.g. "llama.cpp"
    model: str  # what was loaded, e.g. a file name or model id

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Yield Deltas, then exactly one Done. Closing the stream stops generation."""

    @abc.abstractmethod
    def format_chat(self, messages: list[dict[str, str]]) -> str:
        """Render chat messages with the model's template, ending ready for the assistant."""

    def prepare(self, prefix: str) -> None:  # noqa: B027 - an optional hook
        """Precompute a prompt prefix every problem shares (llama.cpp caches its KV state)."""

    def for_episode(self, problem: Problem, sample_index: int) -> Backend:
        """The backend one trajectory talks to. Real models serve every trajectory
        alike; a replay of recorded data needs to know which problem and sample it plays."""
        return self

    async def aclose(self) -> None:  # noqa: B027 - an optional hook
        """Free the model."""


async def checked_stream(backend: Backend, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
    """`backend.stream(request)`, held to the contract: Deltas, then exactly one Done, then nothing."""
    done: Done | None = None
    try:
        async with contextlib.aclosing(backend.stream(request)) as stream:  # type: ignore[type-var]
            async for event in stream:
                if done is not None:
                    raise BackendError(f"backend {backend.name}: {type(event).__name__} after the end of its stream")
                if isinstance(event, Done):
                    done = event
                elif not isinstance(event, Delta):
                    raise BackendError(f"backend {backend.name}: streamed {event!r}, not text")
                yield event
    except (BackendError, asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:
        raise BackendError(f"backend {backend.name} failed: {type(exc).__name__}: {exc}") from exc
    if done is None:
        raise BackendError(f"backend {backend.name}: its stream ended without saying why it stopped (no Done)")


class StopScanner:
    """Cuts a token stream at the first stop string, holding back partial matches.

    Text that might be the start of a stop string is withheld until it is
    either confirmed (stop) or ruled out (released), so no stop string ever
    leaks into the emitted text.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Return the text that is safe to emit; sets `matched` on a stop."""
        if self.matched is not None:
            return ""
        buf = self._held + text
        first: tuple[int, str] | None = None
        for stop in self.stops:
            i = buf.find(stop)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, stop)
        if first is not None:
            self.matched = first[1]
            self._held = ""
            return buf[: first[0]]
        # Hold back the longest tail that a stop string could still begin with.
        # It starts with that stop's first character, so only those places are
        # tried: most tokens hold none, and this runs once per token of every
        # trajectory in flight.
        keep = 0
        for stop in self.stops:
            i = buf.find(stop[0], max(0, len(buf) - len(stop) + 1))
            while i >= 0:
                if stop.startswith(buf[i:]):
                    keep = max(keep, len(buf) - i)
                    break
                i = buf.find(stop[0], i + 1)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At the end of generation, what was held back is real text."""
        held, self._held = self._held, ""
        return held if self.matched is None else ""


def cut_at_stops(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first of `stops` (not kept), and whether one occurred:
    what a stream through `StopScanner` would have emitted."""
    scanner = StopScanner(stops)
    out = scanner.feed(text) + scanner.flush()
    return out, scanner.matched is not None
