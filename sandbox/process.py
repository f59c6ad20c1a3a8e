"""Watching a kernel process from the event loop.

A pidfd becomes readable the moment its process exits, so death is noticed by
the event loop itself (no polling, no thread per kernel) and works for processes
that are not our children (kernels forked by a zygote).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from sandbox import cgroups


class ProcessHandle:
    def __init__(
        self,
        pid: int,
        popen: subprocess.Popen[bytes] | None = None,
        group: bool = False,
        cgroup: Path | None = None,
    ) -> None:
        self.pid = pid
        self.cgroup = cgroup
        # The process leads its own session: killing the group also takes
        # what user code started (the only cleanup a tier without a pid
        # namespace has).
        self._group = group
        self._popen = popen
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int | None] = self._loop.create_future()
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._finish()
            return
        self._loop.add_reader(self._pidfd, self._finish)

    def _finish(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        code: int | None = None
        if self._popen is not None:
            # The process has exited, so this reaps the zombie without blocking.
            code = self._popen.poll()
        if not self._exited.done():
            self._exited.set_result(code)

    @property
    def exited(self) -> bool:
        return self._exited.done()

    async def wait(self) -> int | None:
        return await asyncio.shield(self._exited)

    def exited_future(self) -> asyncio.Future[int | None]:
        return self._exited

    def kill(self) -> None:
        if self._pidfd is None:
            return
        if self._group:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    async def kill_and_wait(self, timeout: float = 5.0) -> None:
        self.kill()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wait(), timeout)
        if self.cgroup is not None:
            # Whatever user code started and detached from the kernel.
            await asyncio.to_thread(cgroups.remove, self.cgroup)
            self.cgroup = None


async def wait_first(*futures: asyncio.Future[Any], timeout: float | None) -> set[asyncio.Future[Any]]:
    """The futures that finished first (empty on timeout); the others keep running."""
    done, _ = await asyncio.wait(set(futures), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    return done
