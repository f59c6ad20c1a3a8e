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

Tokens (schema 1.2). A backend that samples tokens itself says so with
`accepts_token_ids = True` and implements `tokenize`, `encode_prompt`,
`detokenize` and `evaluated_ids`. The loop then feeds it the exact sequence so
far in `GenerationRequest.prompt_ids` (the previous prompt ids, the sampled
ids, the ids of each output block tokenised once when it was appended), never
a re-tokenisation of its own text, and `prompt` is only that sequence's text.
Its stream carries, per `Delta`, the ids sampled since the last one and each
one's logprob. `Delta.text` is still cut at the first stop string; what the
sampled tokens hold past that cut (the stop string itself, and whatever else
its last token held) is `Done.tail`, so that for every call

    detokenize(all Delta.token_ids) == "".join(Delta.text) + Done.tail

Logprobs are log-probabilities of the sampled token under the distribution it
was sampled from at the request's temperature (logits / T; raw logits when
T == 0), before top-k / top-p / min-p truncation: the quantity an RL trainer
recomputes for its importance ratio. `None` where a backend cannot give them.
Nothing is invented: a backend without tokens leaves `token_ids` empty and
`logprobs` None (the replay backend, the OpenAI chat protocol).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from tora.errors import BackendError
from tora.record.schema import StopKind

if TYPE_CHECKING:
    from tora.record.schema import ModelId, Problem, TokenizerId

FinishReason = Literal["stop", "length", "eos"]
# Which stop fired, as the record names it (`TextStep.stop.kind`).
_STOP_KIND: dict[str, StopKind] = {"stop": "stop_string", "eos": "eos", "length": "length"}


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    stop: list[str] = field(default_factory=list)
    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    # The exact token sequence so far; a backend with `accepts_token_ids`
    # evaluates these and not `prompt` (which is then only their text).
    prompt_ids: tuple[int, ...] | None = None
    # Alternatives to return beside each sampled token's logprob (0: none).
    top_logprobs: int = 0
    # False: the caller records no logprobs, and a backend may skip computing them.
    logprobs: bool = True


@dataclass(frozen=True)
class Delta:
    text: str
    # The ids sampled since the previous Delta and each one's logprob
    # (None: the backend gives none). A Delta may carry ids and no text (text
    # held back by the stop scanner, or an incomplete UTF-8 character).
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] | None = None
    # Per sampled id, the `top_logprobs` most likely ids and their logprobs.
    top_logprobs: tuple[dict[int, float], ...] | None = None


@dataclass(frozen=True)
class Done:
    finish_reason: FinishReason
    stop_string: str | None = None
    prompt_tokens: int = 0  # how many prompt tokens the backend read (its whole prompt)
    completion_tokens: int = 0
    # The text of the sampled tokens past the emitted text: it starts with
    # the stop string that fired (empty unless one did, or when the backend
    # gives no tokens). The token path keeps it; the text path drops it.
    tail: str = ""

    @property
    def stop(self) -> StopKind:
        """Which stop fired: a stop string (`stop_string` says which), the end of text, or the length limit."""
        return _STOP_KIND[self.finish_reason]


StreamEvent = Delta | Done


class Backend(abc.ABC):
    name: str  # backend kind, e.g. "llama.cpp"
    model: str  # what was loaded, e.g. a file name or model id
    # True: the backend evaluates `GenerationRequest.prompt_ids` and streams
    # the ids it samples; the loop then runs the token path (see the module doc).
    accepts_token_ids: bool = False

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

    # -- tokens (backends with accepts_token_ids) -------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """The ids of a whole prompt: BOS where the model wants one (not a second
        one when a chat template already wrote it), special-token text parsed."""
        raise NotImplementedError(f"backend {self.name} does not tokenize")

    def tokenize(self, text: str) -> list[int]:
        """The ids of `text` appended to a sequence (an output block): no BOS, and
        special-token text is not parsed, so tool output cannot forge a control token."""
        raise NotImplementedError(f"backend {self.name} does not tokenize")

    def detokenize(self, ids: list[int]) -> str:
        """The text of `ids` (special tokens such as EOS give no text); invalid
        UTF-8 is replaced, as the stream decodes it."""
        raise NotImplementedError(f"backend {self.name} does not tokenize")

    def tokenizer_identity(self) -> TokenizerId | None:
        """Name, vocabulary hash and chat template hash of the tokenizer; None if unknown."""
        return None

    def model_identity(self) -> ModelId | None:
        """A content hash of the weights (see `tora.record.identity`); None if unknown."""
        return None

    def evaluated_ids(self) -> list[int] | None:
        """The backend's own view of the sequence it held at the end of its last
        call, read from the engine (llama.cpp's evaluated tokens, vLLM's
        `prompt_token_ids` plus the output ids of the last request), for the
        record's invariant tests. An engine never evaluates the token it ended
        on, so llama.cpp's view may lack the last sampled id. None if unknown."""
        return None


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
