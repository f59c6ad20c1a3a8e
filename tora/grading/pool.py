"""A process pool whose per-item timeout never stalls the batch.

`concurrent.futures` cannot stop a task that has started, and a sympy
simplification or a Math-Verify parse can run for minutes inside C code where
no signal reaches it. Here each worker owns one pipe and runs one item at a
time; the parent waits on all pipes with the earliest deadline as its timeout.
An item past its deadline is reported as `timeout`, its worker is killed
(SIGKILL) and a fresh one takes its place, while the other workers go on.

Workers come from a `forkserver`: forking the caller directly is unsafe once it
has threads (the engine's kernels and event loop), and `spawn` would re-import
sympy for every replacement. The fork server preloads the modules named in
`preload` once, so a replacement starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Generic, Literal, TypeVar

T = TypeVar("T")
R = TypeVar("R")

OutcomeStatus = Literal["ok", "timeout", "error"]
_STARTUP_TIMEOUT = 120.0


@dataclass(frozen=True)
class Outcome(Generic[R]):
    status: OutcomeStatus
    value: R | None = None
    error: str | None = None


def _worker_main(conn: Connection, func: Callable[[Any], Any], memory_limit: int | None) -> None:
    # Ctrl-C belongs to the parent, which kills workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_limit:
        import resource

        # A runaway expansion fails with MemoryError here instead of swapping the machine.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, item = message
        reply: tuple[int, str, Any, str | None]
        try:
            reply = (index, "ok", func(item), None)
        except BaseException as exc:  # the item failed, not the worker
            reply = (index, "error", None, f"{type(exc).__name__}: {exc}"[:500])
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return
        except Exception as exc:  # an unpicklable result
            conn.send((index, "error", None, f"result not transferable: {exc}"[:500]))


class _Worker:
    def __init__(self, ctx: Any, func: Callable[[Any], Any], memory_limit: int | None) -> None:
        parent, child = ctx.Pipe(duplex=True)
        self.proc: BaseProcess = ctx.Process(target=_worker_main, args=(child, func, memory_limit), daemon=True)
        self.proc.start()
        child.close()
        self.conn: Connection = parent
        self.index: int | None = None
        self.deadline = 0.0
        # Item deadlines must not include start-up (a cold fork server imports
        # sympy first), so wait here until the worker says it is ready.
        try:
            ready = parent.poll(_STARTUP_TIMEOUT) and parent.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError(f"grading worker did not start within {_STARTUP_TIMEOUT:g} s")

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(None)
        self.proc.join(timeout=1)
        self.kill()


class ProcessPool(Generic[T, R]):
    """Runs `func` over items in worker processes, each item under its own timeout.

    `func` must be a module-level function (workers import it by name). `map`
    is thread-safe: concurrent callers take turns on the same workers.
    """

    def __init__(
        self,
        func: Callable[[T], R],
        workers: int | None = None,
        *,
        preload: Sequence[str] = (),
        memory_limit: int | None = 4 << 30,
    ) -> None:
        self._func = func
        self._size = max(1, workers or min(4, os.cpu_count() or 1))
        self._memory_limit = memory_limit
        self._ctx: Any = multiprocessing.get_context("forkserver")
        if preload:
            self._ctx.set_forkserver_preload(list(preload))
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.replaced = 0  # workers killed for timeouts or deaths, for benchmarks and tests

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self._func, self._memory_limit)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()
        self.replaced += 1

    def map(self, items: Sequence[T], timeout: float) -> list[Outcome[R]]:
        if not items:
            return []
        with self._lock:
            while len(self._workers) < min(self._size, len(items)):
                self._workers.append(self._spawn())
            return self._run(items, timeout)

    def _run(self, items: Sequence[T], timeout: float) -> list[Outcome[R]]:
        results: list[Outcome[R] | None] = [None] * len(items)
        next_index = 0
        remaining = len(items)
        while remaining:
            for worker in list(self._workers):
                if worker.index is None and next_index < len(items):
                    try:
                        worker.conn.send((next_index, items[next_index]))
                    except (BrokenPipeError, OSError):
                        self._replace(worker)  # died while idle; the item waits for the next turn
                        continue
                    worker.index, worker.deadline = next_index, time.monotonic() + timeout
                    next_index += 1
            busy = [w for w in self._workers if w.index is not None]
            if not busy:
                continue
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            handles: list[Any] = [w.conn for w in busy] + [w.proc.sentinel for w in busy]
            multiprocessing.connection.wait(handles, timeout=wait_s)
            now = time.monotonic()
            for worker in busy:
                index = worker.index
                assert index is not None
                outcome = self._collect(worker, now)
                if outcome is None:
                    continue
                results[index] = outcome
                remaining -= 1
        return [r if r is not None else Outcome("error", error="lost") for r in results]

    def _collect(self, worker: _Worker, now: float) -> Outcome[R] | None:
        """The finished item of a busy worker, or None while it is still within time."""
        try:
            if worker.conn.poll():
                _, status, value, error = worker.conn.recv()
                worker.index = None
                return Outcome(status, value, error)
        except (EOFError, OSError):
            pass
        else:
            if worker.proc.is_alive() and now < worker.deadline:
                return None
            if worker.proc.is_alive():
                self._replace(worker)
                return Outcome("timeout", error="timed out; worker killed and replaced")
        code = worker.proc.exitcode
        self._replace(worker)
        return Outcome("error", error=f"worker died (exit code {code})")

    def close(self) -> None:
        with self._lock:
            for worker in self._workers:
                worker.stop()
            self._workers.clear()

    def __enter__(self) -> ProcessPool[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
