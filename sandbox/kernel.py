"""One kernel: run a cell under a deadline and always come back with a ``CellResult``.

Where a kernel is killed: ``Kernel._replace`` (after a failed interrupt, after
death) and ``Kernel.shutdown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import time
from types import TracebackType
from typing import Any

from sandbox.client import Collected
from sandbox.errors import KernelClosedError
from sandbox.launch import Launcher, Spawned
from sandbox.policy import SandboxPolicy
from sandbox.process import wait_first
from sandbox.result import CellError, CellResult, CellStatus


class Kernel:
    """A kernel process plus what is needed to replace it when it dies or hangs."""

    def __init__(self, spawned: Spawned, launcher: Launcher) -> None:
        self._spawned = spawned
        self._launcher = launcher
        self.policy: SandboxPolicy = launcher.policy
        self._lock = asyncio.Lock()
        self._closed = False
        self._restarts = 0
        self._cleanup: asyncio.Task[None] | None = None

    @property
    def info(self) -> dict[str, Any]:
        return {
            "tier": self._spawned.tier,
            "python": platform.python_version(),
            "pid": self._spawned.handle.pid,
            "restarts": self._restarts,
            "limits": self.policy.limits_summary(),
            "protections": self._spawned.protections,
        }

    @property
    def closed(self) -> bool:
        return self._closed

    async def execute(self, code: str, timeout: float | None = None) -> CellResult:
        if self._closed:
            raise KernelClosedError("this kernel was shut down; start a new one")
        limit = self.policy.timeout_s if timeout is None else timeout
        async with self._lock:
            if self._closed:
                raise KernelClosedError("this kernel was shut down; start a new one")
            if self._cleanup is not None:
                # A cancelled cell is still being interrupted; wait for it.
                with contextlib.suppress(BaseException):
                    await self._cleanup
                self._cleanup = None
            return await self._run(code, limit)

    async def _run(self, code: str, limit: float) -> CellResult:
        if self._spawned.handle.exited:
            await self._replace()
        spawned = self._spawned
        started = time.monotonic()
        into = Collected(self.policy.max_output_bytes)
        msg_id = spawned.client.send_execute(code)
        collect = asyncio.ensure_future(spawned.client.collect(msg_id, into))
        died = spawned.handle.exited_future()
        try:
            done = await wait_first(collect, died, timeout=limit)
        except asyncio.CancelledError:
            # Leave the kernel usable for whoever calls next: interrupt in the
            # background while still holding the lock, then re-raise.
            self._cleanup = asyncio.ensure_future(self._settle_quietly(collect, into))
            raise
        if collect in done:
            if not collect.cancelled() and collect.exception() is None:
                return self._result(into, started, None)
            if self._closed:
                raise KernelClosedError("this kernel was shut down while running a cell")
            # The client side broke (sockets closed under it): same as a death.
            await self._replace()
            return self._result(into, started, "died")
        if died in done:
            await _cancel(collect)
            await self._replace()
            return self._result(into, started, "died")
        # Deadline passed: interrupt, give it a grace period, else kill.
        settled = await self._settle(collect, into)
        return self._result(into, started, "timeout", restarted=not settled, limit=limit)

    async def _settle(self, collect: asyncio.Future[None], into: Collected) -> bool:
        """Interrupt the running cell; True if the kernel recovered, False if it was replaced."""
        spawned = self._spawned
        with contextlib.suppress(Exception):
            spawned.client.send_interrupt()
        died = spawned.handle.exited_future()
        done = await wait_first(collect, died, timeout=self.policy.interrupt_grace_s)
        if collect in done and collect.exception() is None:
            return True
        await _cancel(collect)
        await self._replace()
        return False

    async def _settle_quietly(self, collect: asyncio.Future[None], into: Collected) -> None:
        with contextlib.suppress(Exception):
            await self._settle(collect, into)

    async def _replace(self) -> None:
        old = self._spawned
        self._restarts += 1
        await old.destroy()
        if self._closed:
            # shutdown() ran while a cell was in flight: do not start a new process.
            raise KernelClosedError("this kernel was shut down while running a cell")
        self._spawned = await self._launcher.spawn()

    def _result(
        self,
        into: Collected,
        started: float,
        forced: CellStatus | None,
        restarted: bool = False,
        limit: float = 0.0,
    ) -> CellResult:
        duration = time.monotonic() - started
        error = into.error
        status: CellStatus
        if forced == "timeout":
            status = "timeout"
            how = "the kernel was restarted and its state lost" if restarted else "interrupted"
            error = CellError(
                ename="TimeoutError",
                evalue=f"cell exceeded the {limit:g} s time limit ({how})",
                traceback=[],
            )
        elif forced == "died":
            status = "died"
            restarted = True
            error = CellError(
                ename="KernelDied",
                evalue="the kernel process died (e.g. os._exit, out of memory, killed); "
                "it was restarted and its state lost",
                traceback=[],
            )
        else:
            content = into.reply["content"] if into.reply else {}
            if content.get("status") == "error" or error is not None:
                status = "error"
                if error is None:
                    error = CellError(
                        ename=str(content.get("ename", "Error")),
                        evalue=str(content.get("evalue", "")),
                        traceback=[],
                    )
            else:
                status = "ok"
        return CellResult(
            status=status,
            stdout=into.out.stdout.text(),
            stderr=into.out.stderr.text(),
            display=list(into.out.display),
            error=error,
            duration_s=duration,
            truncated=into.out.truncated,
            restarted=restarted,
        )

    async def interrupt(self) -> None:
        if not self._closed and not self._spawned.handle.exited:
            self._spawned.client.send_interrupt()

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._cleanup is not None and not self._cleanup.done():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._cleanup), self.policy.interrupt_grace_s + 1)
        await self._spawned.destroy()

    async def __aenter__(self) -> Kernel:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()


async def _cancel(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.cancel()
    with contextlib.suppress(BaseException):
        await fut


async def start_kernel(policy: SandboxPolicy | None = None) -> Kernel:
    """Start one fresh kernel (not pooled) under the strongest isolation the policy allows."""
    from sandbox.tiers import launcher_for

    launcher = launcher_for(policy or SandboxPolicy())
    spawned = await launcher.spawn()
    return Kernel(spawned, launcher)
