"""The backend kinds a spec can name: the built-in ones and the `tora.backends` entry-point plugins.

A plugin registers `name = "pkg.module:factory"`, where `factory(arg: str) ->
Backend` serves the spec `name:arg`; `factory.spec_syntax`, if set, is the
syntax `tora models` shows, and the first line of its docstring what it
serves. The group is read once per process (`plugins()` is cached): a plugin
that fails to load is kept with its error, reported by name, and the others
still work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from importlib.metadata import entry_points

from tora.backends.base import Backend

GROUP = "tora.backends"

# What `tora models` shows for each built-in kind: the spec's syntax and what it serves.
SYNTAX: dict[str, tuple[str, str]] = {
    "embedded": ("embedded", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M, shipped with tora (the default)"),
    "embedded-tiny": ("embedded-tiny", "Gemma 3 270M base Q4_K_M, shipped with tora: fast, for tests"),
    "gguf": ("gguf:/path/x.gguf", "any GGUF file through llama.cpp"),
    "hf": ("hf:/path/dir", "a local Hugging Face model directory through transformers"),
    "vllm": ("vllm:/path/dir?OPTIONS", "a local Hugging Face model directory through vLLM in process "
             "(vllm:embedded: the embedded model, converted once)"),
    "replay": ("replay:FILE", "plays back recorded trajectories (tora's or ToRA's format)"),
    "openai": ("openai:[MODEL@]http://HOST:PORT/v1?OPTIONS", "an OpenAI-compatible server (options: protocol, "
               "template, concurrency, api_key_env, retries, backoff, timeout, stream, logprobs, token_ids, "
               "body.FIELD)"),
}


@dataclass(frozen=True)
class Kind:
    """A backend kind as `tora models` lists it."""

    name: str
    syntax: str
    about: str
    source: str  # "built-in", or the distribution that registered the plugin
    error: str | None = None  # why a plugin cannot serve specs


@dataclass(frozen=True)
class Plugin:
    factory: Callable[[str], Backend] | None  # None: it failed to load
    kind: Kind


@functools.cache
def plugins() -> dict[str, Plugin]:
    """The entry points of the group, each loaded once; a failure is kept, not raised."""
    found: dict[str, Plugin] = {}
    for ep in entry_points(group=GROUP):
        source = ep.dist.name if ep.dist is not None else ep.value
        try:
            factory = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            error = f"{ep.value} failed to load: {type(exc).__name__}: {exc}"
            found[ep.name] = Plugin(None, Kind(ep.name, f"{ep.name}:ARG", "", source, error))
            continue
        doc = (getattr(factory, "__doc__", None) or "").strip()
        syntax = str(getattr(factory, "spec_syntax", None) or f"{ep.name}:ARG")
        found[ep.name] = Plugin(factory, Kind(ep.name, syntax, doc.splitlines()[0] if doc else "", source))
    return found


def listing(builtin: Iterable[str]) -> list[Kind]:
    """The built-in kinds, then the plugins by name (a broken or shadowed one with why)."""
    names = list(builtin)
    listed = [Kind(name, *SYNTAX.get(name, (name, "")), "built-in") for name in names]
    for name, plugin in sorted(plugins().items()):
        shadowed = name in names and plugin.kind.error is None
        listed.append(replace(plugin.kind, error="shadowed by the built-in kind") if shadowed else plugin.kind)
    return listed
