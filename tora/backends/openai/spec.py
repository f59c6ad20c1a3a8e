"""`openai:MODEL@URL?options`: what an OpenAI-compatible server spec says (never the key itself)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from tora.errors import ModelSpecError

ProtocolName = Literal["completions", "chat-continue", "tools"]
KEY_VARIABLES = ("TORA_OPENAI_API_KEY", "OPENAI_API_KEY")
_USERINFO = re.compile(r"(https?://)[^/@]*@")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
KNOWN_OPTIONS = ("protocol", "template", "concurrency", "api_key_env", "retries", "backoff", "timeout", "stream",
                 "logprobs", "token_ids")

T = TypeVar("T")


def shown(arg: str) -> str:
    """The spec as a message may repeat it: credentials in a URL starred out."""
    return _USERINFO.sub(r"\1***@", arg)


@dataclass(frozen=True)
class ServerSpec:
    """What `openai:MODEL@URL?options` says (never the key itself)."""

    model: str  # "" = the server's only model
    base_url: str
    protocol: ProtocolName = "completions"
    template: Path | None = None
    concurrency: int = 8
    api_key_env: str | None = None
    retries: int = 4
    backoff_s: float = 0.5
    timeout_s: float = 600.0
    body: dict[str, Any] = field(default_factory=dict)  # extra request fields, e.g. repeat_penalty
    # False: whole replies instead of streams, for servers that cannot stream some answers
    # (llama-cpp-python's chatml-function-calling streams no tool calls).
    stream: bool = True
    # Ask for each sampled token's logprob (not with protocol=tools); None: unless the server is
    # llama-cpp-python's, which sorts the whole vocabulary in Python for each one.
    logprobs: bool | None = None
    # Ask for the sampled token ids (vLLM's return_token_ids); None: when the server is vLLM.
    token_ids: bool | None = None

    @classmethod
    def parse(cls, arg: str) -> ServerSpec:
        where = f"model spec 'openai:{shown(arg)}'"  # a message must not repeat credentials either
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
        known = set(KNOWN_OPTIONS)
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
        if protocol not in get_args(ProtocolName):
            raise ModelSpecError(f"{where}: protocol must be one of {', '.join(get_args(ProtocolName))}, "
                                 f"not {protocol!r}")

        def flag(name: str, default: str) -> bool | None:
            value = options.get(name, default).lower()
            if value == "auto" and default == "auto":
                return None
            if value not in _BOOLEANS:
                also = " or auto" if default == "auto" else ""
                raise ModelSpecError(f"{where}: option {name} must be 1 or 0{also}, not {options[name]!r}")
            return _BOOLEANS[value]

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
            stream=bool(flag("stream", "1")),
            logprobs=flag("logprobs", "auto"),
            token_ids=flag("token_ids", "auto"),
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


