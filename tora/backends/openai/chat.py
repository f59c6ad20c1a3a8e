"""protocol=chat-continue: the solution so far is the assistant message, continued on /chat/completions.

The prompt is the conversation as role-tagged text (tora.backends.transcript);
each request reads it back into messages, and the assistant's turn so far
goes last, continued with vLLM's `continue_final_message` (servers without
the extension ignore the fields).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from tora.backends import transcript
from tora.backends.base import GenerationRequest
from tora.backends.openai.protocol import Logprobs, Protocol, top_by_id
from tora.errors import BackendError

# Continue the last (assistant) message instead of opening a new turn.
CONTINUE_FINAL_MESSAGE = {"continue_final_message": True, "add_generation_prompt": False}


class ChatContinue(Protocol):
    endpoint = "/chat/completions"

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return transcript.render(messages)

    def conversation(self, prompt: str) -> tuple[list[dict[str, Any]], str]:
        """(the messages before the assistant's turn, the assistant's text so far)."""
        parsed = transcript.parse(prompt)
        if parsed is None:
            raise BackendError(f"protocol={self.spec.protocol} sends chat messages, and this prompt is not a chat "
                               "transcript: use a chat prompt (--prompt chat), or protocol=completions")
        history, assistant = parsed
        return list(history), assistant

    def assistant_turns(self, assistant: str) -> tuple[list[dict[str, Any]], str]:
        """The assistant's text as complete messages and the turn in progress."""
        return [], assistant

    def fields(self, request: GenerationRequest) -> tuple[dict[str, Any], dict[str, Any]]:
        messages, assistant = self.conversation(request.prompt)
        turns, assistant = self.assistant_turns(assistant)
        messages += turns
        if not assistant:
            return {"messages": messages}, {}
        messages.append({"role": "assistant", "content": assistant})
        return {"messages": messages}, dict(CONTINUE_FINAL_MESSAGE)

    def create(self, client: Any) -> Callable[..., Awaitable[Any]]:
        return client.chat.completions.create  # type: ignore[no-any-return]

    def text(self, choice: Any) -> str:
        # A streamed chunk's choice has a delta; a whole reply's, the message.
        message = getattr(choice, "delta", None) or choice.message
        return getattr(message, "content", None) or ""

    def logprob_fields(self, top: int) -> dict[str, Any]:
        return {"logprobs": True, "top_logprobs": top}

    def logprobs(self, choice: Any) -> Logprobs | None:
        found = getattr(choice, "logprobs", None)
        content = getattr(found, "content", None) if found is not None else None
        if not content:
            return None
        by_id = [top_by_id([(t.token, t.logprob) for t in (entry.top_logprobs or [])]) for entry in content]
        top = [t for t in by_id if t is not None]
        return Logprobs([float(entry.logprob) for entry in content], top if len(top) == len(content) else None)
