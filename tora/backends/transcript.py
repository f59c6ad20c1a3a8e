"""Chat messages as one text, and back: how tora records a conversation it did not tokenise.

The loop works on one text (prompt, then the model's words with its code and
output blocks). A backend whose server applies the chat template itself
(the OpenAI-compatible chat protocols, the replay of a chat template) renders
the template's messages as role-tagged text, the same form as prompts/tora-train:

    <|system|>
    ...
    <|user|>
    ...
    <|assistant|>

and, on every model call, reads that text back into messages (`parse`): the
first `<|assistant|>` header ends the conversation, and everything after it is
the assistant's turn so far. For native tool calls, `tool_turns` turns each
python block that is followed by an output block back into an assistant
message with a `python` tool call and the `tool` message with its result;
the ids are positional (`call_1`, `call_2`, ...), so the requests are a pure
function of the recorded text.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

from tora import fences
from tora.errors import PromptError

ROLES = ("system", "user", "assistant")
_HEADER = re.compile(r"^<\|(system|user|assistant)\|>\n", re.MULTILINE)
TOOL_NAME = "python"


def render(messages: list[dict[str, str]]) -> str:
    """The messages as role-tagged text, ending ready for the assistant."""
    for m in messages:
        if m["role"] not in ROLES:
            raise PromptError(f"chat message role {m['role']!r} is not one of {', '.join(ROLES)}")
        if _HEADER.search(m["content"] + "\n"):
            raise PromptError(f"a {m['role']} message contains a line like '<|user|>', which would break its transcript")
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def parse(text: str) -> tuple[list[dict[str, str]], str] | None:
    """(the messages before the assistant's turn, the assistant's text so far), or None if
    `text` is not a transcript that `render` wrote."""
    messages: list[dict[str, str]] = []
    pos = 0
    for m in _HEADER.finditer(text):
        if m.start() != pos and not messages:
            return None
        if messages:
            messages[-1]["content"] = text[pos : m.start()].removesuffix("\n")
        if m.group(1) == "assistant":
            return messages, text[m.end() :]
        messages.append({"role": m.group(1), "content": ""})
        pos = m.end()
    return None


def tool_call(index: int, code: str) -> dict[str, Any]:
    return {
        "id": f"call_{index}",
        "type": "function",
        "function": {"name": TOOL_NAME, "arguments": json.dumps({"code": code})},
    }


def tool_turns(assistant_text: str) -> tuple[list[dict[str, Any]], str]:
    """The assistant's text as chat turns: (complete messages, the text of the turn in progress).

    A python block followed (after whitespace) by an output block is a tool
    call and its result; any other text stays the assistant's content.
    """
    found = fences.blocks(assistant_text)
    messages: list[dict[str, Any]] = []
    cursor = 0
    for code, out in itertools.pairwise(found):
        if not (code.is_code and code.closed and out.lang == "output" and out.closed):
            continue
        if assistant_text[code.end : out.start].strip():
            continue
        index = len(messages) // 2 + 1
        content = assistant_text[cursor : code.start].removesuffix("\n")
        messages.append({"role": "assistant", "content": content or None,
                         "tool_calls": [tool_call(index, code.content.removesuffix("\n"))]})
        messages.append({"role": "tool", "tool_call_id": f"call_{index}", "content": out.content.removesuffix("\n")})
        cursor = out.end
    return messages, assistant_text[cursor:]
