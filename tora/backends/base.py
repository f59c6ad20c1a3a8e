"""The backend protocol: a prompt in, streamed text out.

A backend knows nothing of code blocks or kernels. It streams `Delta`s and
ends with one `Done` saying why it stopped. Stop strings are applied here, in
`StopScanner`, the same way for every engine, so that the loop always learns
*which* stop string fired (llama.cpp and transformers do not report it).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

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
    # Metadata for backends that need to know where they are (replay);
    # real models ignore it.
    problem: Problem | None = None
    sample_index: int = 0
    turn: int = 0


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


@runtime_checkable
class Backend(Protocol):
    name: str  # backend kind, e.g. "llama.cpp"
    model: str  # what was loaded, e.g. a file name or model id

    def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Yield Deltas, then exactly one Done. Cancelling the consumer stops generation."""
        ...

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        """Render chat messages with the model's template, ending ready for the assistant."""
        ...

    async def aclose(self) -> None: ...


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
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:k]):
                    keep = max(keep, k)
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At the end of generation, what was held back is real text."""
        held, self._held = self._held, ""
        return held if self.matched is None else ""
