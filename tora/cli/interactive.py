"""Driving one episode for the interactive verbs (`tora solve` and its REPL):
subscribers see every event, and the trajectory is recorded even when the
user interrupts it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from tora.engine import Episode
from tora.events import Event, Finished
from tora.record import Trajectory, TrajectoryWriter


async def run_episode(
    episode: Episode,
    subscribers: list[Callable[[Event], None]],
    writer: TrajectoryWriter | None,
) -> Trajectory:
    """Drive one episode, feed every subscriber, record the result (even when interrupted)."""
    trajectory: Trajectory | None = None
    try:
        async with contextlib.aclosing(episode.run()) as events:
            async for event in events:
                _publish(subscribers, event)
                if isinstance(event, Finished):
                    trajectory = event.trajectory
    except (asyncio.CancelledError, KeyboardInterrupt):
        if writer is not None and episode.trajectory is not None:
            writer.append_sync(episode.trajectory)
        raise
    assert trajectory is not None
    if writer is not None:
        await writer.append(trajectory)
    return trajectory


def _publish(subscribers: list[Callable[[Event], None]], event: Event) -> None:
    for sub in subscribers:
        sub(event)


