"""One OpenAI-compatible server as tora talks to it: the client, retries, errors that name it.

Shared by every protocol and by every episode's view of the backend: the
requests in flight (`slots`), the model the server says it runs and whether
it reports which stop string fired are facts about the server, learnt once.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tora.backends.openai.spec import ServerSpec
from tora.errors import BackendError

T = TypeVar("T")
_MAX_WAIT_S = 30.0
LLAMA_CPP_PYTHON = "me"  # how llama_cpp.server's model listing names the owner
_CONTEXT_TOO_LONG = re.compile(r"context length|context window|maximum context|too long|exceeds? the|n_ctx", re.I)


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


class Connection:
    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.url = spec.base_url
        self.model = spec.model or "?"  # the server's model, asked for at the first call
        self._key = spec.api_key()
        # Whether stop strings go to the server (see the package docstring): learnt.
        self.reports_stops = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._owner: str | None = None  # who the server says owns its model ("vllm"), once asked
        self.slots = asyncio.Semaphore(spec.concurrency)
        self._model_lock = asyncio.Lock()

    def session(self) -> Any:
        """The HTTP client, one per event loop (each `asyncio.run` gets its own)."""
        import openai

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._client = openai.AsyncOpenAI(
                # A local server without a key takes any; the client insists on one.
                api_key=self._key or "no-key",
                base_url=self.url,
                max_retries=0,  # retried here, with messages that name the server
                timeout=openai.Timeout(self.spec.timeout_s, connect=min(self.spec.timeout_s, 10.0)),
            )
            self.slots = asyncio.Semaphore(self.spec.concurrency)
            self._model_lock = asyncio.Lock()
            self._loop = loop
        return self._client

    async def with_retries(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
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
                        f"server {self.url} answered {status} to {what} {tries} times "
                        f"({_message(exc)}); gave up after {time.monotonic() - t0:.1f} s"
                    ) from exc
                wait = _retry_after(exc) or delay
            except openai.APIConnectionError as exc:
                if attempt == tries:
                    cause = exc.__cause__ or exc
                    raise BackendError(
                        f"cannot reach the server at {self.url} ({type(cause).__name__}: {cause}) after "
                        f"{tries} tries in {time.monotonic() - t0:.1f} s: is it running, and are the host, port "
                        "and path (usually ending in /v1) right?"
                    ) from exc
                wait = delay
            await asyncio.sleep(min(wait, _MAX_WAIT_S) * random.uniform(0.8, 1.2))
            delay *= 2
        raise AssertionError("unreachable")

    def broken(self, exc: Exception) -> BackendError | None:
        """The error for a reply that failed after it began, or None if `exc` is not the server's."""
        import openai

        if isinstance(exc, openai.APIConnectionError):
            return BackendError(f"server {self.url}: the connection broke in the middle of an answer "
                                f"({exc.__cause__ or exc})")
        if isinstance(exc, openai.APIError):  # an error event in the stream
            return BackendError(f"server {self.url} failed in the middle of an answer: {_message(exc)}")
        return None

    async def _status_error(self, exc: Any) -> BackendError:
        status, said = exc.status_code, _message(exc)
        if status in (401, 403):
            return BackendError(f"server {self.url} refused the request ({status}: {said}): put its API key "
                                f"in {self.spec.key_hint}")
        if status == 404:
            served = await self._served_models()
            listed = f"; it serves {', '.join(served)}" if served else ""
            return BackendError(f"server {self.url} has no model {self.model!r} or no such endpoint "
                                f"(404: {said}){listed}; check the model name and that the URL ends in /v1")
        if _CONTEXT_TOO_LONG.search(said):
            return BackendError(f"server {self.url}: the request does not fit the model's context ({status}: "
                                f"{said}); lower --max-tokens-per-call or serve the model with a longer context")
        return BackendError(f"server {self.url} rejected the request ({status}: {said})")

    async def _served_models(self) -> list[str]:
        try:
            page = await self.session().models.list()
        except Exception:
            return []
        return [str(m.id) for m in page.data]

    async def resolve_model(self) -> str:
        if self.spec.model:
            return self.spec.model
        async with self._model_lock:
            if self.model == "?":
                page = await self.with_retries("GET /models", self.session().models.list)
                served = [str(m.id) for m in page.data]
                if len(served) != 1:
                    raise BackendError(f"server {self.url} serves {len(served)} models ({', '.join(served)}): "
                                       f"name one in the spec, openai:MODEL@{self.url}")
                self.model = served[0]
        return self.model

    async def owner(self) -> str:
        """Who the server's model listing says owns its model ("vllm", "sglang", "me" for
        llama-cpp-python's server), asked once; "" when it has no listing."""
        if self._owner is None:
            import openai

            try:
                page = await self.session().models.list()
            except openai.APIStatusError:
                self._owner = ""  # it answered: no listing
            except Exception:
                return ""  # not cached: the next request asks again
            else:
                owners = {str(m.id): str(getattr(m, "owned_by", "") or "") for m in page.data}
                self._owner = owners.get(self.model, next(iter(owners.values()), ""))
        return self._owner

    async def gives_token_ids(self) -> bool:
        """Whether to ask for the sampled ids: as the spec says, or else when the server is vLLM,
        whose `return_token_ids` other servers would refuse."""
        if self.spec.token_ids is not None:
            return self.spec.token_ids
        return await self.owner() == "vllm"

    async def gives_logprobs(self) -> bool:
        """Whether to ask for logprobs: as the spec says, or else unless the server is
        llama-cpp-python's (it sorts the whole vocabulary in Python for each token: 14 times
        slower decoding of the embedded model, measured)."""
        if self.spec.logprobs is not None:
            return self.spec.logprobs
        return await self.owner() != LLAMA_CPP_PYTHON

    async def aclose(self) -> None:
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            await client.close()
