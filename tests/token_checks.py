"""The token invariant every token backend's record must satisfy (see tora.record.schema).

A module of its own, free of any engine import, so that the transformers check
(run in a subprocess of its own, see tiny_hf.py) uses the very same check."""

from __future__ import annotations

import math
from typing import Any

from tora.record import Trajectory
from tora.record.schema import ExecutionStep, TextStep


def check_token_invariant(t: Trajectory, backend: Any) -> None:
    assert t.generation.token_path == "tokens" and t.prompt_ids
    seq = t.token_sequence()
    assert seq is not None
    # The engine never evaluates the token it ended on: everything before it, exactly.
    assert backend.evaluated_ids() == seq[:-1], "the record's ids are not the sequence the model read"
    for step in t.steps:
        if isinstance(step, TextStep):
            assert step.token_ids is not None and backend.detokenize(step.token_ids) == step.content
            assert step.logprobs is not None and len(step.logprobs) == len(step.token_ids)
            assert all(math.isfinite(lp) and lp <= 0.0 for lp in step.logprobs)
            assert step.stop is not None
        elif isinstance(step, ExecutionStep):
            assert step.observation_ids == backend.tokenize(step.observation)
