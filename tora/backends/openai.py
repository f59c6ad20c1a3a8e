"""OpenAI-compatible servers (vLLM, llama.cpp's servers, SGLang, hosted APIs) as a backend.

    openai:MODEL@http://host:port/v1?protocol=completions&concurrency=8

MODEL may be left out (`openai:http://host:port/v1`) when the server serves
one model: it is asked (GET /models). Options, after `?` (see `ServerSpec`):

    protocol      completions (default; base models: the prompt text goes to /completions),
                  chat-continue (the assistant message is continued on /chat/completions,
                  with vLLM's `continue_final_message`), or tools (native tool calls: a
                  `python` tool whose result goes back as a `tool` message)
    template      a local chat template (GGUF file, Hugging Face dir, tokenizer_config.json
                  or Jinja file): chat prompts are rendered here and sent to /completions
    concurrency   requests in flight at once (default 8; servers batch them)
    api_key_env   the environment variable holding the API key (default: TORA_OPENAI_API_KEY,
                  then OPENAI_API_KEY; none for a local server without one)
    retries       retries of a request that failed with 429, 5xx or a connection error
                  (default 4, exponential backoff from `backoff` seconds, default 0.5)
    timeout       seconds without a byte from the server before a request fails (default 600)
    body.FIELD    a request field of the server's own, its value JSON (or a string), e.g.
                  body.repeat_penalty=1 for llama_cpp.server, whose default of 1.1 would
                  otherwise change sampling (the spec is recorded, so these are too)

The key is read from the environment and held by the client only: the spec
names at most the variable, and a URL with credentials in it is refused
(the spec is recorded with every trajectory).

Stops: tora's `StopScanner` always cuts the streamed text, so `Done.stop_string`
is right whatever the server says. The stop strings also go to the server,
which then stops without streaming the rest, but only once a response has
shown that the server reports which one fired (vLLM's `stop_reason`, SGLang's
`matched_stop`): a server that cuts at a stop string and reports only
`finish_reason: stop` (llama-cpp-python's) would make a stop string and the
model's end of text look alike. Until then the stream is closed at the stop,
which aborts the request on the server.

Chat protocols keep the record the same as any other: the prompt is the
role-tagged transcript of tora.backends.transcript (or the model's own chat
template with `template=`), the text steps hold the model's words with their
fences. With `protocol=tools` a tool call is streamed as the text
"```python\\n<code>" and ends at the closing fence, exactly as if the model had
written the block; the next request turns each python block and output block
of the context back into an assistant tool call and its `tool` message.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from tora import fences
from tora.backends import chat_template, transcript
from tora.backends.base import Backend, Delta, Done, GenerationRequest, StopScanner, StreamEvent
from tora.errors import BackendError, ModelSpecError, PromptError

Protocol = Literal["completions", "chat-continue", "tools"]
KEY_VARIABLES = ("TORA_OPENAI_API_KEY", "OPENAI_API_KEY")
# Continue the last (assistant) message instead of opening a new turn: vLLM's
# extension to /chat/completions; servers without it ignore the fields.
CONTINUE_FINAL_MESSAGE = {"continue_final_message": True, "add_generation_prompt": False}
# Fields in which servers say which stop string ended a completion.
_STOP_REPORTS = ("stop_reason", "matched_stop")
_MAX_WAIT_S = 30.0
_CONTEXT_TOO_LONG = re.compile(r"context length|context window|maximum context|too long|exceeds? the|n_ctx", re.I)
_USERINFO = re.compile(r"(https?://)[^/@]*@")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

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

T = TypeVar("T")


@dataclass(frozen=True)
class ServerSpec:
    """What `openai:MODEL@URL?options` says (never the key itself)."""

    model: str  # "" = the server's only model
    base_url: str
    protocol: Protocol = "completions"
    template: Path | None = None
    concurrency: int = 8
    api_key_env: str | None = None
    retries: int = 4
    backoff_s: float = 0.5
    timeout_s: float = 600.0
    body: dict[str, Any] = field(default_factory=dict)  # extra request fields, e.g. repeat_penalty

    @classmethod
    def parse(cls, arg: str) -> ServerSpec:
        shown = _USERINFO.sub(r"\1***@", arg)  # a message must not repeat credentials either
        where = f"model spec 'openai:{shown}'"
        at = max(arg.find("@http://"), arg.find("@https://"))
        if at >= 0:
            model, url = arg[:at], arg[at + 1 :]
        elif arg.startswith(("http://", "https://")):
            model, url = "", arg
        else:
            raise ModelSpecError(f"{where}: write openai:MODEL@http://HOST:PORT/v1 (MODEL may be left out)")
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            raise ModelSpecError(f"{where}: credentials in the URL would be recorded; "
                                 f"put the key in {KEY_VARIABLES[0]} or {KEY_VARIABLES[1]} instead")
        if not parts.hostname:
            raise ModelSpecError(f"{where}: the URL {url!r} names no host")
        base_url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        options: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in options:
                raise ModelSpecError(f"{where}: option {key!r} is given twice")
            options[key] = value
        known = {"protocol", "template", "concurrency", "api_key_env", "retries", "backoff", "timeout"}
        body: dict[str, Any] = {}
        for key in [k for k in options if k.startswith("body.")]:
            if not key[5:]:
                raise ModelSpecError(f"{where}: option 'body.' names no field")
            try:
                body[key[5:]] = json.loads(options[key])
            except ValueError:
                body[key[5:]] = options[key]
        unknown = sorted(set(options) - known - {f"body.{k}" for k in body})
        if unknown:
            raise ModelSpecError(f"{where}: unknown option {unknown[0]!r}; options: {', '.join(sorted(known))}, "
                                 "body.FIELD")

        def number(name: str, kind: Callable[[str], T], default: T, low: float, strict: bool = False) -> T:
            if name not in options:
                return default
            try:
                value = kind(options[name])
            except ValueError:
                value = None  # type: ignore[assignment]
            if not isinstance(value, int | float) or value < low or (strict and value == low):
                bound = f"> {low}" if strict else f">= {low}"
                raise ModelSpecError(f"{where}: option {name} must be a number {bound}, not {options[name]!r}")
            return value

        protocol = options.get("protocol", "completions")
        if protocol not in get_args(Protocol):
            raise ModelSpecError(f"{where}: protocol must be one of {', '.join(get_args(Protocol))}, not {protocol!r}")
        template = Path(options["template"]).expanduser() if options.get("template") else None
        if template is not None and protocol == "tools":
            raise ModelSpecError(f"{where}: template= renders prompts for /completions; protocol=tools needs the "
                                 "server's own template")
        key_env = options.get("api_key_env") or None
        if key_env is not None and not _ENV_NAME.match(key_env):
            raise ModelSpecError(f"{where}: api_key_env must name an environment variable, not {key_env!r}")
        return cls(
            model=model,
            base_url=base_url,
            protocol=protocol,  # type: ignore[arg-type]
            template=template,
            concurrency=number("concurrency", int, 8, 1),
            api_key_env=key_env,
            retries=number("retries", int, 4, 0),
            backoff_s=number("backoff", float, 0.5, 0, strict=True),
            timeout_s=number("timeout", float, 600.0, 0, strict=True),
            body=body,
        )

    def api_key(self) -> str | None:
        """The key from the environment; the variable api_key_env names must be set."""
        if self.api_key_env is not None:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ModelSpecError(f"api_key_env={self.api_key_env}: the environment variable is not set")
            return value
        for name in KEY_VARIABLES:
            if os.environ.get(name):
                return os.environ[name]
        return None

    @property
    def key_hint(self) -> str:
        names = (self.api_key_env,) if self.api_key_env else KEY_VARIABLES
        return " or ".join(names)


def _message(exc: Exception) -> str:
    """The server's own words about a failed request, short."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        text = inner.get("message") if isinstance(inner, dict) else inner
        if text is None and isinstance(inner, dict):
            text = inner.get("detail")
        if text:
            return str(text)[:500]
    text = str(getattr(exc, "message", "") or exc)
    return text[:500]


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


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


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.server = spec.base_url
        self.model = spec.model or "?"  # the server's model, asked for at the first call
        self._key = spec.api_key()
        self._template = chat_template.load(spec.template) if spec.template is not None else None
        # Whether stop strings go to the server (see the module docstring): learnt.
        self._server_stops = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._slots = asyncio.Semaphore(spec.concurrency)
        self._model_lock = asyncio.Lock()

    # -- prompts ----------------------------------------------------------------

    @property
    def _on_completions(self) -> bool:
        return self.spec.protocol == "completions" or self._template is not None

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        if self._template is not None:
            return self._template.render(messages)
        if self.spec.protocol == "completions":
            raise PromptError(f"protocol=completions sends text to {self.server}/completions: add template=PATH "
                              "(the model's chat template) to the spec, or use protocol=chat-continue or tools")
        return transcript.render(messages)

    # -- the client ---------------------------------------------------------------

    def _session(self) -> Any:
        """The HTTP client, one per event loop (each `asyncio.run` gets its own)."""
        import openai

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._client = openai.AsyncOpenAI(
                # A local server without a key takes any; the client insists on one.
                api_key=self._key or "no-key",
                base_url=self.server,
                max_retries=0,  # retried here, with messages that name the server
                timeout=openai.Timeout(self.spec.timeout_s, connect=min(self.spec.timeout_s, 10.0)),
            )
            self._slots = asyncio.Semaphore(self.spec.concurrency)
            self._model_lock = asyncio.Lock()
            self._loop = loop
        return self._client

    async def _with_retries(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        import openai

        t0 = time.monotonic()
        delay = self.spec.backoff_s
        tries = self.spec.retries + 1
        for attempt in range(1, tries + 1):
            try:
                return await call()
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status != 429 and status < 500:
                    raise await self._status_error(exc) from exc
                if attempt == tries:
                    raise BackendError(
                        f"server {self.server} answered {status} to {what} {tries} times "
                        f"({_message(exc)}); gave up after {time.monotonic() - t0:.1f} s"
                    ) from exc
                wait = _retry_after(exc) or delay
            except openai.APIConnectionError as exc:
                if attempt == tries:
                    cause = exc.__cause__ or exc
                    raise BackendError(
                        f"cannot reach the server at {self.server} ({type(cause).__name__}: {cause}) after "
                        f"{tries} tries in {time.monotonic() - t0:.1f} s: is it running, and are the host, port "
                        "and path (usually ending in /v1) right?"
                    ) from exc
                wait = delay
            await asyncio.sleep(min(wait, _MAX_WAIT_S) * random.uniform(0.8, 1.2))
            delay *= 2
        raise AssertionError("unreachable")

    async def _status_error(self, exc: Any) -> BackendError:
        status, said = exc.status_code, _message(exc)
        if status in (401, 403):
            return BackendError(f"server {self.server} refused the request ({status}: {said}): put its API key "
                                f"in {self.spec.key_hint}")
        if status == 404:
            served = await self._served_models()
            listed = f"; it serves {', '.join(served)}" if served else ""
            return BackendError(f"server {self.server} has no model {self.model!r} or no such endpoint "
                                f"(404: {said}){listed}; check the model name and that the URL ends in /v1")
        if _CONTEXT_TOO_LONG.search(said):
            return BackendError(f"server {self.server}: the request does not fit the model's context ({status}: "
                                f"{said}); lower --max-tokens-per-call or serve the model with a longer context")
        return BackendError(f"server {self.server} rejected the request ({status}: {said})")

    async def _served_models(self) -> list[str]:
        try:
            page = await self._session().models.list()
        except Exception:
            return []
        return [str(m.id) for m in page.data]

    async def _resolve_model(self) -> str:
        if self.spec.model:
            return self.spec.model
        async with self._model_lock:
            if self.model == "?":
                page = await self._with_retries("GET /models", self._session().models.list)
                served = [str(m.id) for m in page.data]
                if len(served) != 1:
                    raise BackendError(f"server {self.server} serves {len(served)} models ({', '.join(served)}): "
                                       f"name one in the spec, openai:MODEL@{self.server}")
                self.model = served[0]
        return self.model

    async def aclose(self) -> None:
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            await client.close()

    # -- generation -----------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        import openai

        client = self._session()
        params: dict[str, Any] = {
            "model": await self._resolve_model(),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.seed is not None:
            params["seed"] = request.seed
        tools = self.spec.protocol == "tools"
        if self._server_stops and request.stop and not tools:
            # Not with tools: a stop string in the code of a tool call would cut the call.
            params["stop"] = list(request.stop)
        extra = dict(self.spec.body)
        if self._on_completions:
            params["prompt"] = request.prompt
            create = client.completions.create
        else:
            params["messages"], continued = self._messages(request.prompt, tools)
            if continued:
                extra.update(CONTINUE_FINAL_MESSAGE)
            if tools:
                params["tools"] = [PYTHON_TOOL]
            create = client.chat.completions.create
        if extra:
            params["extra_body"] = extra
        async with self._slots:
            response = await self._with_retries(f"POST {'/completions' if self._on_completions else '/chat/completions'}",
                                                lambda: create(**params))
            try:
                async for event in self._events(response, request, chat=not self._on_completions):
                    yield event
            except openai.APIConnectionError as exc:
                raise BackendError(f"server {self.server}: the connection broke in the middle of an answer "
                                   f"({exc.__cause__ or exc})") from exc
            except openai.APIError as exc:  # an error event in the stream
                raise BackendError(f"server {self.server} failed in the middle of an answer: {_message(exc)}") from exc
            finally:
                # Closing the response aborts the request: the server stops generating.
                await response.close()

    def _messages(self, prompt: str, tools: bool) -> tuple[list[dict[str, Any]], bool]:
        """The chat request for a context (a transcript plus the assistant's turn so far);
        True when it ends in an assistant message to continue."""
        parsed = transcript.parse(prompt)
        if parsed is None:
            raise BackendError(f"protocol={self.spec.protocol} sends chat messages, and this prompt is not a chat "
                               "transcript: use a chat prompt (--prompt chat), or protocol=completions")
        history, assistant = parsed
        messages: list[dict[str, Any]] = list(history)
        if tools:
            turns, assistant = transcript.tool_turns(assistant)
            messages += turns
        if assistant:
            messages.append({"role": "assistant", "content": assistant})
        return messages, bool(assistant)

    async def _events(self, response: Any, request: GenerationRequest, *, chat: bool) -> AsyncGenerator[StreamEvent, None]:
        scanner = StopScanner(request.stop)
        finish: str | None = None
        reported: object = None
        usage: Any = None
        pieces = 0
        emitted = ""
        calls: dict[int, dict[str, str]] = {}
        async for chunk in response:
            if getattr(chunk, "model", None):
                # What the server says it ran is the record's model (a server
                # with one model may ignore the name asked for).
                self.model = str(chunk.model)
            if getattr(chunk, "usage", None) is not None:
                usage = chunk.usage
            for choice in chunk.choices or []:
                extra = choice.model_extra or {}
                for key in _STOP_REPORTS:
                    if key in extra:
                        self._server_stops = True
                        reported = extra[key] if extra[key] is not None else reported
                if chat:
                    delta = choice.delta
                    text = getattr(delta, "content", None) or ""
                    for tc in getattr(delta, "tool_calls", None) or []:
                        pieces += 1
                        slot = calls.setdefault(tc.index or 0, {"name": "", "arguments": ""})
                        if tc.function is not None:
                            slot["name"] = slot["name"] or (tc.function.name or "")
                            slot["arguments"] += tc.function.arguments or ""
                else:
                    text = choice.text or ""
                if text:
                    pieces += 1
                    out = scanner.feed(text)
                    if out:
                        emitted += out
                        yield Delta(out)
                    if scanner.matched is not None:
                        yield self._done("stop", scanner.matched, usage, pieces, aborted=True)
                        return
                finish = choice.finish_reason or finish
        rest = scanner.flush()
        if rest:
            emitted += rest
            yield Delta(rest)
        if calls:
            for event in self._tool_block(calls[min(calls)]["arguments"], request, emitted, finish, usage, pieces):
                yield event
            return
        if finish is None:
            raise BackendError(f"server {self.server}: the stream ended without a finish reason (the server dropped "
                               "the request; a llama-cpp-python server needs --interrupt_requests False to serve "
                               "several clients)")
        if finish == "length":
            yield self._done("length", None, usage, pieces)
        elif finish == "content_filter":
            raise BackendError(f"server {self.server} withheld the completion (finish_reason content_filter)")
        elif isinstance(reported, str) and reported in request.stop:
            yield self._done("stop", reported, usage, pieces)
        else:
            yield self._done("eos", None, usage, pieces)

    def _tool_block(self, arguments: str, request: GenerationRequest, emitted: str, finish: str | None,
                    usage: Any, pieces: int) -> list[StreamEvent]:
        """A python tool call, as the text of the python block the loop runs, and how it ends:
        at the closing fence as the loop's stops ask (it adds the fence itself), or at
        ```output under ToRA's protocol."""
        before = request.prompt + emitted
        opening = ("" if not before or before.endswith("\n") else "\n") + "```python\n"
        if finish == "length":  # cut off inside the call: an unclosed block, which nothing runs
            return [Delta(opening + arguments), self._done("length", None, usage, pieces)]
        block = Delta(opening + _code(arguments).rstrip("\n"))
        if fences.CLOSE_FENCE in request.stop:
            return [block, self._done("stop", fences.CLOSE_FENCE, usage, pieces)]
        stop = fences.OUTPUT_FENCE if fences.OUTPUT_FENCE in request.stop else None
        return [block, Delta(fences.CLOSE_FENCE), self._done("stop" if stop else "eos", stop, usage, pieces)]

    @staticmethod
    def _done(finish: Literal["stop", "length", "eos"], stop: str | None, usage: Any, pieces: int,
              aborted: bool = False) -> Done:
        # Streamed pieces are tokens on the servers we know; the server's count
        # is better when it sent one (not when we closed the stream early).
        if usage is not None and not aborted:
            return Done(finish, stop, int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0))
        return Done(finish, stop, 0, pieces)


def load_openai(arg: str) -> OpenAIBackend:
    try:
        import openai  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelSpecError("the openai backend needs the openai client: pip install 'tora-tir[openai]'") from exc
    return OpenAIBackend(ServerSpec.parse(arg))
