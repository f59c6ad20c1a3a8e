"""Running the app under uvicorn on a socket bound by the caller, until a signal stops it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import click
import uvicorn

from tora.serve.app import ServeLimits, create_app
from tora.serve.runner import Runner


class _Server(uvicorn.Server):
    """uvicorn's server, stopped by SIGINT/SIGTERM without re-raising the signal
    afterwards (uvicorn's own handling does, which would kill the process
    before its records and kernels are seen to); a stop also interrupts the
    running trajectories, so open streams end instead of holding shutdown up."""

    def __init__(self, config: uvicorn.Config, runner: Runner) -> None:
        super().__init__(config)
        self.runner = runner

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
            click.echo("tora serve: stopping", err=True)
        self.handle_exit(sig, None)
        self.runner.interrupt()


async def serve_forever(runner: Runner, sock: socket.socket, served_name: str, limits: ServeLimits,
                        api_key: str | None, record_path: Path | None) -> None:
    try:
        await runner.start()
        app = create_app(runner, served_name=served_name, limits=limits, api_key=api_key)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5)
        server = _Server(config, runner)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            where = f"recording to {record_path}" if record_path else "not recording"
            click.echo(f"tora serve: http://{shown}:{port}/v1 · model {served_name!r} = {runner.spec} · "
                       f"{runner.capacity.in_flight} in flight · {where}", err=True)
        await task
    finally:
        await runner.close()
