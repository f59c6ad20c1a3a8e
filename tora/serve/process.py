"""`tora serve` in a child process, for scripts that need a served model for a while
(pointing lm-eval's `local-completions` at it, a benchmark, a test):

    with ServeProcess(["--model", "replay:runs.jsonl"]) as server:
        client = openai.OpenAI(base_url=server.url, api_key="none")

It listens on a free loopback port unless the arguments say otherwise; the
URL is read from the server's own start-up line. Leaving the block stops it
with SIGTERM (running trajectories are interrupted and recorded).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import TracebackType

from tora.errors import ToraError

_BANNER = re.compile(r"^tora serve: (http://(\S+?):(\d+)/v1) ")


class ServeProcess:
    # The verb it runs and the start-up line that names its URL.
    command: tuple[str, ...] = ("serve",)
    banner = _BANNER

    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None, startup_timeout: float = 300.0,
                 python: str = sys.executable) -> None:
        self.args = list(args)
        if "--port" not in self.args:
            self.args += ["--port", "0"]
        self.env = env
        self.startup_timeout = startup_timeout
        self.python = python
        self.stderr: list[str] = []
        self.url = ""
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def start(self) -> ServeProcess:
        self._proc = subprocess.Popen([self.python, "-m", "tora.cli.main", *self.command, *self.args],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, env=self.env if self.env is not None else os.environ.copy())
        threading.Thread(target=self._read, daemon=True).start()
        self._ready.wait(self.startup_timeout)
        if not self.url:
            self.stop(signal.SIGKILL)
            tail = "".join(self.stderr[-20:]).strip()
            raise ToraError(f"tora {' '.join(self.command)} did not start within {self.startup_timeout:.0f} s: {tail or 'no output'}")
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self.stderr.append(line)
            found = self.banner.match(line)
            if found and not self.url:
                self.url, self.port = found.group(1), int(found.group(3))
                self._ready.set()
        self._ready.set()  # it exited

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Stop the server and return its exit status (killed if it does not stop in time)."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
            try:
                return self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        return self._proc.wait()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class SandboxServeProcess(ServeProcess):
    """`tora sandbox serve` in a child process; ``url`` is its root (the routes are /run_code, /execute, ...)."""

    command = ("sandbox", "serve")
    banner = re.compile(r"^tora sandbox serve: (http://(\S+?):(\d+)) ")
