"""protocol=completions, and any protocol with template=: the prompt text goes to /completions.

The recorded prompt is then exactly what the model read: a completion
prompt as it is, a chat prompt rendered here with the model's own chat
template (`template=PATH`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from tora.backends import chat_template
from tora.backends.base import GenerationRequest
from tora.backends.openai.protocol import Logprobs, Protocol, top_by_id
from tora.backends.openai.spec import ServerSpec
from tora.errors import PromptError


class Completions(Protocol):
    endpoint = "/completions"

    def __init__(self, spec: ServerSpec) -> None:
        super().__init__(spec)
        self._template = chat_template.load(spec.template) if spec.template is not None else None

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        if self._template is None:
            raise PromptError(f"protocol=completions sends text to {self.spec.base_url}/completions: add "
                              "template=PATH (the model's chat template) to the spec, or use "
                              "protocol=chat-continue or tools")
        return self._template.render(messages)

    def fields(self, request: GenerationRequest) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"prompt": request.prompt}, {}

    def create(self, client: Any) -> Callable[..., Awaitable[Any]]:
        return client.completions.create  # type: ignore[no-any-return]

    def text(self, choice: Any) -> str:
        return choice.text or ""

    def logprob_fields(self, top: int) -> dict[str, Any]:
        return {"logprobs": top}  # the legacy field: how many alternatives; 0 = the sampled token's only

    def logprobs(self, choice: Any) -> Logprobs | None:
        found = choice.logprobs
        values = getattr(found, "token_logprobs", None) if found is not None else None
        if not values or any(v is None for v in values):
            return None
        tops = getattr(found, "top_logprobs", None) or []
        by_id = [top_by_id(list((t or {}).items())) for t in tops]
        top = [t for t in by_id if t is not None]
        return Logprobs([float(v) for v in values], top if len(top) == len(values) else None)
