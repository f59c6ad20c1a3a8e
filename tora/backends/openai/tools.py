"""protocol=tools: native tool calls of a `python` tool, recorded as the python blocks they stand for.

A tool call streams as the text "```python\\n<code>" and ends at the closing
fence, exactly as if the model had written the block, so the loop runs it
and appends its output block. A reply may hold several calls: the first is
the answer to this model call, and each next one answers the model call that
follows its predecessor's output block, without asking the server: every
call of the reply runs, in order, as a cell of the trajectory's kernel.

The next request turns the python and output blocks back into assistant
tool calls and `tool` messages (tora.backends.transcript.tool_turns): the
calls of one reply go back as one assistant message, each answered by the
id the server gave it. That much is state of one trajectory, so each episode
talks through its own `Tools` (`for_episode`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tora import fences
from tora.backends import transcript
from tora.backends.base import Delta, GenerationRequest, StreamEvent
from tora.backends.openai.chat import ChatContinue
from tora.backends.openai.protocol import Reply, ToolCall
from tora.backends.openai.spec import ServerSpec

PYTHON_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": transcript.TOOL_NAME,
        "description": "Run Python code in a stateful Jupyter kernel and return what it prints.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python code to run."}},
            "required": ["code"],
        },
    },
}


def _code(arguments: str) -> str:
    """The code of a python tool call; arguments that are not {"code": ...} run as they are,
    so that the model sees its mistake in the output."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get("code"), str):
        return str(value["code"])
    return arguments


def _only_an_output_block(text: str) -> bool:
    """Whether `text` is what the loop appends after a python block: its closing fence (when the
    loop wrote it) and one output block."""
    text = text.removeprefix(fences.CLOSE_FENCE)
    found = fences.blocks(text)
    return (len(found) == 1 and found[0].lang == "output" and found[0].closed
            and not text[: found[0].start].strip() and not text[found[0].end :].strip())


@dataclass(frozen=True)
class _Queued:
    call: ToolCall
    cut: bool  # the reply ran out of tokens inside this call


class Tools(ChatContinue):
    # A stop string in the code of a tool call would cut the call.
    sends_stops = False
    # A call's tokens are its JSON arguments, not the python block recorded for it.
    records_tokens = False

    def __init__(self, spec: ServerSpec) -> None:
        super().__init__(spec)
        # Each reply that held tool calls: the offset of its first python block in the assistant's
        # text -> its calls' ids (None where the server gave none).
        self.replies: dict[int, list[str | None]] = {}
        self._queue: list[_Queued] = []  # calls of the last reply that have not run yet
        self._after = ""  # the context that the next queued call continues

    def for_episode(self) -> Tools:
        return Tools(self.spec)

    def assistant_turns(self, assistant: str) -> tuple[list[dict[str, Any]], str]:
        return transcript.tool_turns(assistant, self.replies)

    def fields(self, request: GenerationRequest) -> tuple[dict[str, Any], dict[str, Any]]:
        kwargs, extra = super().fields(request)
        # "auto" is what OpenAI assumes; llama-cpp-python's chatml-function-calling
        # offers the tools only when asked so.
        return {**kwargs, "tools": [PYTHON_TOOL], "tool_choice": "auto"}, extra

    def gather(self, choice: Any, reply: Reply) -> None:
        message = getattr(choice, "delta", None) or choice.message
        for position, tc in enumerate(getattr(message, "tool_calls", None) or []):
            reply.pieces += 1
            # Streamed fragments say which call they continue; a whole reply lists its calls.
            index = getattr(tc, "index", None)
            slot = reply.calls.setdefault(position if index is None else index, ToolCall(None))
            slot.id = slot.id or getattr(tc, "id", None) or None
            if tc.function is not None:
                slot.name = slot.name or (tc.function.name or "")
                slot.arguments += tc.function.arguments or ""

    def ending(self, reply: Reply, request: GenerationRequest, emitted: str) -> list[StreamEvent] | None:
        self._queue = []
        if not reply.calls:
            return None
        calls = [reply.calls[i] for i in sorted(reply.calls)]
        cut = reply.finish == "length"  # the reply ends inside its last call
        self._queue = [_Queued(call, cut and n == len(calls) - 1) for n, call in enumerate(calls)]
        context = request.prompt + emitted
        _, assistant = self.conversation(context)
        self.replies[len(assistant) + len(self._lead(context))] = [call.id for call in calls]
        return self._next(context, request.stop, reply)

    def answered(self, request: GenerationRequest) -> list[StreamEvent] | None:
        if not self._queue:
            return None
        if not (request.prompt.startswith(self._after) and _only_an_output_block(request.prompt[len(self._after) :])):
            self._queue = []  # the loop went elsewhere (it ran out of tool calls, say)
            return None
        return self._next(request.prompt, request.stop, Reply())

    @staticmethod
    def _lead(context: str) -> str:
        return "" if not context or context.endswith("\n") else "\n"

    def _next(self, context: str, stops: list[str], reply: Reply) -> list[StreamEvent]:
        """The next queued call as the text of its python block, and how it ends: at the closing
        fence as the loop's stops ask (it adds the fence itself), or at ```output under ToRA's
        protocol. `reply` counts the tokens (the first call's Done carries the reply's)."""
        queued = self._queue.pop(0)
        opening = self._lead(context) + "```python\n"
        if queued.cut:  # cut off inside the call: an unclosed block, which nothing runs
            self._queue = []
            return [Delta(opening + queued.call.arguments), reply.done("length", None)]
        block = opening + _code(queued.call.arguments).rstrip("\n")
        self._after = context + block
        if fences.CLOSE_FENCE in stops:
            return [Delta(block), reply.done("stop", fences.CLOSE_FENCE)]
        self._after += fences.CLOSE_FENCE
        stop = fences.OUTPUT_FENCE if fences.OUTPUT_FENCE in stops else None
        return [Delta(block), Delta(fences.CLOSE_FENCE), reply.done("stop" if stop else "eos", stop)]
