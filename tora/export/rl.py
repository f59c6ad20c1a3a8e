"""The `rl` format: one token-level rollout per trajectory, as RL trainers take them.

`rl_row(trajectory, rule)` is the one place that builds a row, and so the one
place that builds the loss mask: the response is every step after the prompt
in order, a text step's sampled `token_ids` with mask 1 and an execution
step's `observation_ids` (the ```output block the tool wrote) with mask 0.
Nothing is re-tokenised: a record without tokens (text path, replay, records
before 1.2) gives None, unless the caller opts into `retokenize`, which fills
the ids from a tokenizer segment by segment and is marked in the row
(`meta.tokens == "retokenized"`, with no logprobs).

Field names follow verl's `AgentLoopOutput` (`prompt_ids`, `response_ids`,
`response_mask`, `response_logprobs`, `num_turns`) and map one to one onto
SkyRL's generator output (`prompt_token_ids`, `response_ids`, `loss_masks`,
`rollout_logprobs`, `rewards`).
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from tora.errors import UsageError
from tora.record import ExecutionStep, TextStep, Trajectory


class RewardRule(BaseModel):
    """How a graded trajectory becomes a scalar reward.

    The base is `correct` or `wrong` from the grader's verdict; each optional
    term is *added* when it applies (give a negative value for a penalty):
    `no_answer` when the trajectory gave no final answer, `tool_error` once per
    failed cell, `truncated` when it ran out of tokens (finish `max_tokens`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    correct: float = 1.0
    wrong: float = 0.0
    no_answer: float = 0.0
    tool_error: float = 0.0
    truncated: float = 0.0

    @classmethod
    def parse(cls, spec: str | None) -> RewardRule:
        """`name=value,name=value` (e.g. `no_answer=-0.5,tool_error=-0.1`) over the defaults."""
        if not spec:
            return cls()
        given: dict[str, float] = {}
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in cls.model_fields:
                raise UsageError(f"--reward {spec!r}: write name=value,... with names among "
                                 f"{', '.join(cls.model_fields)} (got {part!r})")
            try:
                given[name] = float(value)
            except ValueError:
                raise UsageError(f"--reward {spec!r}: {name}={value!r} is not a number") from None
        return cls(**given)

    def reward(self, t: Trajectory) -> float | None:
        """The reward of `t`; None when it was not graded (`result.correct` null)."""
        if t.result.correct is None:
            return None
        value = self.correct if t.result.correct else self.wrong
        if t.result.final_answer is None:
            value += self.no_answer
        value += self.tool_error * sum(isinstance(s, ExecutionStep) and s.status != "ok" for s in t.steps)
        if t.result.finish == "max_tokens":
            value += self.truncated
        return value


class RLRow(BaseModel):
    """One rollout. `response_mask` is 1 on the model's tokens and 0 on tool output;
    `response_logprobs` has 0.0 on tool output and is None when the backend gave none."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    response_logprobs: list[float] | None
    reward: float | None
    num_turns: int  # user, assistant and tool turns, as verl counts them
    meta: dict[str, Any]


class Tokenizer(Protocol):
    """What `retokenize` needs of a tokenizer (a Hugging Face one fits)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def rl_row(t: Trajectory, rule: RewardRule | None = None, *, retokenized_with: str | None = None) -> RLRow | None:
    """The rollout of `t`, or None when the record carries no tokens.

    `retokenized_with`: `t` is a `retokenize`d copy, made with this tokenizer (marked in `meta`)."""
    rule = rule or RewardRule()
    if t.prompt_ids is None:
        return None
    ids: list[int] = []
    mask: list[int] = []
    logprobs: list[float] | None = []
    turns = 1  # the user's prompt
    for step in t.steps:
        if isinstance(step, TextStep):
            if step.token_ids is None:
                return None
            ids += step.token_ids
            mask += [1] * len(step.token_ids)
            if logprobs is not None and step.logprobs is not None and len(step.logprobs) == len(step.token_ids):
                logprobs += step.logprobs
            else:
                logprobs = None
            turns += 1
        elif isinstance(step, ExecutionStep):
            if step.observation_ids is None:
                return None
            ids += step.observation_ids
            mask += [0] * len(step.observation_ids)
            if logprobs is not None:
                logprobs += [0.0] * len(step.observation_ids)
            turns += 1
    gen = t.generation
    meta: dict[str, Any] = {
        "trajectory_id": t.id,
        "problem_id": t.problem.id,
        "sample_index": t.sample_index,
        "answer": t.problem.answer,
        "final_answer": t.result.final_answer,
        "finish": t.result.finish,
        "correct": t.result.correct,
        "tool_calls": t.stats.tool_calls,
        "exec_errors": t.stats.exec_errors,
        "reward_rule": rule.model_dump(),
        "tokens": "retokenized" if retokenized_with else "recorded",
        "retokenized_with": retokenized_with,
        "backend": gen.backend,
        "model": gen.model,
        "tokenizer": gen.tokenizer.model_dump() if gen.tokenizer else None,
        "model_id": gen.model_id.model_dump() if gen.model_id else None,
    }
    return RLRow(prompt_ids=list(t.prompt_ids), response_ids=ids, response_mask=mask, response_logprobs=logprobs,
                 reward=rule.reward(t), num_turns=turns, meta=meta)


def retokenize(t: Trajectory, tokenizer: Tokenizer) -> Trajectory:
    """A copy of `t` with ids from `tokenizer`, segment by segment (the prompt with
    special tokens, each step without) and no logprobs: an approximation of what
    the model read, for records that have no tokens. Only on request (`--retokenize`)."""
    steps = []
    for step in t.steps:
        if isinstance(step, TextStep):
            step = step.model_copy(update={"token_ids": tokenizer.encode(step.content, add_special_tokens=False),
                                           "logprobs": None})
        elif isinstance(step, ExecutionStep):
            step = step.model_copy(update={"observation_ids": tokenizer.encode(step.observation,
                                                                               add_special_tokens=False)})
        steps.append(step)
    # A chat template already wrote the BOS token: do not add a second one.
    bos = getattr(tokenizer, "bos_token", None)
    prompt_ids = tokenizer.encode(t.prompt, add_special_tokens=not (bos and t.prompt.startswith(bos)))
    return t.model_copy(update={"prompt_ids": prompt_ids, "steps": steps})
