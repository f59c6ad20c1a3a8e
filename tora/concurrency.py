"""Running many coroutines with a bound, yielding results as they finish."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


async def bounded_as_completed(
    items: Sequence[T], run: Callable[[T], Awaitable[R]], limit: int
) -> AsyncGenerator[R, None]:
    """Yield `run(item)` for every item as each finishes, at most `limit` at once.

    The first failure is raised to the consumer. Closing the generator (or
    cancelling its consumer) cancels every run still going, so no kernel or
    model call outlives the batch.
    """
    sem = asyncio.Semaphore(max(1, limit))
    done: asyncio.Queue[R | BaseException] = asyncio.Queue()

    async def one(item: T) -> None:
        try:
            async with sem:
                done.put_nowait(await run(item))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced to the consumer, who decides
            done.put_nowait(exc)

    tasks = [asyncio.create_task(one(item)) for item in items]
    try:
        for _ in tasks:
            got = await done.get()
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        for task in tasks:
            task.cancel()
        # The runs' own outcomes are collected, not raised; a cancellation of
        # this consumer while it waits still propagates.
        await asyncio.gather(*tasks, return_exceptions=True)
