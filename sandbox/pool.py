"""A pool of warm, never-used kernels, refilled in the background.

With the bwrap tier the pool forks kernels from a zygote (``sandbox.zygote``);
other tiers cold-start them. ``acquire`` hands out a kernel nobody has used; a
released kernel is shut down, never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sandbox.errors import KernelClosedError, SandboxError
from sandbox.kernel import Kernel
from sandbox.launch import Launcher, Spawned
from sandbox.policy import SandboxPolicy

if TYPE_CHECKING:
    from sandbox.fork import Forked, RecordedCell


def pool_launcher(policy: SandboxPolicy) -> Launcher:
    from sandbox.tiers import choose_tier, launcher_for
    from sandbox.zygote import ZygoteLauncher

    if choose_tier(policy) == "bwrap":
        return ZygoteLauncher(policy)
    return launcher_for(policy)


class KernelPool:
    """Warm kernels, refilled in the background with at most ``max_starting`` starts at a time.

    ``size`` kernels are kept ready; callers of ``acquire`` that find none
    wait for the next one started, never starting their own: a drained pool
    (a burst of a thousand acquires) starts kernels ``max_starting`` at a time,
    not all at once.
    """

    def __init__(self, policy: SandboxPolicy | None = None, size: int = 2, max_starting: int = 4) -> None:
        self.policy = policy or SandboxPolicy()
        self.size = max(1, size)
        # Kernels starting at once in the background: enough to hide each
        # start's latency, few enough not to starve running cells of CPU.
        self.max_starting = max(1, max_starting)
        self._launcher: Launcher | None = None
        self._ready: deque[Spawned] = deque()
        self._waiters: deque[asyncio.Future[Spawned]] = deque()
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
        self._deliver(first)
        self._top_up()

    def _top_up(self) -> None:
        if self._closed or self._launcher is None:
            return
        wanted = self.size + len(self._waiters) - len(self._ready) - len(self._starting)
        for _ in range(min(wanted, self.max_starting - len(self._starting))):
            task = asyncio.create_task(self._start_one())
            self._starting.add(task)
            task.add_done_callback(self._started)

    async def _start_one(self) -> None:
        try:
            spawned = await self.launcher.spawn()
        except Exception as exc:
            self.last_error = exc
            self._failures += 1
            # Whoever waits longest gets the real error rather than waiting on.
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(exc)
                    break
            # Back off so a broken machine is not hammered in a tight loop.
            await asyncio.sleep(min(0.1 * 2**self._failures, 5.0))
            return
        self._failures = 0
        if self._closed:
            await spawned.destroy()
            return
        self._deliver(spawned)

    def _deliver(self, spawned: Spawned) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(spawned)
                return
        self._ready.append(spawned)

    def _started(self, task: asyncio.Task[None]) -> None:
        self._starting.discard(task)
        self._top_up()

    async def acquire(self, refill: bool = True) -> Kernel:
        """A fresh kernel nobody has used; waits for the next one started if none is ready.

        ``refill=False``: the kernel taken from those ready is replaced only at the
        caller's ``refill()`` (a fork: a start would compete with it for the CPU).
        """
        if self._closed:
            raise KernelClosedError("the kernel pool is closed")
        await self.start()
        while True:
            spawned = self._ready.popleft() if self._ready else await self._wait()
            if refill:
                self._top_up()
            if spawned.handle.exited:
                self._tear_down(spawned.destroy())
                continue
            kernel = Kernel(spawned, self.launcher)
            self._live.add(kernel)
            return kernel

    def refill(self) -> None:
        """Start kernels up to ``size`` ready (after ``acquire(refill=False)``)."""
        self._top_up()

    async def _wait(self) -> Spawned:
        waiter: asyncio.Future[Spawned] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._top_up()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a kernel just as the caller gave up: pass it on.
                self._deliver(waiter.result())
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    async def release(self, kernel: Kernel) -> None:
        """Shut the kernel down; kernels are never reused.

        The kernel is killed before this returns (SIGKILL to its pid namespace's
        init: no graceful round trip, it would buy nothing); reaping it and
        removing its cgroup and dirs go on in the background, and ``close``
        waits for them.
        """
        self._live.discard(kernel)
        self._tear_down(kernel.shutdown())
        # Let the task run up to its first wait: the kill has been sent.
        await asyncio.sleep(0)

    def _tear_down(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._teardowns.add(task)
        task.add_done_callback(self._torn_down)

    def _torn_down(self, task: asyncio.Future[None]) -> None:
        self._teardowns.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.last_error = task.exception()  # type: ignore[assignment]

    async def fork(self, kernel: Kernel, cells: Sequence[RecordedCell] = ()) -> tuple[Kernel, Forked]:
        """A new kernel of this pool holding a copy of ``kernel``'s state, and how it was made
        (a snapshot, or ``cells`` re-run where one cannot be taken): see ``sandbox.fork``."""
        from sandbox.fork import fork_kernel

        return await fork_kernel(self, kernel, cells)

    @property
    def ready(self) -> int:
        return len(self._ready)

    @property
    def starting(self) -> int:
        return len(self._starting)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(KernelClosedError("the kernel pool was closed"))
        self._waiters.clear()
        for task in self._starting:
            task.cancel()
        if self._starting:
            await asyncio.wait(set(self._starting))
        pending = list(self._ready)
        self._ready.clear()
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
