"""Model specs: one string names a model and its backend.

    embedded            the shipped Qwen2.5-Coder-1.5B-Instruct (default; tora/embedded_models.py)
    embedded-tiny       the shipped Gemma 3 270M base: fast, for tests
    gguf:/path/x.gguf   any GGUF file through llama.cpp
    hf:/path/dir        a local Hugging Face model directory through transformers
    vllm:/path/dir      a local Hugging Face model directory through vLLM (vllm:embedded: the
                        embedded model converted once; options as ?name=value, see backends/vllm.py)
    replay:FILE         plays back recorded trajectories (tora's or ToRA's format)
    openai:MODEL@URL    an OpenAI-compatible server, e.g. openai:qwen@http://127.0.0.1:8000/v1;
                        options after '?': protocol=completions|chat-continue|tools,
                        template=PATH, concurrency=N, api_key_env=NAME, retries=N,
                        backoff=S, timeout=S, stream=0|1, body.FIELD=V (tora.backends.openai
                        says what each does).
                        MODEL may be left out when the server serves one model.

Third-party packages add backends through the `tora.backends` entry point
group: `name = "pkg.module:factory"`, where `factory(arg: str) -> Backend`
serves the spec `name:arg` (tora.backends.kinds: loaded once, a broken one
reported by name). `kinds()` lists them all with their syntax (`tora models`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tora import embedded_models
from tora.backends.base import Backend
from tora.backends.kinds import Kind, listing, plugins
from tora.errors import ModelSpecError

DEFAULT_SPEC = "embedded"


def _embedded(spec: str) -> Callable[[str], Backend]:
    def factory(arg: str) -> Backend:
        from tora.backends.embedded import load_embedded

        if arg:
            raise ModelSpecError(f"the spec {spec!r} takes no argument")
        return load_embedded(spec)

    return factory


def _gguf(arg: str) -> Backend:
    from tora.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(Path(arg).expanduser())


def _hf(arg: str) -> Backend:
    from tora.backends.transformers import TransformersBackend

    return TransformersBackend(Path(arg).expanduser())


def _vllm(arg: str) -> Backend:
    from tora.backends.vllm import load_vllm

    return load_vllm(arg)


def _replay(arg: str) -> Backend:
    from tora.backends.replay import ReplayBackend

    return ReplayBackend(Path(arg).expanduser())


def _openai(arg: str) -> Backend:
    from tora.backends.openai import load_openai

    return load_openai(arg)


BUILTIN: dict[str, Callable[[str], Backend]] = {
    **{spec: _embedded(spec) for spec in embedded_models.MODELS},
    "gguf": _gguf,
    "hf": _hf,
    "vllm": _vllm,
    "replay": _replay,
    "openai": _openai,
}


def kinds() -> list[Kind]:
    return listing(BUILTIN)


def known_kinds() -> list[str]:
    return sorted({*BUILTIN, *(name for name, p in plugins().items() if p.factory is not None)})


def load_backend(spec: str | None) -> Backend:
    """Build the backend a spec names; ModelSpecError (exit 2) if it names none."""
    spec = (spec or DEFAULT_SPEC).strip()
    kind, sep, arg = spec.partition(":")
    if not sep and kind not in BUILTIN:
        raise ModelSpecError(f"model spec {spec!r} has no kind; write KIND:ARG with KIND one of {', '.join(known_kinds())}")
    plugin = plugins().get(kind)
    if kind not in BUILTIN and plugin is not None and plugin.factory is None:
        raise ModelSpecError(f"the backend plugin {kind!r} ({plugin.kind.source}) is broken: {plugin.kind.error}")
    factory = BUILTIN.get(kind) or (plugin.factory if plugin is not None else None)
    if factory is None:
        raise ModelSpecError(f"unknown model kind {kind!r} in {spec!r}; known kinds: {', '.join(known_kinds())}")
    if kind not in embedded_models.MODELS and not arg:
        raise ModelSpecError(f"model spec {spec!r} needs a path after '{kind}:'")
    return factory(arg)
