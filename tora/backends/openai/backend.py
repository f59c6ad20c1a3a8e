"""`OpenAIBackend`: a server (`Connection`) and the protocol that talks to it, behind the backend interface."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from tora.backends.base import Backend, GenerationRequest, StreamEvent
from tora.backends.openai.chat import ChatContinue
from tora.backends.openai.completions import Completions
from tora.backends.openai.connection import Connection
from tora.backends.openai.protocol import Protocol, read, whole
from tora.backends.openai.spec import ServerSpec
from tora.backends.openai.tools import Tools

# vLLM's extensions: the sampled ids with each chunk, and alternatives named by id.
RETURN_TOKEN_IDS = {"return_token_ids": True, "return_tokens_as_token_ids": True}


def protocol_for(spec: ServerSpec) -> Protocol:
    if spec.template is not None or spec.protocol == "completions":
        return Completions(spec)  # a local template renders chat prompts: text goes to /completions
    if spec.protocol == "tools":
        return Tools(spec)
    return ChatContinue(spec)


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, spec: ServerSpec, *, connection: Connection | None = None,
                 protocol: Protocol | None = None) -> None:
        self.spec = spec
        self.connection = connection or Connection(spec)
        self.protocol = protocol or protocol_for(spec)

    @property
    def model(self) -> str:
        """The model the server says it runs (every episode's view shares the connection)."""
        return self.connection.model

    @model.setter
    def model(self, value: str) -> None:
        self.connection.model = value

    @property
    def server(self) -> str:
        return self.connection.url

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return self.protocol.format_chat(messages)

    def for_episode(self, problem: Any, sample_index: int) -> OpenAIBackend:
        protocol = self.protocol.for_episode()
        if protocol is self.protocol:
            return self
        return OpenAIBackend(self.spec, connection=self.connection, protocol=protocol)

    async def aclose(self) -> None:
        await self.connection.aclose()

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        answered = self.protocol.answered(request)
        if answered is not None:
            for event in answered:
                yield event
            return
        conn, spec = self.connection, self.spec
        client = conn.session()
        params: dict[str, Any] = {
            "model": await conn.resolve_model(),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": spec.stream,
        }
        if spec.stream:
            params["stream_options"] = {"include_usage": True}
        if request.seed is not None:
            params["seed"] = request.seed
        tokens = self.protocol.records_tokens
        ids = tokens and await conn.gives_token_ids()
        # With ids the stream is cut here (the tail past a stop is then known), never at the server.
        if conn.reports_stops and request.stop and self.protocol.sends_stops and not ids:
            params["stop"] = list(request.stop)
        fields, extensions = self.protocol.fields(request)
        params |= fields
        if tokens and request.logprobs and await conn.gives_logprobs():
            params |= self.protocol.logprob_fields(request.top_logprobs)
        if ids:
            extensions |= RETURN_TOKEN_IDS
        extra = {**spec.body, **extensions}
        if extra:
            params["extra_body"] = extra
        create = self.protocol.create(client)
        async with conn.slots:
            response = await conn.with_retries(f"POST {self.protocol.endpoint}", lambda: create(**params))
            try:
                async for event in read(response if spec.stream else whole(response), self.protocol, request, conn):
                    yield event
            except Exception as exc:
                broken = conn.broken(exc)
                if broken is None:
                    raise
                raise broken from exc
            finally:
                if spec.stream:
                    # Closing the response aborts the request: the server stops generating.
                    await response.close()
