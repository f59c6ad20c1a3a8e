"""A pool of warm, never-used kernels, refilled in the background."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from sandbox.errors import KernelClosedError, SandboxError
from sandbox.kernel import Kernel
from sandbox.launch import Launcher, Spawned
from sandbox.policy import SandboxPolicy


class KernelPool:
    def __init__(self, policy: SandboxPolicy | None = None, size: int = 2) -> None:
        self.policy = policy or SandboxPolicy()
        self.size = max(1, size)
        self._launcher: Launcher | None = None
        self._ready: asyncio.Queue[Spawned] = asyncio.Queue()
        self._refill: asyncio.Task[None] | None = None
        self._wanted = asyncio.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._live: set[Kernel] = set()

    async def start(self) -> None:
        from sandbox.tiers import launcher_for

        if self._launcher is not None:
            return
        self._launcher = launcher_for(self.policy)
        self._refill = asyncio.create_task(self._refill_loop())
        self._wanted.set()

    async def _refill_loop(self) -> None:
        assert self._launcher is not None
        while not self._closed:
            await self._wanted.wait()
            self._wanted.clear()
            while not self._closed and self._ready.qsize() < self.size:
                try:
                    spawned = await self._launcher.spawn()
                except SandboxError as exc:
                    self._error = exc
                    await asyncio.sleep(0.5)
                    continue
                self._error = None
                if self._closed:
                    await spawned.destroy()
                    return
                self._ready.put_nowait(spawned)

    async def acquire(self) -> Kernel:
        if self._closed:
            raise KernelClosedError("the kernel pool is closed")
        if self._launcher is None:
            await self.start()
        assert self._launcher is not None
        while True:
            try:
                spawned = self._ready.get_nowait()
            except asyncio.QueueEmpty:
                spawned = await self._launcher.spawn()
            self._wanted.set()
            if spawned.handle.exited:
                await spawned.destroy()
                continue
            kernel = Kernel(spawned, self._launcher)
            self._live.add(kernel)
            return kernel

    async def release(self, kernel: Kernel) -> None:
        self._live.discard(kernel)
        await kernel.shutdown()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wanted.set()
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(BaseException):
                await self._refill
        pending: list[Spawned] = []
        while not self._ready.empty():
            pending.append(self._ready.get_nowait())
        await asyncio.gather(*(s.destroy() for s in pending), *(k.shutdown() for k in list(self._live)))
        self._live.clear()
        if self._launcher is not None:
            await self._launcher.close()

    async def __aenter__(self) -> KernelPool:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
