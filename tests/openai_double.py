"""A scripted OpenAI-compatible server on loopback (Starlette under uvicorn, in a thread).

A test double for the HTTP protocol only: its replies are scripted by the
test, no model stands behind them. It is how the tests reach what no small
real server does: native tool calls (the 270M base model cannot make them),
429/5xx answers, a server that reports `stop_reason`, a slow stream that a
client abandons. Every request is kept, with its headers, so that tests check
what the client sent.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tora.backends.llama_server import free_port


@dataclass
class Status:
    """An error answer."""

    code: int
    message: str = "scripted error"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Stream:
    """A streamed answer: these chunks as server-sent events, `delay` seconds apart."""

    chunks: list[dict[str, Any]]
    delay: float = 0.0
    done: bool = True  # end with data: [DONE]


@dataclass
class Whole:
    """An answer that is not streamed: this JSON body (as for a request with stream false)."""

    body: dict[str, Any]


Reply = Status | Stream | Whole


def completion_chunks(pieces: list[str], finish: str | None = "stop", **extra: Any) -> list[dict[str, Any]]:
    """/completions chunks; `extra` goes into the last choice (e.g. stop_reason=...)."""
    chunks = [{"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "scripted",
               "choices": [{"index": 0, "text": p, "logprobs": None, "finish_reason": None}]} for p in pieces]
    chunks.append({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "scripted",
                   "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": finish, **extra}]})
    return chunks


def chat_chunks(pieces: list[str], finish: str | None = "stop", tool_code: str | list[str] | None = None,
                **extra: Any) -> list[dict[str, Any]]:
    """/chat/completions chunks: content pieces, then a python tool call whose arguments
    arrive in two fragments, as servers stream them. `tool_code` may be a list: one call
    each, with ids call_x0, call_x1, ..."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **more: Any) -> dict[str, Any]:
        return {"id": "chat-1", "object": "chat.completion.chunk", "created": 0, "model": "scripted",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, **more}]}

    chunks = [chunk({"role": "assistant", "content": p}) for p in pieces]
    codes = [tool_code] if isinstance(tool_code, str) else list(tool_code or [])
    for i, code in enumerate(codes):
        arguments = json.dumps({"code": code})
        cut = len(arguments) // 2
        call_id = "call_x" if isinstance(tool_code, str) else f"call_x{i}"
        chunks.append(chunk({"tool_calls": [{"index": i, "id": call_id, "type": "function",
                                             "function": {"name": "python", "arguments": arguments[:cut]}}]}))
        chunks.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": arguments[cut:]}}]}))
    chunks.append(chunk({}, finish, **extra))
    return chunks


def chat_reply(content: str | None, tool_codes: Sequence[str] = (), finish: str = "stop",
               ids: list[str] | None = None) -> dict[str, Any]:
    """A whole /chat/completions answer: the message, with a python tool call per code."""
    calls = [{"id": (ids or [f"call_w{i}" for i in range(len(tool_codes))])[i], "type": "function",
              "function": {"name": "python", "arguments": json.dumps({"code": code})}}
             for i, code in enumerate(tool_codes)]
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {"id": "chat-1", "object": "chat.completion", "created": 0, "model": "scripted",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}}


@dataclass
class Seen:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


class ScriptedServer:
    """`reply(path, body, n)` scripts the answer to the n-th request (0-based)."""

    def __init__(self, reply: Callable[[str, dict[str, Any], int], Reply], models: tuple[str, ...] = ("scripted",),
                 owned_by: str = "test"):
        self.reply = reply
        self.models = models
        self.owned_by = owned_by  # "vllm": the client takes the server for vLLM
        self.port = free_port()
        self.requests: list[Seen] = []
        self.disconnected = threading.Event()
        self.completed = 0
        self.in_flight = 0
        self.max_in_flight = 0
        app = Starlette(routes=[
            Route("/v1/completions", self._generate, methods=["POST"]),
            Route("/v1/chat/completions", self._generate, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
        ])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def bodies(self, path_end: str = "") -> list[dict[str, Any]]:
        return [s.body for s in self.requests if s.path.endswith(path_end)]

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "owned_by": self.owned_by}
                                                        for m in self.models]})

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        n = len(self.requests)
        self.requests.append(Seen(request.url.path, body, dict(request.headers)))
        answer = self.reply(request.url.path, body, n)
        if isinstance(answer, Status):
            return JSONResponse({"error": {"message": answer.message, "type": "scripted", "code": answer.code}},
                                status_code=answer.code, headers=answer.headers)
        if isinstance(answer, Whole):
            self.completed += 1
            return JSONResponse({**answer.body, "model": body.get("model") or answer.body["model"]})
        return StreamingResponse(self._events(answer, body.get("model")), media_type="text/event-stream")

    async def _events(self, answer: Stream, model: str | None) -> AsyncIterator[str]:
        """The chunks, with the model name asked for (as servers answer)."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        finished = False
        try:
            for chunk in answer.chunks:
                yield f"data: {json.dumps({**chunk, 'model': model or chunk['model']})}\n\n"
                await asyncio.sleep(answer.delay)
            if answer.done:
                yield "data: [DONE]\n\n"
            finished = True
            self.completed += 1
        finally:
            self.in_flight -= 1
            if not finished:
                self.disconnected.set()

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the scripted server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the scripted server did not stop"
