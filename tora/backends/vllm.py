"""Hugging Face model directories through vLLM, in process: the engine for batch work.

    vllm:/path/to/hf_dir[?OPTION=VALUE&...]   a local model directory
    vllm:embedded[?...]                       an embedded model (also vllm:embedded-tiny), converted
                                              once to safetensors (tora models convert embedded)

Options: enforce_eager (0/1: skip torch.compile, a much faster start-up and
slower decoding), max_model_len, dtype, kv_cache_gb (the KV cache size, the
way to size it on a CPU; VLLM_CPU_KVCACHE_SPACE also works), gpu_memory_utilization,
max_num_seqs. vLLM's own environment variables pass through (on a CPU, e.g.
VLLM_CPU_NUM_OF_RESERVED_CPU: by default one core is left to the caller).

vLLM batches every request in flight, so many trajectories at once (the
scheduler's `--concurrency`) share each forward pass; llama.cpp serves one
sequence at a time. Measured on 2 CPU cores with the embedded model: 8-17
tok/s for one sequence, 170-210 tok/s for 16 (llama.cpp: ~41 for one).

Each model call is one vLLM request with prefix caching on, so a trajectory
continuing after an output block re-reads only its new tokens. The loop's
stop strings go to vLLM (it stops generating there) and through the same
`StopScanner` as every backend, so `Done.stop_string` is exact. A closed or
cancelled stream aborts its request; `aclose` shuts the engine core process
down. vLLM is imported only here, with its caches pointed into `$TORA_HOME`
and the hub offline: a model is always a local path.

It takes token ids (`accepts_token_ids`): each request's prompt is the
loop's exact id sequence (vLLM's `TokensPrompt`), and each sampled id comes
with its logprob (`SamplingParams(logprobs=k)`). The engine reports
`processed_logprobs`: those of the distribution it sampled from, at the
request's temperature (after top-p truncation, which tora's other backends
leave out: the same when top_p is 1). vLLM cuts its text at a stop string;
the whole last token's text comes back in `Done.tail`, decoded from its ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from tora import embedded_models
from tora.backends.base import Delta, Done, GenerationRequest, StopScanner, StreamEvent
from tora.backends.hf_tokens import HFTokenizerBackend
from tora.errors import BackendError, ModelSpecError
from tora.paths import home
from tora.record import identity
from tora.record.schema import ModelId, TokenizerId


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 0 or 1")


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be > 0")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be > 0")
    return number


@dataclass(frozen=True)
class VllmOptions:
    enforce_eager: bool = False
    max_model_len: int | None = None
    dtype: str = "auto"
    kv_cache_gb: float | None = None
    gpu_memory_utilization: float | None = None
    max_num_seqs: int | None = None


_PARSERS: dict[str, Callable[[str], Any]] = {
    "enforce_eager": _flag,
    "max_model_len": _positive_int,
    "dtype": str,
    "kv_cache_gb": _positive_float,
    "gpu_memory_utilization": _positive_float,
    "max_num_seqs": _positive_int,
}

# The embedded model matches llama.cpp's context (n_ctx) and gets a KV cache
# that holds 16 trajectories of that length without asking vLLM to size one
# from the machine's free memory (on a CPU, a share of all RAM).
EMBEDDED_DEFAULTS: dict[str, Any] = {"max_model_len": 8192, "kv_cache_gb": 2.0}


def parse_spec(arg: str) -> tuple[str, VllmOptions]:
    """`PATH?opt=v&...` -> (PATH, options); ModelSpecError names a bad option."""
    target, _, query = arg.partition("?")
    given: dict[str, Any] = dict(EMBEDDED_DEFAULTS) if target in embedded_models.MODELS else {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError as exc:
        raise ModelSpecError(f"vllm:{arg}: options are written ?name=value&name=value ({exc})") from exc
    for key, value in pairs:
        parse = _PARSERS.get(key)
        if parse is None:
            raise ModelSpecError(f"vllm:{arg}: unknown option {key!r}; known: {', '.join(_PARSERS)}")
        try:
            given[key] = parse(value)
        except ValueError as exc:
            raise ModelSpecError(f"vllm:{arg}: option {key}={value!r}: {exc}") from exc
    if not target:
        raise ModelSpecError(f"vllm:{arg}: name a model directory (vllm:/path/to/dir) or vllm:embedded")
    return target, VllmOptions(**given)


def _isolate_environment() -> None:
    """Before vLLM is imported: no hub, no telemetry, caches under $TORA_HOME, logs on stderr.

    Values the user set win; these are only defaults.
    """
    defaults = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "VLLM_CACHE_ROOT": str(home() / "cache" / "vllm"),
        # stdout belongs to tora (`--json`); vLLM's INFO lines are start-up chatter.
        "VLLM_LOGGING_STREAM": "ext://sys.stderr",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def resolve_model_dir(target: str) -> tuple[Path, str]:
    """The directory a spec's target names, and the model name to record."""
    if target in embedded_models.MODELS:
        from tora.backends.convert import convert, embedded_source

        source = embedded_source(target)
        out = convert(source, notify=lambda line: print(f"vllm:{target}: {line}", file=sys.stderr, flush=True))
        return out, embedded_models.get(target).label.replace("Q4_K_M)", "bf16 from Q4_K_M)")
    path = Path(target).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        raise ModelSpecError(
            f"{path}: vLLM does not load GGUF files; convert it once with "
            f"`tora models convert {path}` and use vllm:<the directory it prints>"
        )
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path.absolute(), path.name


def load_vllm(arg: str) -> VllmBackend:
    target, options = parse_spec(arg)
    path, model = resolve_model_dir(target)
    backend = VllmBackend(path, options)
    backend.model = model
    return backend


class VllmBackend(HFTokenizerBackend):
    name = "vllm"
    accepts_token_ids = True

    def __init__(self, path: Path, options: VllmOptions | None = None) -> None:
        options = options or VllmOptions()
        _isolate_environment()
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise BackendError(
                f"the vllm backend needs vLLM ({exc}): ./setup.sh --vllm makes .venv-vllm with the CPU build "
                "(then run .venv-vllm/bin/tora); on a GPU machine pip install vllm"
            ) from exc
        extra: dict[str, Any] = {}
        if options.kv_cache_gb is not None:
            extra["kv_cache_memory_bytes"] = int(options.kv_cache_gb * (1 << 30))
        if options.gpu_memory_utilization is not None:
            extra["gpu_memory_utilization"] = options.gpu_memory_utilization
        if options.max_num_seqs is not None:
            extra["max_num_seqs"] = options.max_num_seqs
        args = AsyncEngineArgs(
            model=str(path),
            enable_prefix_caching=True,
            enforce_eager=options.enforce_eager,
            max_model_len=options.max_model_len,
            dtype=options.dtype,
            # Sampling is what tora passes and records; the model's
            # generation_config.json (top_k, ...) must not change it silently.
            generation_config="vllm",
            disable_log_stats=True,
            # The logprobs an RL trainer recomputes: at the sampling temperature.
            logprobs_mode="processed_logprobs",
            **extra,
        )
        try:
            self._engine: Any = AsyncLLM.from_engine_args(args)
        except Exception as exc:
            raise BackendError(f"{path}: vLLM could not start this model ({type(exc).__name__}: {exc})") from exc
        self.path = path
        self.model = path.name
        self.options = options
        self.max_model_len: int = self._engine.model_config.max_model_len
        self.tokenizer: Any = self._engine.tokenizer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last: list[int] | None = None  # from the last request's prompt_token_ids and output ids
        self._tokenizer_id: TokenizerId | None = None
        self._model_id: ModelId | None = None

    def evaluated_ids(self) -> list[int] | None:
        return None if self._last is None else list(self._last)

    def tokenizer_identity(self) -> TokenizerId | None:
        if self._tokenizer_id is None:
            vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
            template = getattr(self.tokenizer, "chat_template", None)
            self._tokenizer_id = TokenizerId(
                name=self.path.name,
                vocab_sha256=hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest(),
                chat_template_sha256=identity.sha256_text(template) if isinstance(template, str) else None)
        return self._tokenizer_id

    def model_identity(self) -> ModelId | None:
        if self._model_id is None:
            self._model_id = identity.hf_identity(self.path)
        return self._model_id

    def _check_loop(self) -> None:
        # The engine's output handler is a task on the loop of the first request.
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise BackendError("a vLLM engine serves the event loop it first ran in; load the backend again for another")

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._engine is None:
            raise BackendError("the vLLM engine was shut down")
        self._check_loop()
        ids = list(request.prompt_ids) if request.prompt_ids is not None else self.encode_prompt(request.prompt)
        budget = min(request.max_tokens, self.max_model_len - len(ids))
        if budget <= 0:
            yield Done("length", None, len(ids), 0)
            return
        params = SamplingParams(
            max_tokens=budget,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=[s for s in request.stop if s] or None,
            output_kind=RequestOutputKind.DELTA,
            logprobs=request.top_logprobs if request.logprobs else None,  # 0: the sampled token's own
        )
        (engine_input,) = await self._engine.renderer.render_cmpl_async([{"prompt_token_ids": ids}])
        scanner = StopScanner(request.stop)
        sampled: list[int] = []
        emitted = ""
        read: list[int] | None = None
        finish: str | None = None
        stop_reason: object = None
        # aclosing: leaving early (our own stop, a closed or cancelled stream)
        # makes vLLM's generator abort the request, freeing its batch slot now.
        async with contextlib.aclosing(self._engine.generate(engine_input, params, uuid.uuid4().hex)) as outputs:
            async for output in outputs:
                if read is None and output.prompt_token_ids is not None:
                    read = list(output.prompt_token_ids)
                piece = output.outputs[0]
                new = tuple(int(i) for i in piece.token_ids)
                sampled += new
                text = scanner.feed(piece.text)
                emitted += text
                if text or new:
                    yield Delta(text, new, _logprobs(new, piece.logprobs), _top(new, piece.logprobs, request.top_logprobs))
                if scanner.matched is not None:
                    break
                if piece.finish_reason is not None:
                    finish, stop_reason = piece.finish_reason, piece.stop_reason
        # What the engine evaluated: the prompt it reports reading, and every sampled
        # token but the last (never fed back), as the other backends see it.
        self._last = None if read is None else read + sampled[:-1]
        produced = len(sampled)
        if scanner.matched is not None:
            yield Done("stop", scanner.matched, len(ids), produced, self.detokenize(sampled)[len(emitted) :])
            return
        rest = scanner.flush()
        if rest:
            emitted += rest
            yield Delta(rest)
        if finish == "stop" and isinstance(stop_reason, str) and stop_reason in request.stop:
            # vLLM cut its text at the stop string; the ids hold the whole token.
            yield Done("stop", stop_reason, len(ids), produced, self.detokenize(sampled)[len(emitted) :])
        elif finish == "stop":  # the end-of-text token
            yield Done("eos", None, len(ids), produced)
        elif finish == "length":
            yield Done("length", None, len(ids), produced)
        else:
            raise BackendError(f"vLLM ended the request with finish_reason={finish!r}")

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        # With nothing in flight, stop reading outputs first: left running, the
        # reader sees the engine core exit and logs it as a crash. (Requests
        # still in flight need it: it fails them when the engine goes.)
        handler = getattr(engine, "output_handler", None)
        idle = engine.get_num_unfinished_requests() == 0
        if idle and handler is not None and handler.get_loop() is asyncio.get_running_loop():
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
        # Blocking (it waits for the engine core process to exit): not on the loop.
        await asyncio.to_thread(engine.shutdown)


def _logprobs(ids: tuple[int, ...], given: Any) -> tuple[float, ...] | None:
    """The sampled ids' own logprobs from vLLM's per-token {id: Logprob} maps (None if it gave none)."""
    if not given or len(given) != len(ids):
        return None
    return tuple(float(step[i].logprob) for i, step in zip(ids, given, strict=True))


def _top(ids: tuple[int, ...], given: Any, k: int) -> tuple[dict[int, float], ...] | None:
    if k <= 0 or not given or len(given) != len(ids):
        return None
    return tuple({int(i): float(lp.logprob) for i, lp in step.items() if lp.rank is not None and lp.rank <= k}
                 for step in given)
