"""The HTTP side of `tora serve`: an OpenAI-compatible API whose model is the tool loop.

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (both streamed
or not), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health` (never
behind the key: it tells load, not data).

Request fields map onto the trajectory: the last user message (chat) or the
prompt (completions; a list is one choice per prompt) is the problem, filled
into the server's prompt template; `temperature`, `top_p`, `seed` are the
sampling (absent: the server's defaults, greedy unless `--temperature`);
`max_tokens` (or `max_completion_tokens`) is the completion token budget of
the whole trajectory (absent: `--max-tokens`; above `--max-tokens-limit`: a
400); `stop` ends the model's writing and cuts the returned text; `n`
samples per problem (sample k gets seed + k).

Every failure is an OpenAI error body, `{"error": {"message", "type",
"param", "code"}}`, with the matching status.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Scope

from sandbox.service.asgi import BodyLimit
from tora.data import problem_from_text
from tora.engine import SolveConfig
from tora.serve import protocol as p
from tora.serve.choices import Choices, ChoiceSpec, Kind, TrajectoryFailed, error_body
from tora.serve.runner import Runner


@dataclass(frozen=True)
class ServeLimits:
    max_tokens: int = 16384  # the largest token budget a request may ask for
    max_body_bytes: int = 1 << 20
    max_choices: int = 16  # prompts x n in one request


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_ or _type_for(status), param, code

    def response(self) -> JSONResponse:
        body = error_body(str(self), self.type, self.param, self.code)
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body.model_dump(), status_code=self.status, headers=headers)


_STATUS_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


def _type_for(status: int) -> str:
    return _STATUS_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


# --- request parsing ---------------------------------------------------------------


def _where(loc: tuple[int | str, ...]) -> str:
    # pydantic names the member of a union it tried ("str", "list[str]"): not a field.
    parts = [str(x) for x in loc if isinstance(x, int) or ("[" not in x and x not in {"str", "int", "float", "bool"})]
    return ".".join(parts)


def parse(model: type[p.CompletionRequest] | type[p.ChatCompletionRequest], raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        message = str(err["msg"]).removeprefix("Value error, ")
        param = _where(tuple(err["loc"])) or (message.split(":", 1)[0] if ":" in message else None)
        raise ApiError(400, f"{param}: {message}" if param and not message.startswith(f"{param}:") else message,
                       param=param) from exc


def request_config(base: SolveConfig, req: p.CompletionRequest | p.ChatCompletionRequest, limits: ServeLimits,
                   k: int) -> SolveConfig:
    """The trajectory's configuration: the server's, with what the request sets."""
    budget = req.token_budget()
    if budget is not None and budget > limits.max_tokens:
        raise ApiError(400, f"max_tokens: {budget} is more than this server allows ({limits.max_tokens})",
                       param="max_tokens")
    max_tokens = budget or base.limits.max_tokens
    seed = req.seed if req.seed is not None else base.sampling.seed
    sampling = dataclasses.replace(
        base.sampling,
        temperature=base.sampling.temperature if req.temperature is None else req.temperature,
        top_p=base.sampling.top_p if req.top_p is None else req.top_p,
        seed=None if seed is None else seed + k,
    )
    per_call = min(base.limits.max_tokens_per_call, max_tokens)
    return SolveConfig(
        sampling=sampling,
        limits=dataclasses.replace(base.limits, max_tokens=max_tokens, max_tokens_per_call=per_call),
        render=dataclasses.replace(base.render, extra_stop=(*base.render.extra_stop, *req.stop_list())),
    )


# --- middleware and auth ------------------------------------------------------------


def _key_check(api_key: str | None) -> Any:
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken says nothing about how much of the key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    return check


# --- the app -----------------------------------------------------------------------


def create_app(runner: Runner, *, served_name: str, limits: ServeLimits, api_key: str | None) -> ASGIApp:
    app = FastAPI(title="tora serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    names = {served_name, runner.spec}
    auth = [Depends(_key_check(api_key))]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return ApiError(exc.status_code, f"{message}: {request.method} {request.url.path}").response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    def card() -> p.ModelCard:
        return p.ModelCard(id=served_name, created=created, tora={
            "spec": runner.spec, "backend": runner.backend.name, "model": runner.backend.model,
            "prompt": runner.template.name})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return runner.health()

    @app.get("/v1/models", dependencies=auth)
    async def models() -> p.ModelList:
        return p.ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str) -> p.ModelCard:
        if model_id not in names:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {served_name!r}",
                           param="model", code="model_not_found")
        return card()

    async def complete(request: Request, kind: Kind) -> Response:
        req: p.CompletionRequest | p.ChatCompletionRequest = parse(
            p.ChatCompletionRequest if kind == "chat" else p.CompletionRequest, await request.body())
        if req.model not in names:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {served_name!r}",
                           param="model", code="model_not_found")
        texts = [req.problem_text()] if isinstance(req, p.ChatCompletionRequest) else req.prompts()
        if any(not t.strip() for t in texts):
            field = "messages" if kind == "chat" else "prompt"
            raise ApiError(400, f"{field}: the problem is empty", param=field)
        if len(texts) * req.n > limits.max_choices:
            raise ApiError(400, f"n: {len(texts)} prompt(s) x n={req.n} is more than {limits.max_choices} choices",
                           param="n")
        configs = [request_config(runner.config, req, limits, k) for k in range(req.n)]
        endpoint = request.url.path
        specs = []
        for text in texts:
            problem = problem_from_text(text, source="served")
            problem.meta["endpoint"] = endpoint
            specs += [ChoiceSpec(problem, configs[k], k) for k in range(req.n)]
        if not runner.admit(len(specs)):
            raise ApiError(429, f"the server is busy ({runner.max_admitted} trajectories running or queued); "
                                "retry later", code="server_busy")
        choices = Choices(runner, specs, req.stop_list(), request.receive, kind=kind, model=req.model,
                          stream=req.stream)
        if req.stream:
            return StreamingResponse(choices.events(req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            body: BaseModel | None = await choices.response()
        except TrajectoryFailed as exc:
            raise ApiError(exc.status, str(exc), code=exc.code) from exc
        if body is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        return Response(body.model_dump_json(), media_type="application/json")

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        return await complete(request, "chat")

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        return await complete(request, "text")

    def too_large(scope: Scope) -> ASGIApp:
        return ApiError(413, f"the request body is larger than this server accepts ({limits.max_body_bytes} bytes)",
                        code="request_too_large").response()

    return BodyLimit(app, limits.max_body_bytes, too_large)
