"""A pool of warm, never-used kernels, refilled in the background.

With the bwrap tier the pool forks kernels from a zygote (``sandbox.zygote``);
other tiers cold-start them. ``acquire`` hands out a kernel nobody has used; a
released kernel is shut down, never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from sandbox.errors import KernelClosedError, SandboxError
from sandbox.kernel import Kernel
from sandbox.launch import Launcher, Spawned
from sandbox.policy import SandboxPolicy


def pool_launcher(policy: SandboxPolicy) -> Launcher:
    from sandbox.tiers import choose_tier, launcher_for
    from sandbox.zygote import ZygoteLauncher

    if choose_tier(policy) == "bwrap":
        return ZygoteLauncher(policy)
    return launcher_for(policy)


class KernelPool:
    def __init__(self, policy: SandboxPolicy | None = None, size: int = 2, max_starting: int = 4) -> None:
        self.policy = policy or SandboxPolicy()
        self.size = max(1, size)
        # Kernels starting at once in the background: enough to hide each
        # start's latency, few enough not to starve running cells of CPU.
        self.max_starting = max(1, max_starting)
        self._launcher: Launcher | None = None
        self._ready: asyncio.Queue[Spawned] = asyncio.Queue()
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False
        self._failures = 0
        self.last_error: Exception | None = None
        self._live: set[Kernel] = set()
        self._teardowns: set[asyncio.Future[None]] = set()

    @property
    def launcher(self) -> Launcher:
        if self._launcher is None:
            raise SandboxError("the pool is not started; use `async with KernelPool(...)` or await start()")
        return self._launcher

    async def start(self) -> None:
        if self._closed:
            raise KernelClosedError("the kernel pool is closed")
        if self._launcher is not None:
            return
        self._launcher = pool_launcher(self.policy)
        # Fail here, with the reason, if kernels cannot start at all.
        first = await self._launcher.spawn()
        self._ready.put_nowait(first)
        self._top_up()

    def _top_up(self) -> None:
        if self._closed or self._launcher is None:
            return
        while self._ready.qsize() + len(self._starting) < self.size and len(self._starting) < self.max_starting:
            task = asyncio.create_task(self._start_one())
            self._starting.add(task)
            task.add_done_callback(self._started)

    async def _start_one(self) -> None:
        try:
            spawned = await self.launcher.spawn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Kept for whoever wonders why the pool is empty; acquire() starts
            # a kernel itself and raises the real error there.
            self.last_error = exc
            self._failures += 1
            # Back off so a broken machine is not hammered in a tight loop.
            await asyncio.sleep(min(0.1 * 2**self._failures, 5.0))
            return
        self._failures = 0
        if self._closed:
            await spawned.destroy()
            return
        self._ready.put_nowait(spawned)

    def _started(self, task: asyncio.Task[None]) -> None:
        self._starting.discard(task)
        self._top_up()

    async def acquire(self) -> Kernel:
        """A fresh kernel nobody has used; starts one on the spot if none is ready."""
        if self._closed:
            raise KernelClosedError("the kernel pool is closed")
        await self.start()
        while True:
            try:
                spawned = self._ready.get_nowait()
            except asyncio.QueueEmpty:
                spawned = await self.launcher.spawn()
            self._top_up()
            if spawned.handle.exited:
                await spawned.destroy()
                continue
            kernel = Kernel(spawned, self.launcher)
            self._live.add(kernel)
            return kernel

    async def release(self, kernel: Kernel) -> None:
        """Shut the kernel down; kernels are never reused.

        The kernel is killed before this returns (SIGKILL to its pid namespace's
        init: no graceful round trip, it would buy nothing); reaping it and
        removing its cgroup and dirs go on in the background, and ``close``
        waits for them.
        """
        self._live.discard(kernel)
        task = asyncio.ensure_future(kernel.shutdown())
        self._teardowns.add(task)
        task.add_done_callback(self._torn_down)
        # Let the task run up to its first wait: the kill has been sent.
        await asyncio.sleep(0)

    def _torn_down(self, task: asyncio.Future[None]) -> None:
        self._teardowns.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.last_error = task.exception()  # type: ignore[assignment]

    @property
    def ready(self) -> int:
        return self._ready.qsize()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._starting):
            task.cancel()
        for task in list(self._starting):
            with contextlib.suppress(BaseException):
                await task
        pending: list[Spawned] = []
        while not self._ready.empty():
            pending.append(self._ready.get_nowait())
        await asyncio.gather(
            *(s.destroy() for s in pending), *(k.shutdown() for k in list(self._live)), return_exceptions=True
        )
        self._live.clear()
        if self._teardowns:
            await asyncio.gather(*list(self._teardowns), return_exceptions=True)
        if self._launcher is not None:
            await self._launcher.close()

    async def __aenter__(self) -> KernelPool:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
