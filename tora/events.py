"""The typed events the engine yields. Renderers, the recorder, the JSON
printer and progress bars subscribe to these; the engine knows none of them."""

from __future__ import annotations

from dataclasses import dataclass

from tora.record.schema import ExecutionStep, Trajectory


@dataclass(frozen=True)
class TurnStarted:
    turn: int  # 0 for the first model call, +1 after each execution


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class CodeBlockClosed:
    code: str
    index: int  # 1-based tool call number


@dataclass(frozen=True)
class ExecutionFinished:
    step: ExecutionStep
    index: int


@dataclass(frozen=True)
class FinalAnswer:
    answer: str
    extracted_by: str


@dataclass(frozen=True)
class Finished:
    trajectory: Trajectory


Event = TurnStarted | TextDelta | CodeBlockClosed | ExecutionFinished | FinalAnswer | Finished
