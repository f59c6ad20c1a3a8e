"""One row per trajectory: the JSONL training formats.

- `tora`: the ToRA / NuminaMath-TIR layout: the question as the user message
  and the completion (reasoning with inline ```python and ```output blocks) as
  one assistant message, verbatim. `text` is the question part of the prompt
  followed by the completion: the context the model saw minus the prompt's
  shared prefix (see `tora.export.view`), byte for byte. With output spans,
  `output_spans` lists the [start, end) character spans of the ```output
  blocks in the assistant message (add `len(text) - len(assistant)` for
  spans in `text`), so a trainer can leave tool output out of the loss.
- `trl`: TRL's conversational format with tool calling: the model's text
  before each executed block is the assistant's content, the code a call of
  the `python` tool (arguments as an object), its `rendered` output a `tool`
  message; `tools` holds the tool's JSON schema.
- `openai`: the same conversation as OpenAI's fine-tuning JSONL: arguments as
  a JSON string, calls with ids (`call_1`, ...) that the tool messages answer.
- `sharegpt`: human / function_call / observation / gpt turns (the layout
  LLaMA-Factory reads, `tools` a JSON string). A function_call's value is the
  call as JSON; the model's text before it goes in the turn's `thought`,
  because the layout has no place for text beside a call.

A trajectory that failed (finish `error` or `interrupted`) is exported only
when asked; then a code block that never got its result stays in the
assistant text, not a tool call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tora.export.view import meta, output_spans, question_part, question_text, turns
from tora.record import Trajectory

TOOL_NAME = "python"
TOOL_FUNCTION: dict[str, Any] = {
    "name": TOOL_NAME,
    "description": "Run Python code in a Jupyter kernel and return what it prints (stdout, the value of the "
    "last expression, or the error).",
    "parameters": {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "The Python code to run."}},
        "required": ["code"],
    },
}
TOOL_SCHEMA: dict[str, Any] = {"type": "function", "function": TOOL_FUNCTION}


def tora_row(t: Trajectory, *, spans: bool = False) -> dict[str, Any]:
    completion = t.completion()
    row: dict[str, Any] = {
        "messages": [{"role": "user", "content": question_text(t)}, {"role": "assistant", "content": completion}],
        "text": question_part(t) + completion,
    }
    if spans:
        row["output_spans"] = [list(span) for span in output_spans(t)]
    row["meta"] = meta(t)
    return row


def _conversation(t: Trajectory, call: Callable[[int, str], dict[str, Any]],
                  result: Callable[[int, str], dict[str, Any]]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": question_text(t)}]
    n = 0
    for turn in turns(t):
        if turn.call is None:
            if turn.text:
                messages.append({"role": "assistant", "content": turn.text})
            continue
        n += 1
        messages.append({"role": "assistant", "content": turn.text, "tool_calls": [call(n, turn.call.code)]})
        messages.append(result(n, turn.call.execution.rendered))
    return messages


def trl_row(t: Trajectory) -> dict[str, Any]:
    messages = _conversation(
        t,
        lambda n, code: {"type": "function", "function": {"name": TOOL_NAME, "arguments": {"code": code}}},
        lambda n, out: {"role": "tool", "name": TOOL_NAME, "content": out},
    )
    return {"messages": messages, "tools": [TOOL_SCHEMA], "meta": meta(t)}


def openai_row(t: Trajectory) -> dict[str, Any]:
    # Only `messages` and `tools`: the fine-tuning upload checks the keys of each line.
    messages = _conversation(
        t,
        lambda n, code: {"id": f"call_{n}", "type": "function",
                         "function": {"name": TOOL_NAME, "arguments": json.dumps({"code": code}, ensure_ascii=False)}},
        lambda n, out: {"role": "tool", "tool_call_id": f"call_{n}", "content": out},
    )
    return {"messages": messages, "tools": [TOOL_SCHEMA]}


def sharegpt_row(t: Trajectory) -> dict[str, Any]:
    conv: list[dict[str, Any]] = [{"from": "human", "value": question_text(t)}]
    for turn in turns(t):
        if turn.call is None:
            if turn.text:
                conv.append({"from": "gpt", "value": turn.text})
            continue
        value = json.dumps({"name": TOOL_NAME, "arguments": {"code": turn.call.code}}, ensure_ascii=False)
        conv.append({"from": "function_call", "value": value, "thought": turn.text})
        conv.append({"from": "observation", "value": turn.call.execution.rendered})
    return {"conversations": conv, "tools": json.dumps([TOOL_FUNCTION], ensure_ascii=False), "meta": meta(t)}


ROWS: dict[str, Callable[[Trajectory], dict[str, Any]]] = {
    "tora": tora_row,
    "trl": trl_row,
    "openai": openai_row,
    "sharegpt": sharegpt_row,
}
