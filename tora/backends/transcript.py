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
message with a `python` tool call and the `tool` message with its result.
By default each call is a message of its own with a positional id (`call_1`,
`call_2`, ...), so a request is a pure function of the recorded text. The
tools protocol also passes what only its own episode saw: which calls one
reply of the server held together, and the ids the server gave them, so
that they go back as one message answered id by id.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
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


def tool_call(call_id: str, code: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": TOOL_NAME, "arguments": json.dumps({"code": code})},
    }


def tool_turns(assistant_text: str,
               replies: Mapping[int, Sequence[str | None]] | None = None) -> tuple[list[dict[str, Any]], str]:
    """The assistant's text as chat turns: (complete messages, the text of the turn in progress).

    A python block followed (after whitespace) by an output block is a tool
    call and its result; any other text stays the assistant's content.
    `replies` maps the offset in `assistant_text` of a reply's first python
    block to the ids of that reply's calls (None: no id of the server's):
    its calls are the pairs that follow one another there, one message.
    """
    found = fences.blocks(assistant_text)
    pairs = [(code, out) for code, out in itertools.pairwise(found)
             if code.is_code and code.closed and out.lang == "output" and out.closed
             and not assistant_text[code.end : out.start].strip()]
    messages: list[dict[str, Any]] = []
    cursor = number = i = 0
    while i < len(pairs):
        first = pairs[i][0]
        ids = list((replies or {}).get(first.start, ()))
        group = pairs[i : i + max(len(ids), 1)]
        if len(group) < len(ids) or any(assistant_text[a.end : b.start].strip()
                                        for (_, a), (b, _) in itertools.pairwise(group)):
            group, ids = group[:1], []  # not the reply that was recorded: one call, as any other text
        calls = []
        for j, (code, _) in enumerate(group):
            number += 1
            call_id = (ids[j] if j < len(ids) else None) or f"call_{number}"
            calls.append(tool_call(call_id, code.content.removesuffix("\n")))
        content = assistant_text[cursor : first.start].removesuffix("\n")
        # "" rather than null or no content: llama-cpp-python types it as a string, and its
        # chat templates read it.
        messages.append({"role": "assistant", "content": content, "tool_calls": calls})
        messages += [{"role": "tool", "tool_call_id": call["id"], "content": out.content.removesuffix("\n")}
                     for call, (_, out) in zip(calls, group, strict=True)]
        cursor = group[-1][1].end
        i += len(group)
    return messages, assistant_text[cursor:]
