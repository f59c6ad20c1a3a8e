"""One kernel: run a cell under a deadline and always come back with a ``CellResult``.

Where a kernel is killed: ``Kernel._replace`` (after a failed interrupt, after
death, after its output channel broke) and ``Kernel.shutdown``.

The deadline is a timer of the event loop, not a check inside any read loop:
the client hands the loop back after every slice of work (``sandbox.zmtp``),
so the timer fires on time whatever the cell prints.
"""

from __future__ import annotations

import asyncio
import platform
import time
from collections import Counter
from types import TracebackType
from typing import Any, Literal

from sandbox import cgroups
from sandbox.client import Collected
from sandbox.errors import KernelClosedError
from sandbox.launch import Launcher, Spawned
from sandbox.policy import SandboxPolicy
from sandbox.process import wait_first
from sandbox.result import CellError, CellResult, CellStatus

# Why a cell's result is not what the kernel replied.
Forced = Literal["timeout", "died", "output_lost", "protocol"]

# After a timeout or an interrupt, before the next cell: does the kernel still
# answer, and can it still open a file? A thread left holding the GIL, or a
# cell that used up its file descriptors, leaves a kernel that cannot; it is
# replaced then, and the next cell is told its state is gone, instead of
# failing for reasons of its own.
PROBE_CODE = "import os as _o; _o.close(_o.open('/dev/null', _o.O_RDONLY)); del _o"
PROBE_S = 2.0


class Kernel:
    """A kernel process plus what is needed to replace it when it dies or hangs."""

    def __init__(self, spawned: Spawned, launcher: Launcher) -> None:
        self._spawned = spawned
        self._launcher = launcher
        self.policy: SandboxPolicy = launcher.policy
        self._lock = asyncio.Lock()
        self._closed = False
        self._restarts = 0
        # What the clients of replaced processes counted (see KernelClient.counts).
        self._counts: Counter[str] = Counter()
        self._cleanup: asyncio.Future[CellResult] | None = None
        # Set after a timeout or an interrupt: probe before the next cell.
        self._suspect = False
        # Counts what may change the kernel's state (cells, interrupts, restarts); what
        # sandbox.fork keeps of a snapshot is dropped with each (``_changed``).
        self._generation = 0
        self.kept_snapshot: tuple[str, int] | None = None

    @property
    def info(self) -> dict[str, Any]:
        return {
            "tier": self._spawned.tier,
            "python": platform.python_version(),
            "pid": self._spawned.handle.pid,
            "restarts": self._restarts,
            "limits": self.policy.limits_summary(),
            "protections": self._spawned.protections,
            "messages": dict(self._counts + self._spawned.client.counts),
        }

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def generation(self) -> int:
        """Moves whenever the kernel's state may change: each cell (from before it runs), interrupt or restart."""
        return self._generation

    def _changed(self) -> None:
        self._generation += 1
        self.kept_snapshot = None

    async def execute(self, code: str, timeout: float | None = None, silent: bool = False) -> CellResult:
        """Run one cell. Cancelling the caller raises at once; the cell is settled in the background.

        ``silent``: not counted or kept in the kernel's history (In/Out, ``_``), as the
        runtime's own cells (a fork's snapshot and restore) are.
        """
        if self._closed:
            raise KernelClosedError("this kernel was shut down; start a new one")
        limit = self.policy.timeout_s if timeout is None else timeout
        async with self._lock:
            if self._cleanup is not None:
                # A cancelled cell is still being interrupted; wait for it
                # (a cancellation of this caller propagates from here too).
                await asyncio.wait({self._cleanup})
                self._cleanup = None
            if self._closed:
                raise KernelClosedError("this kernel was shut down; start a new one")
            return await self._run(code, limit, silent)

    async def _run(self, code: str, limit: float, silent: bool = False) -> CellResult:
        self._changed()
        lost = ""
        if self._spawned.handle.exited:
            await self._replace()
            lost = "the kernel had exited"
        elif self._suspect:
            self._suspect = False
            why = await self._probe()
            if why:
                await self._replace()
                lost = why
        started = time.monotonic()
        spawned = self._spawned
        into = spawned.client.execute(code, self.policy.max_output_bytes, silent=silent)
        if lost:
            into.out.stderr.add(
                f"[sandbox: {lost}; it was restarted and its state lost before this cell ran]\n"
            )
            into.restarted = True
        abandoned: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Everything after the send runs as its own task, so that a cancelled
        # caller returns at once while the kernel is settled (interrupted,
        # else replaced) behind it, still under the lock's protocol: the next
        # execute waits for ``_cleanup``.
        work = asyncio.ensure_future(self._complete(spawned, into, started, limit, abandoned))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if not work.done():
                abandoned.set_result(None)
                work.add_done_callback(_retrieve)
                self._cleanup = work
            raise

    async def _probe(self) -> str:
        """Empty if the kernel answers a tiny cell in time; else why not."""
        spawned = self._spawned
        into = spawned.client.execute(PROBE_CODE, 4096, silent=True)
        died = spawned.handle.exited_future()
        done = await wait_first(into.finished, died, timeout=max(PROBE_S, self.policy.interrupt_grace_s))
        into.finish()
        if died in done:
            return "the kernel died after the previous cell was interrupted"
        if into.broken is not None:
            return f"the kernel broke the wire protocol ({into.broken})"
        if into.finished not in done or into.reply is None:
            return "the kernel did not answer after the previous cell was interrupted"
        if into.reply.get("status") != "ok":
            what = into.reply.get("ename", "an error")
            return f"the kernel could not run a trivial cell after the previous one was interrupted ({what})"
        return ""

    async def _complete(
        self, spawned: Spawned, into: Collected, started: float, limit: float, abandoned: asyncio.Future[None]
    ) -> CellResult:
        died = spawned.handle.exited_future()
        done = await wait_first(into.finished, died, abandoned, timeout=limit)
        if into.finished in done and into.broken is not None:
            await self._replace()
            return self._result(into, started, "protocol")
        if into.finished in done:
            if into.replied and not into.heard:
                # The kernel answered but nothing came on iopub, not even its
                # "busy": the output channel is broken (closed, flooded or
                # stopped by the cell), and every later cell would be silent.
                await self._replace()
                return self._result(into, started, "output_lost")
            return self._result(into, started, None)
        if died in done:
            into.finish()
            await self._replace()
            return self._result(into, started, "died")
        # Deadline passed, or the caller gave up: interrupt, give it a grace
        # period, else kill. Also when a reply came but the kernel is still
        # busy (output keeps coming): nothing a cell sends, a reply it signed
        # itself included, switches its deadline off.
        settled = await self._settle(spawned, into)
        if into.broken is not None and settled:
            await self._replace()
            settled = False
        # An interrupted kernel is probed before its next cell.
        self._suspect = settled
        return self._result(into, started, "timeout", restarted=not settled, limit=limit)

    async def _settle(self, spawned: Spawned, into: Collected) -> bool:
        """Interrupt the running cell; True if the kernel recovered, False if it was replaced."""
        spawned.client.send_interrupt()
        died = spawned.handle.exited_future()
        done = await wait_first(into.finished, died, timeout=self.policy.interrupt_grace_s)
        if into.finished in done:
            return True
        into.finish()
        await self._replace()
        return False

    async def _replace(self) -> None:
        self._changed()
        old = self._spawned
        self._suspect = False
        self._restarts += 1
        self._counts += old.client.counts
        await old.destroy()
        if self._closed:
            # shutdown() ran while a cell was in flight: do not start a new process.
            raise KernelClosedError("this kernel was shut down while running a cell")
        new = await self._launcher.spawn()
        if self._closed:
            await new.destroy()
            raise KernelClosedError("this kernel was shut down while running a cell")
        self._spawned = new

    def _result(
        self,
        into: Collected,
        started: float,
        forced: Forced | None,
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
        elif forced == "protocol":
            status = "error"
            restarted = True
            error = CellError(
                ename="ProtocolError",
                evalue=f"the kernel broke the wire protocol ({into.broken}); "
                "it was restarted and its state lost",
                traceback=[],
            )
        elif forced == "output_lost":
            status = "error"
            restarted = True
            error = CellError(
                ename="OutputLost",
                evalue="the cell ran but none of its output reached the runtime (the kernel's output "
                "channel was closed or flooded); the kernel was restarted and its state lost",
                traceback=[],
            )
        else:
            reply = into.reply or {}
            if reply.get("status") == "error" or error is not None:
                status = "error"
                if error is None:
                    error = CellError(
                        ename=reply.get("ename", "Error"),
                        evalue=reply.get("evalue", ""),
                        traceback=[],
                    )
            else:
                status = "ok"
        return CellResult(
            status=status,
            stdout=into.out.stdout.text(),
            stderr=into.out.stderr_text(),
            display=list(into.out.display),
            error=error,
            duration_s=duration,
            truncated=into.out.truncated or into.dropped > 0,
            restarted=restarted or into.restarted,
            dropped=into.dropped,
        )

    def lower_memory(self, memory_mb: int) -> bool:
        """Lower this kernel's memory cgroup to ``memory_mb`` (never above the policy's), for its
        current process only: a replacement gets the policy's. False where it has no memory group."""
        limit = min(memory_mb, self.policy.memory_mb) * 1024 * 1024
        return cgroups.lower_memory(self._spawned.handle.cgroup, limit)

    async def interrupt(self) -> None:
        if not self._closed and not self._spawned.handle.exited:
            self._changed()
            self._spawned.client.send_interrupt()
            self._suspect = True

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._cleanup is not None and not self._cleanup.done():
                # Let an interrupt in flight finish, briefly; it sees _closed
                # and starts nothing new.
                await asyncio.wait({self._cleanup}, timeout=self.policy.interrupt_grace_s + 1)
        finally:
            # Even when the caller is cancelled: never leave the process behind.
            await asyncio.shield(self._spawned.destroy())

    async def __aenter__(self) -> Kernel:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()


def _retrieve(task: asyncio.Future[CellResult]) -> None:
    """A background settle's outcome has no reader; keep asyncio from warning about it."""
    if not task.cancelled():
        task.exception()


async def start_kernel(policy: SandboxPolicy | None = None) -> Kernel:
    """Start one fresh kernel (not pooled) under the strongest isolation the policy allows."""
    from sandbox.tiers import launcher_for

    launcher = launcher_for(policy or SandboxPolicy())
    spawned = await launcher.spawn()
    return Kernel(spawned, launcher)
