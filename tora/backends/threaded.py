"""Run a blocking token generator in a thread and stream it into asyncio.

CPU engines (llama.cpp, transformers) generate synchronously. Running them in
a worker thread keeps the event loop free for every other trajectory's
kernel; a `threading.Event` lets a cancelled consumer stop the engine at the
next token instead of letting it run to max_tokens.

A producer yields one `Sampled` per token: its text (already decoded, so the
texts of a call concatenate to the decode of its ids), its id and logprob.
The stop scanner cuts the text; the ids are passed on as they come, and at a
stop the text of the sampled tokens past the cut becomes `Done.tail` (see
`tora.backends.base`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass

from tora.backends.base import Delta, Done, FinishReason, StopScanner, StreamEvent


@dataclass(frozen=True)
class Sampled:
    text: str
    token_id: int
    logprob: float | None = None
    top: dict[int, float] | None = None


# A producer yields what it samples, token by token, until it ends or is cancelled.
Producer = Callable[[threading.Event], Generator[Sampled, None, None]]

_END = object()


async def stream_in_thread(
    produce: Producer,
    stops: list[str],
    *,
    prompt_tokens: int = 0,
    natural_finish: Callable[[], FinishReason],
) -> AsyncGenerator[StreamEvent, None]:
    """Stream a producer's tokens, cut at the first stop string.

    `natural_finish` is asked, after the producer ran out, whether it stopped
    on the model's end of text ("eos") or on the token limit ("length").
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    cancel = threading.Event()
    scanner = StopScanner(stops)
    counted = [0]
    texts = {"all": "", "emitted": ""}

    def work() -> None:
        pieces = produce(cancel)
        try:
            for piece in pieces:
                counted[0] += 1
                texts["all"] += piece.text
                out = scanner.feed(piece.text)
                texts["emitted"] += out
                top = None if piece.top is None else (piece.top,)
                logprobs = None if piece.logprob is None else (piece.logprob,)
                delta = Delta(out, (piece.token_id,), logprobs, top)
                loop.call_soon_threadsafe(queue.put_nowait, delta)
                if scanner.matched is not None or cancel.is_set():
                    break
            # Close the engine's generator here, in this thread, while we still
            # hold the model. Left to the garbage collector, its clean-up ran
            # later in another thread, concurrently with the next generation,
            # and llama.cpp aborted (GGML_ASSERT in get_rows).
            pieces.close()
            rest = scanner.flush()
            if rest:
                texts["emitted"] += rest
                loop.call_soon_threadsafe(queue.put_nowait, Delta(rest))
        except BaseException as exc:  # surfaced in the consumer
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    worker = loop.run_in_executor(None, work)
    try:
        while True:
            item = await queue.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Delta)
            yield item
        await worker
        if scanner.matched is not None:
            tail = texts["all"][len(texts["emitted"]) :]
            yield Done("stop", scanner.matched, prompt_tokens, counted[0], tail)
        else:
            yield Done(natural_finish(), None, prompt_tokens, counted[0])
    finally:
        # Consumer cancelled or closed us early: stop the engine, then wait
        # for the thread so that the model is free for the next caller.
        cancel.set()
        await asyncio.shield(worker)
