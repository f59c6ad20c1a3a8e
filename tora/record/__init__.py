"""The trajectory record: schema (pydantic) and the append-only writer."""

from tora.record.schema import (
    SCHEMA_VERSION,
    CodeStep,
    ExecutionStep,
    Generation,
    Problem,
    PromptRef,
    Result,
    Runtime,
    Sampling,
    Stats,
    Step,
    TextStep,
    Trajectory,
)
from tora.record.writer import TrajectoryWriter, read_trajectories, repair_tail

__all__ = [
    "SCHEMA_VERSION",
    "CodeStep",
    "ExecutionStep",
    "Generation",
    "Problem",
    "PromptRef",
    "Result",
    "Runtime",
    "Sampling",
    "Stats",
    "Step",
    "TextStep",
    "Trajectory",
    "TrajectoryWriter",
    "read_trajectories",
    "repair_tail",
]
