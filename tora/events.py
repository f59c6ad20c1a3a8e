"""The typed events the engine yields. Renderers, the recorder, the JSON
printer, progress bars and the HTTP server subscribe to these; the engine
knows none of them.

Every event carries the id of its trajectory and its sequence number within
it (0, 1, 2, ...), so a consumer that multiplexes many trajectories (a
server streaming to many clients) can route and order them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tora.record.schema import ExecutionStep, Trajectory


@dataclass(frozen=True, kw_only=True)
class EventBase:
    trajectory_id: str = ""
    seq: int = 0


@dataclass(frozen=True)
class TurnStarted(EventBase):
    turn: int  # 0 for the first model call, +1 after each execution


@dataclass(frozen=True)
class TextDelta(EventBase):
    text: str


@dataclass(frozen=True)
class CodeBlockClosed(EventBase):
    code: str
    index: int  # 1-based tool call number


@dataclass(frozen=True)
class ExecutionFinished(EventBase):
    step: ExecutionStep
    index: int


@dataclass(frozen=True)
class FinalAnswer(EventBase):
    answer: str
    extracted_by: str


@dataclass(frozen=True)
class Finished(EventBase):
    trajectory: Trajectory


Event = TurnStarted | TextDelta | CodeBlockClosed | ExecutionFinished | FinalAnswer | Finished
