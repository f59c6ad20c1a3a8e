"""`tora serve --model SPEC`: the tool loop behind an OpenAI-compatible HTTP API.

Each request is one trajectory (or one per choice) on the scheduler, with
the server's loop options as defaults that request fields override (see
tora/serve/app.py for the mapping). It binds 127.0.0.1 unless told
otherwise, and refuses any other address without an API key. Trajectories
are recorded like any other (`--no-record` to opt out); one whose client
went away is recorded as `interrupted`. SIGINT or SIGTERM stops it: running
trajectories are interrupted and recorded, kernels are shut down.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tora.backends.registry import load_backend
from tora.cli.options import loop_options, loop_settings
from tora.errors import UsageError
from tora.paths import trajectories_dir
from tora.prompts import default_prompt, load_prompt
from tora.record import TrajectoryWriter

F = TypeVar("F", bound=Callable[..., Any])


def default_record_path() -> Path:
    return trajectories_dir() / "serve.jsonl"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that port 0 gives a known free port."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def listen_options(port: int, key_guards: str) -> Callable[[F], F]:
    """--host, --port and --api-key, as both servers (`serve`, `sandbox serve`) take them."""

    def decorate(command: F) -> F:
        for option in reversed((
            click.option("--host", default="127.0.0.1", show_default=True,
                         help="Address to listen on; anything but loopback needs --api-key."),
            click.option("--port", type=click.IntRange(0, 65535), default=port, show_default=True,
                         help="Port to listen on (0: a free one, printed at start)."),
            click.option("--api-key", envvar="TORA_API_KEY", default=None,
                         help=f"Require 'Authorization: Bearer KEY' on {key_guards} (env TORA_API_KEY)."),
        )):
            command = option(command)
        return command

    return decorate


def listen(host: str, port: int, api_key: str | None) -> tuple[socket.socket, str | None]:
    """The bound socket and the key to require; no key on a host beyond loopback is a usage error."""
    api_key = api_key or None
    if not is_loopback(host) and api_key is None:
        raise UsageError(f"--host {host} is not a loopback address: set --api-key (or TORA_API_KEY) to serve on it")
    return bind(host, port), api_key


@click.command("serve")
@loop_options
@listen_options(8000, "/v1/*")
@click.option("--served-model-name", default="tora", show_default=True,
              help="The model id clients send (the --model spec is accepted too).")
@click.option("--concurrency", "-c", type=click.IntRange(1), default=4, show_default=True,
              help="Trajectories running at once; more requests wait for a slot.")
@click.option("--kernels", type=click.IntRange(1), default=None,
              help="Live kernels at once [default: as --concurrency].")
@click.option("--max-queued", type=click.IntRange(0), default=64, show_default=True,
              help="Trajectories that may wait for a slot; beyond that requests get 429.")
@click.option("--max-tokens-limit", type=click.IntRange(1), default=16384, show_default=True,
              help="The largest max_tokens a request may ask for (larger: 400).")
@click.option("--max-body-bytes", type=click.IntRange(1024), default=1 << 20, show_default=True,
              help="The largest request body accepted (larger: 413).")
@click.option("--max-choices", type=click.IntRange(1), default=16, show_default=True,
              help="The most choices (prompts x n) one request may ask for.")
@click.option("--no-record", is_flag=True, help="Do not record served trajectories.")
@click.option("--record-to", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Record file [default: trajectories/serve.jsonl, or $TORA_HOME/trajectories/serve.jsonl].")
def serve(host: str, port: int, api_key: str | None, served_model_name: str, concurrency: int,
          kernels: int | None, max_queued: int, max_tokens_limit: int, max_body_bytes: int, max_choices: int,
          no_record: bool, record_to: Path | None, **kw: Any) -> int:
    """Serve the tool loop as an OpenAI-compatible API (/v1/chat/completions, /v1/completions)."""
    # Imported here: the other verbs must not pay for (or depend on) the web stack.
    from tora.serve.app import ServeLimits
    from tora.serve.runner import Runner
    from tora.serve.server import serve_forever

    settings = loop_settings({**kw, "concurrency": concurrency, "kernels": kernels, "graders": 1})
    config = settings.config
    if config.limits.max_tokens > max_tokens_limit:
        raise UsageError(f"--max-tokens {config.limits.max_tokens} is above --max-tokens-limit {max_tokens_limit}")
    template = load_prompt(kw["prompt"] or default_prompt(kw["model"]))
    sock, api_key = listen(host, port, api_key)
    backend = load_backend(kw["model"])
    backend.prepare(template.prefix)
    record_path = None if no_record else (record_to or default_record_path())
    writer = TrajectoryWriter(record_path) if record_path else None
    limits = ServeLimits(max_tokens=max_tokens_limit, max_body_bytes=max_body_bytes, max_choices=max_choices)
    runner = Runner(backend, template, settings, spec=kw["model"], writer=writer,
                    max_queued=max_queued, run_id=f"serve-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        asyncio.run(serve_forever(runner, sock, served_model_name, limits, api_key, record_path))
    finally:
        sock.close()
        if writer is not None:
            writer.close()
    return 0
