"""The trajectory record: schema (pydantic) and the append-only writer."""

from tora.record.schema import (
    SCHEMA_VERSION,
    CodeStep,
    ExecutionStep,
    Generation,
    ModelId,
    Problem,
    PromptRef,
    Result,
    Runtime,
    Sampling,
    Stats,
    Step,
    Stop,
    TextStep,
    TokenizerId,
    Trajectory,
)
from tora.record.writer import TrajectoryWriter, read_trajectories, repair_tail

__all__ = [
    "SCHEMA_VERSION",
    "CodeStep",
    "ExecutionStep",
    "Generation",
    "ModelId",
    "Problem",
    "PromptRef",
    "Result",
    "Runtime",
    "Sampling",
    "Stats",
    "Step",
    "Stop",
    "TextStep",
    "TokenizerId",
    "Trajectory",
    "TrajectoryWriter",
    "read_trajectories",
    "repair_tail",
]
