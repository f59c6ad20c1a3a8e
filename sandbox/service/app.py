"""The HTTP side of `tora sandbox serve`: SandboxFusion's and NeMo-Skills' routes on one app.

Routes (every one but ``/health`` behind the API key when one is set):
``POST /run_code``, ``POST /run_jupyter`` (SandboxFusion, ``sandbox.service.fusion``);
``POST /execute``, ``DELETE /sessions/{id}``, ``GET /sessions`` (NeMo-Skills,
``sandbox.service.nemo``); ``POST /sessions/{id}/fork`` (tora's own); ``GET /health``.

Every refusal is in the wire format of the route asked for: SandboxFusion's are
FastAPI's (``{"detail": [...]}`` for a bad field, 422; ``{"detail": "..."}``
otherwise), NeMo-Skills' are ``{"error": "..."}``; busy is 429 with
``Retry-After``. A failure of the machine (no kernel could start) is
SandboxFusion's ``SandboxError`` answer, or a 503 for NeMo-Skills.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Scope

from sandbox.errors import SandboxError
from sandbox.kernel import Kernel
from sandbox.result import CellResult
from sandbox.service import fusion, nemo
from sandbox.service.asgi import BodyLimit
from sandbox.service.sessions import Busy, NoSuchSession, Service
from sandbox.service.workdir import fetch_cell, fetched, setup_cell

M = TypeVar("M", bound=BaseModel)
NEMO_PATHS = ("/execute", "/sessions")


class WireError(Exception):
    """A refusal; ``detail`` is a message, or FastAPI's list of field errors for SandboxFusion."""

    def __init__(self, status: int, message: str, detail: list[dict[str, Any]] | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.detail, self.retry_after = status, detail, retry_after


def is_nemo(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in NEMO_PATHS)


def error_response(path: str, error: WireError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else {}
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if is_nemo(path):
        body: dict[str, Any] = {"error": str(error)}
    else:
        body = {"detail": error.detail if error.detail is not None else str(error)}
    return JSONResponse(body, status_code=error.status, headers=headers)


def parse(model: type[M], raw: bytes, *, fusion_format: bool) -> M:
    """The request, or a WireError naming the field (FastAPI's 422 for SandboxFusion, 400 for NeMo-Skills)."""
    status = 422 if fusion_format else 400
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        pos = exc.pos if isinstance(exc, json.JSONDecodeError) else 0
        raise WireError(status, f"the request body is not valid JSON: {exc}", detail=[
            {"type": "json_invalid", "loc": ["body", pos], "msg": "JSON decode error", "input": {},
             "ctx": {"error": str(exc)}}]) from exc
    if not isinstance(data, dict):
        raise WireError(status, "the request body must be a JSON object", detail=[
            {"type": "model_attributes_type", "loc": ["body"], "msg": "Input should be a valid dictionary or object",
             "input": data}])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        where = ".".join(str(x) for x in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        detail = [{"type": e["type"], "loc": ["body", *e["loc"]], "msg": e["msg"], "input": _jsonable(e.get("input"))}
                  for e in errors]
        raise WireError(status, f"{where}: {message}" if where else message, detail=detail) from exc


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _check_timeout(value: float | None, field: str, limit: float, *, fusion_format: bool) -> None:
    if value is not None and value > limit:
        message = f"{field}: {value:g} s is more than this server allows ({limit:g} s)"
        raise WireError(422 if fusion_format else 400, message, detail=[
            {"type": "less_than_equal", "loc": ["body", field], "msg": f"Input should be less than or equal to {limit:g}",
             "input": value}])


def memory_note(kernel: Kernel, memory_mb: int) -> str:
    """Lower a fresh kernel's memory limit as asked; a note when that could not be done."""
    if memory_mb <= 0 or kernel.lower_memory(memory_mb):
        return ""
    return f"memory_limit_MB not applied (no memory cgroup here); the kernel's limit is {kernel.policy.memory_mb} MB"


async def prepare(kernel: Kernel, files: dict[str, str | None], stdin: str | None) -> str | None:
    """Files and stdin for a fresh kernel; an error message if that failed."""
    cell = setup_cell(files, stdin)
    if cell is None:
        return None
    result = await kernel.execute(cell)
    if result.status != "ok":
        why = f"{result.error.ename}: {result.error.evalue}" if result.error else result.status
        return f"the request's files could not be written into the work dir ({why})"
    return None


async def fetch(kernel: Kernel, paths: list[str], ran: CellResult) -> tuple[dict[str, str], str]:
    if not paths:
        return {}, ""
    if ran.restarted:
        return {}, "fetch_files: the kernel was restarted, its files are gone"
    return fetched(await kernel.execute(fetch_cell(paths)), paths)


def sandbox_failed(answer: type[fusion.RunCodeResponse | fusion.RunJupyterResponse], message: str) -> JSONResponse:
    """SandboxFusion's answer when the sandbox, not the code, failed (its status ``SandboxError``, HTTP 200)."""
    return JSONResponse(answer(status=fusion.RunStatus.SandboxError, message=message).model_dump(mode="json"))


def create_app(service: Service, *, api_key: str | None, max_body_bytes: int) -> ASGIApp:
    app = FastAPI(title="tora sandbox serve", docs_url=None, redoc_url=None, openapi_url=None)
    limits = service.limits
    expected = api_key.encode() if api_key else None

    @app.middleware("http")
    async def auth(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        if expected is not None and request.url.path != "/health":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            # compare_digest: the time taken says nothing about how much of the key was right.
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
                return error_response(request.url.path, WireError(
                    401, "missing or wrong API key: send 'Authorization: Bearer <key>'"))
        return await call_next(request)

    @app.exception_handler(WireError)
    async def _wire(request: Request, exc: WireError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy) -> JSONResponse:
        return error_response(request.url.path, WireError(429, str(exc), retry_after=exc.retry_after))

    @app.exception_handler(NoSuchSession)
    async def _missing(request: Request, exc: NoSuchSession) -> JSONResponse:
        return error_response(request.url.path, WireError(404, str(exc)))

    @app.exception_handler(SandboxError)
    async def _machine(request: Request, exc: SandboxError) -> JSONResponse:
        return error_response(request.url.path, WireError(503, f"the sandbox failed: {exc}", retry_after=5))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request.url.path, WireError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return error_response(request.url.path, WireError(exc.status_code, f"{message}: {request.method} {request.url.path}"))

    # --- SandboxFusion -----------------------------------------------------------

    @app.post("/run_code")
    async def run_code(request: Request) -> JSONResponse:
        req = parse(fusion.RunCodeRequest, await request.body(), fusion_format=True)
        _check_timeout(req.run_timeout, "run_timeout", limits.max_timeout_s, fusion_format=True)
        try:
            async with service.fresh_kernel() as kernel:
                noted = memory_note(kernel, req.memory_limit_MB)
                failed = await prepare(kernel, req.files, req.stdin)
                if failed is not None:
                    return sandbox_failed(fusion.RunCodeResponse, failed)
                result = await kernel.execute(fusion.as_script(req.code), timeout=req.run_timeout)
                files, note = await fetch(kernel, req.fetch_files, result)
                note = "; ".join(n for n in (noted, note) if n)
        except (Busy, NoSuchSession):
            raise
        except SandboxError as exc:
            return sandbox_failed(fusion.RunCodeResponse, f"the sandbox failed: {exc}")
        run = fusion.run_result(result)
        resp = fusion.RunCodeResponse(status=fusion.status_of(run), message=note, run_result=run, files=files)
        return JSONResponse(resp.model_dump(mode="json"))

    @app.post("/run_jupyter")
    async def run_jupyter(request: Request) -> JSONResponse:
        req = parse(fusion.RunJupyterRequest, await request.body(), fusion_format=True)
        _check_timeout(req.total_timeout, "total_timeout", limits.max_timeout_s, fusion_format=True)
        if len(req.cells) > limits.max_cells:
            raise WireError(422, f"cells: {len(req.cells)} cells, more than this server runs in one request "
                                 f"({limits.max_cells})", detail=[{"type": "too_long", "loc": ["body", "cells"],
                                 "msg": f"List should have at most {limits.max_cells} items", "input": len(req.cells)}])
        started = time.monotonic()
        cells: list[fusion.CellRunResult] = []
        stopped: fusion.CommandRunStatus | None = None
        message = ""
        files: dict[str, str] = {}
        try:
            async with service.fresh_kernel() as kernel:
                noted = memory_note(kernel, req.memory_limit_MB)
                failed = await prepare(kernel, req.files, None)
                if failed is not None:
                    return sandbox_failed(fusion.RunJupyterResponse, failed)
                result: CellResult | None = None
                for code in req.cells:
                    left = req.total_timeout - (time.monotonic() - started)
                    limit = min(left, req.cell_timeout) if req.cell_timeout > 0 else left
                    if limit <= 0:
                        stopped, message = fusion.CommandRunStatus.TimeLimitExceeded, "total_timeout exceeded"
                        break
                    result = await kernel.execute(code, timeout=limit)
                    cells.append(fusion.cell_result(result))
                    if result.status == "timeout":
                        stopped = fusion.CommandRunStatus.TimeLimitExceeded
                        message = f"cell {len(cells) - 1} exceeded its time limit ({limit:g} s)"
                        break
                    if result.status == "died":
                        stopped = fusion.CommandRunStatus.Finished
                        message = f"the kernel died in cell {len(cells) - 1} ({result.error.evalue if result.error else ''})"
                        break
                if stopped is None and result is not None:
                    files, message = await fetch(kernel, req.fetch_files, result)
                message = "; ".join(n for n in (noted, message) if n)
        except (Busy, NoSuchSession):
            raise
        except SandboxError as exc:
            return sandbox_failed(fusion.RunJupyterResponse, f"the sandbox failed: {exc}")
        driver = fusion.CommandRunResult(status=stopped or fusion.CommandRunStatus.Finished,
                                         execution_time=time.monotonic() - started,
                                         return_code=None if stopped else 0)
        status = fusion.RunStatus.Failed if stopped else fusion.RunStatus.Success
        resp = fusion.RunJupyterResponse(status=status, message=message, driver=driver, cells=cells, files=files)
        return JSONResponse(resp.model_dump(mode="json"))

    # --- NeMo-Skills ---------------------------------------------------------------

    @app.post("/execute")
    async def execute(request: Request) -> JSONResponse:
        req = parse(nemo.ExecuteRequest, await request.body(), fusion_format=False)
        _check_timeout(req.timeout, "timeout", limits.max_timeout_s, fusion_format=False)
        timeout = req.timeout or service.pool.policy.timeout_s
        sid = request.headers.get("x-session-id")
        if req.language == nemo.STATEFUL:
            if not sid:
                raise WireError(400, "X-Session-ID header required for ipython sessions")
            outcome = await service.execute(sid, req.generated_code, timeout)
            resp = nemo.execute_response(outcome.result, req.max_output_characters, outcome.new_session, timeout)
        elif req.language in nemo.STATELESS:
            async with service.fresh_kernel() as kernel:
                failed = await prepare(kernel, {}, req.std_input or None)
                if failed is not None:
                    raise WireError(503, failed)
                result = await kernel.execute(fusion.as_script(req.generated_code), timeout=timeout)
            resp = nemo.execute_response(result, req.max_output_characters, False, timeout)
        else:
            raise WireError(400, f"language: {req.language!r} is not served here; use 'ipython' (a session) "
                                 f"or 'python' (a fresh kernel)")
        return JSONResponse(resp.model_dump())

    @app.delete("/sessions/{sid}")
    async def delete_session(sid: str) -> dict[str, str]:
        await service.delete(sid)
        return {"message": f"IPython session {sid} deleted successfully"}

    @app.get("/sessions")
    async def list_sessions() -> dict[str, Any]:
        return {"sessions": service.sessions(), "backend": "ipython"}

    @app.post("/sessions/{sid}/fork")
    async def fork_session(sid: str) -> dict[str, Any]:
        new_id, forked = await service.fork(sid)
        return {"session_id": new_id, **forked.model_dump()}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return service.health()

    def too_large(scope: Scope) -> ASGIApp:
        return error_response(scope["path"], WireError(
            413, f"the request body is larger than this server accepts ({max_body_bytes} bytes)"))

    return BodyLimit(app, max_body_bytes, too_large)
