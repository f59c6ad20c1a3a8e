"""llama-cpp-python's OpenAI-compatible server, started the way tora runs llama.cpp.

    python -m tora.backends.llama_server --model FILE.gguf|embedded|embedded-tiny [llama_cpp.server flags...]

is `python -m llama_cpp.server` (the `llama-cpp-python[server]` extra) with
three differences:

- the CPU backend is the one tora proved runs here (`ensure_cpu_backend`),
  chosen before the server loads llama.cpp; left to itself llama.cpp takes
  the best-scored variant, which on some VMs dies of SIGILL;
- `--model embedded` (`embedded-tiny`) is the shipped Qwen2.5-Coder 1.5B (Gemma 3 270M);
- defaults that suit tora: `--host 127.0.0.1`, `--n_ctx 8192` (as the gguf:
  backend), and `--interrupt_requests False`: by default the server ends a
  streaming request as soon as another one waits, which cuts every
  trajectory but one short when several share the server.

`LlamaServer` starts one as a child process and waits until it answers
(tests, `tora serve`); the first start on a machine also proves the CPU
backend (about a minute, then cached).
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tora import embedded_models
from tora.errors import BackendError

DEFAULTS = {"--host": "127.0.0.1", "--n_ctx": "8192", "--interrupt_requests": "False"}


def server_argv(args: list[str]) -> list[str]:
    """The llama_cpp.server arguments: tora's defaults for flags not given, `embedded` resolved."""
    args = list(args)
    for i, arg in enumerate(args[:-1]):
        if arg == "--model" and args[i + 1] in embedded_models.MODELS:
            args[i + 1] = str(embedded_models.model_path(args[i + 1]))
    given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    for flag, value in DEFAULTS.items():
        if flag not in given:
            args += [flag, value]
    return args


def main(argv: list[str] | None = None) -> None:
    from tora.backends.ggml_cpu import ensure_cpu_backend

    ensure_cpu_backend()
    sys.argv = ["llama_cpp.server", *server_argv(sys.argv[1:] if argv is None else argv)]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class LlamaServer:
    """A llama_cpp.server child process on loopback, stopped on exit.

    `log` receives the server's stdout and stderr (it prints a line when a
    client disconnects, which tests read).
    """

    def __init__(self, model: Path | str, *, port: int | None = None, args: Sequence[str] = (),
                 log: Path | None = None, ready_timeout_s: float = 300.0) -> None:
        self.model = str(model)
        self.port = port or free_port()
        self.args = list(args)
        self.log = log
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LlamaServer:
        argv = [sys.executable, "-m", "tora.backends.llama_server", "--model", self.model,
                "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with self.log.open("ab") if self.log is not None else open(os.devnull, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BackendError(f"llama_cpp.server exited with {self.proc.returncode} before it was ready"
                                   + (f"; see {self.log}" if self.log else ""))
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                    json.load(r)
                    return
            except urllib.error.HTTPError:
                return  # it answers (a 401 when it wants a key): it is up
            except (OSError, ValueError):
                time.sleep(0.2)
        raise BackendError(f"llama_cpp.server on port {self.port} not ready after {self.ready_timeout_s:.0f} s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


if __name__ == "__main__":
    main()
