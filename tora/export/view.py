"""Views of one trajectory that every export format and the report share.

- `question_offset`: where the question part of the prompt starts. The
  prompt is instructions and few-shot examples (the same for every problem of
  a template), then the question, then whatever the template puts after it
  (`\\n\\nSolution:\\n`, a chat template's assistant header). The question part
  runs from the last occurrence of the question (stripped, as templates insert
  it) to the end of the prompt, so `prompt[:offset] + question part +
  completion` is the context the model saw. If the question does not occur in
  the prompt, the question part is the whole prompt.
- `output_spans`: the character spans (Python `str` indices, i.e. code
  points) of the runtime-written ```output blocks in the completion: exactly
  the execution steps' observations, so removing them leaves the model's own
  text.
- `turns`: the completion cut at each executed code block, for the
  tool-calling formats; `review_turns` the same for the notebook and the
  report, which also show code that never ran.
- `error_view`: `result.error` as kind and message, whether it is recorded as
  a string (schema 1.0) or as `{kind, message, traceback}` (1.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tora import fences
from tora.record import CodeStep, ExecutionStep, TextStep, Trajectory

FAILED = ("error", "interrupted")  # finishes caused by the runtime or the user, not by the model


def question_text(t: Trajectory) -> str:
    return t.problem.text.strip()


def question_offset(t: Trajectory) -> int:
    question = question_text(t)
    at = t.prompt.rfind(question) if question else -1
    return max(at, 0)


def question_part(t: Trajectory) -> str:
    return t.prompt[question_offset(t) :]


def output_spans(t: Trajectory) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    pos = 0
    for step in t.steps:
        piece = step.context_text()
        if isinstance(step, ExecutionStep) and piece:
            spans.append((pos, pos + len(piece)))
        pos += len(piece)
    return spans


def failed(t: Trajectory) -> bool:
    return t.result.finish in FAILED


@dataclass(frozen=True)
class Call:
    code: str
    execution: ExecutionStep


@dataclass(frozen=True)
class Turn:
    """One stretch of model text and the tool call that ended it (None for the last).

    `text` is the model's text with the executed block cut out: what it wrote
    before the block, plus anything it wrote after the closing fence when that
    is more than whitespace. Other code blocks it wrote stay in the text.
    """

    text: str
    call: Call | None


def cut_block(text: str, code: str) -> str:
    """`text` without the block whose content is `code` (the last such block: the one the engine ran).

    An ```output line the model wrote last (kept on the token path, where the
    observation holds the rest of that block) goes with it: it is the call's."""
    at = text.rfind(fences.OUTPUT_FENCE)
    if at >= 0 and (at == 0 or text[at - 1] == "\n") and not text[at + len(fences.OUTPUT_FENCE) :].strip():
        text = text[:at]
    for block in reversed(fences.blocks(text)):
        if block.is_code and block.content == code:
            tail = text[block.end :]
            return text[: block.start] + (tail if tail.strip() else "")
    return text


def turns(t: Trajectory) -> list[Turn]:
    """The model's turns. A code step without its execution (an interrupted
    trajectory) is no tool call: its block stays in the text, as written."""
    out: list[Turn] = []
    pending = ""
    steps = t.steps
    i = 0
    while i < len(steps):
        step = steps[i]
        if not isinstance(step, TextStep):
            i += 1  # a code or execution step without its text step: nothing the model wrote
            continue
        code = steps[i + 1] if i + 1 < len(steps) else None
        execution = steps[i + 2] if i + 2 < len(steps) else None
        if isinstance(code, CodeStep) and isinstance(execution, ExecutionStep):
            out.append(Turn(pending + cut_block(step.content, code.content), Call(code.content, execution)))
            pending = ""
            i += 3
        else:
            pending += step.content
            i += 1
    if pending or not out:
        out.append(Turn(pending, None))
    return out


@dataclass(frozen=True)
class Shown:
    """A turn as a reviewer sees it: text, then the code and its execution (None when it never ran)."""

    text: str
    code: str | None
    execution: ExecutionStep | None


def review_turns(t: Trajectory) -> list[Shown]:
    """`turns`, except that code the trajectory ended on without its result
    (an interrupted cell) is shown as code, not left inside the text."""
    unrun = t.steps[-1].content if t.steps and isinstance(t.steps[-1], CodeStep) else None
    shown: list[Shown] = []
    for turn in turns(t):
        if turn.call is not None:
            shown.append(Shown(turn.text, turn.call.code, turn.call.execution))
        elif unrun is not None:
            shown.append(Shown(cut_block(turn.text, unrun), unrun, None))
        else:
            shown.append(Shown(turn.text, None, None))
    return shown


@dataclass(frozen=True)
class ErrorView:
    kind: str | None  # backend, kernel, sandbox, grader, internal (1.1); None for a 1.0 string
    message: str


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def error_view(t: Trajectory) -> ErrorView | None:
    err: Any = t.result.error
    if err is None:
        return None
    if isinstance(err, str):
        return ErrorView(None, err)
    kind, message = _field(err, "kind"), _field(err, "message")
    return ErrorView(str(kind) if kind is not None else None, str(message) if message is not None else "")


def meta(t: Trajectory) -> dict[str, Any]:
    """What each exported row carries about its record (flat, typed: fit for Arrow)."""
    return {
        "id": t.id,
        "problem_id": t.problem.id,
        "sample_index": t.sample_index,
        "origin": t.origin,
        "parent": t.parent,
        "finish": t.result.finish,
        "final_answer": t.result.final_answer,
        "answer": t.problem.answer,
        "correct": t.result.correct,
        "grader": t.result.grader,
    }
