"""Running the app under uvicorn on a socket bound by the caller, until a signal stops it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import uvicorn
from starlette.types import ASGIApp

from tora.serve.app import ServeLimits, create_app
from tora.serve.runner import Runner


class _Server(uvicorn.Server):
    """uvicorn's server, stopped by SIGINT/SIGTERM without re-raising the signal
    afterwards (uvicorn's own handling does, which would kill the process
    before its records and kernels are seen to); a stop also calls ``on_stop``
    (tora serve interrupts the running trajectories, so open streams end
    instead of holding shutdown up)."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None], name: str) -> None:
        super().__init__(config)
        self.on_stop = on_stop
        self.name = name

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _stop(self, sig: int) -> None:
        if not self.should_exit:
            click.echo(f"{self.name}: stopping", err=True)
        self.handle_exit(sig, None)
        self.on_stop()


async def run_until_stopped(app: ASGIApp, sock: socket.socket, name: str, on_stop: Callable[[], None],
                            started: Callable[[str], None], keep_alive_s: int = 5) -> None:
    """Serve ``app`` on ``sock`` until SIGINT/SIGTERM; ``started(url)`` once it listens.

    ``keep_alive_s``: how long an idle connection is kept; longer than the
    clients' own pool expiry (httpx: 5 s), or a client may send on a
    connection the server is closing at that moment (a reset, not a retry).
    """
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5, timeout_keep_alive=keep_alive_s)
    server = _Server(config, on_stop, name)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        started(f"http://{shown}:{port}")
    await task


async def serve_forever(runner: Runner, sock: socket.socket, served_name: str, limits: ServeLimits,
                        api_key: str | None, record_path: Path | None) -> None:
    try:
        await runner.start()
        app = create_app(runner, served_name=served_name, limits=limits, api_key=api_key)

        def started(url: str) -> None:
            where = f"recording to {record_path}" if record_path else "not recording"
            click.echo(f"tora serve: {url}/v1 · model {served_name!r} = {runner.spec} · "
                       f"{runner.capacity.in_flight} in flight · {where}", err=True)

        await run_until_stopped(app, sock, "tora serve", runner.interrupt, started)
    finally:
        await runner.close()
