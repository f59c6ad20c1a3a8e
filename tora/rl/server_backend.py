"""A token backend over a trainer's generation server: token ids in, token ids and logprobs out.

verl's server manager (`LLMServerClient.generate(request_id, prompt_ids=,
sampling_params=)` returning a `TokenOutput` with `token_ids`, `log_probs`)
fronts vLLM or SGLang replicas that hold the weights being trained. This backend
speaks that interface and the tokenizer the trainer gave, so tora's loop runs
its token path over it: the server is fed the exact sequence so far, never a
re-tokenisation.

The server answers a call at once, not token by token; its stop strings are
passed on (vLLM stops on them and keeps the token that completed one), and
the stream is then cut here at the first stop, token by token, through the
same code as the in-process backends (`stream_in_thread`), so `Done.tail`
and the token-path record are the same as theirs.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any, Protocol

from tora.backends.base import Done, FinishReason, GenerationRequest, StreamEvent
from tora.backends.hf_tokens import HFTokenizerBackend
from tora.backends.threaded import Sampled, stream_in_thread
from tora.errors import BackendError


class TokenServer(Protocol):
    """verl's `LLMServerClient` as this backend uses it."""

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any]) -> Any: ...


def token_pieces(detokenize: Any, ids: Sequence[int], window: int = 8) -> list[str]:
    """Each id's text, such that the pieces concatenate to `detokenize(ids)`.

    A token's text depends on its neighbours (a leading space, a multi-byte
    character split over tokens), so each piece is the difference between the
    decodes of a few ids before it with and without it; a piece that would end
    in an incomplete character waits for the next id. Checked at the end against
    the whole decode, which it falls back to (all text on the last piece).
    """
    pieces: list[str] = []
    pending = 0  # ids whose text is still held back
    for i in range(len(ids)):
        start = max(0, i - pending - window)
        before = detokenize(list(ids[start : i - pending]))
        now = detokenize(list(ids[start : i + 1]))
        if (now.endswith("\ufffd") and i + 1 < len(ids)) or not now.startswith(before):
            pieces.append("")
            pending += 1
            continue
        pieces.append(now[len(before) :])
        pending = 0
    whole = detokenize(list(ids))
    if "".join(pieces) != whole:
        pieces = [""] * (len(ids) - 1) + [whole] if ids else []
    return pieces


class TokenServerBackend(HFTokenizerBackend):
    name = "verl-server"
    accepts_token_ids = True

    def __init__(self, server: TokenServer, tokenizer: Any, *, request_id: str, model: str = "verl",
                 extra: dict[str, Any] | None = None) -> None:
        self.server = server
        self.tokenizer = tokenizer
        self.request_id = request_id  # one per trajectory: the server manager keeps it on one replica
        self.model = model
        self.extra = dict(extra or {})  # further sampling parameters the trainer set (top_k, ...)
        self._last: list[int] | None = None

    def evaluated_ids(self) -> list[int] | None:
        return None if self._last is None else list(self._last)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        ids = list(request.prompt_ids) if request.prompt_ids is not None else self.encode_prompt(request.prompt)
        params = {**self.extra, "temperature": request.temperature, "top_p": request.top_p,
                  "max_tokens": request.max_tokens, "logprobs": request.logprobs}
        if request.stop:
            params["stop"] = list(request.stop)
        out = await self.server.generate(self.request_id, prompt_ids=ids, sampling_params=params)
        sampled = [int(t) for t in out.token_ids]
        logprobs = list(out.log_probs) if getattr(out, "log_probs", None) else None
        if logprobs is not None and len(logprobs) != len(sampled):
            raise BackendError(f"server returned {len(sampled)} token ids but {len(logprobs)} logprobs")
        pieces = token_pieces(self.detokenize, sampled)
        eos = set(_eos_ids(self.tokenizer))
        kept: list[int] = []

        def produce(cancel: threading.Event) -> Generator[Sampled, None, None]:
            for i, (token, piece) in enumerate(zip(sampled, pieces, strict=True)):
                kept.append(token)
                yield Sampled(piece, token, None if logprobs is None else float(logprobs[i]))
                if cancel.is_set():
                    return

        def natural_finish() -> FinishReason:
            if kept and kept[-1] in eos:
                return "eos"
            return "length" if len(kept) >= request.max_tokens else "eos"

        events = stream_in_thread(produce, request.stop, prompt_tokens=len(ids), natural_finish=natural_finish)
        async for event in events:
            if isinstance(event, Done):
                self._last = ids + kept
            yield event


def _eos_ids(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list | tuple) else [int(eos)]
