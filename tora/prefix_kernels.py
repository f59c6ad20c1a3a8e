"""Kernels for trajectories that start from a prefix: its cells run once, each continuation gets a fork.

A trajectory that starts part-way (`tora.engine.Prefix`: a `tora correct`
continuation, a sample of `tora curate --branch-after-cell`) needs a kernel
holding the state its prefix's cells left. Re-running them once per
continuation costs their time again each time, and is wrong where a cell used
randomness, time or files: each continuation would see another state. Here
one kernel per shared prefix (its *stem*) holds that state, and each
continuation gets a copy of it (`KernelPool.fork`: a snapshot of the cells'
names, the RNG states, the cwd and the work dir's files, loaded into a fresh,
separately sandboxed kernel); the stem's last continuation gets the stem's
kernel itself. Where no snapshot can be taken (a cell left threads or child
processes, state that cannot be pickled) the fork re-runs the prefix's cells
instead, and the record says so and why (`KernelState`, schema 1.3).

- `tora correct`: the prefixes of one wrong trajectory, of different lengths,
  share their first cells. The stem runs the parent's cells once, in order,
  and is forked for each continuation when it holds that continuation's
  cells; before it moves on, a copy is kept at a point continuations still
  wait for. The parent's own kernel is gone, so the stem's state is a re-run:
  cells whose outcome differs from the parent's record are named in
  `diverged`.
- `tora curate --branch-after-cell`: the stem is a fork of the kernel that
  generated the shared prefix, taken right after its first cell, so every
  sample continues from the very state whose output the prefix shows.

A stem's kernels (its own and the copies it keeps) are not counted among the
scheduler's live kernels: at most one per open stem plus one per prefix length
still awaited. The kernels handed to continuations are (`LiveKernels.take`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sandbox import CellError, CellResult, Kernel
from sandbox.fork import Forked, RecordedCell
from tora.record.schema import CodeStep, ExecutionStep, KernelState, Step

if TYPE_CHECKING:
    from tora.engine import KernelLike, Prefix
    from tora.render import CellLike

T = TypeVar("T")


class ForkingPool(Protocol):
    """The kernels a stem takes and forks (sandbox.KernelPool fits)."""

    async def acquire(self) -> Kernel: ...

    async def release(self, kernel: Kernel) -> None: ...

    async def fork(self, kernel: Kernel, cells: Sequence[RecordedCell] = ()) -> tuple[Kernel, Forked]: ...


class CountedKernels(Protocol):
    """An episode's kernel source that can count a kernel made elsewhere (scheduler.LiveKernels fits)."""

    async def take(self, make: Callable[[], Awaitable[T]]) -> T: ...


def recorded_cells(steps: Sequence[Step], timeout_s: float) -> list[RecordedCell]:
    """The cells of `steps` with their outcomes as recorded (each code step and the execution after it)."""
    cells: list[RecordedCell] = []
    code: CodeStep | None = None
    for step in steps:
        if isinstance(step, CodeStep):
            code = step
        elif isinstance(step, ExecutionStep) and code is not None:
            err = step.error
            result = CellResult(status=step.status, stdout=step.stdout, stderr=step.stderr, display=step.display,
                                error=None if err is None else CellError(ename=err.ename, evalue=err.evalue,
                                                                         traceback=err.traceback),
                                duration_s=step.duration_s, truncated=step.truncated)
            cells.append(RecordedCell(code=code.content, timeout_s=timeout_s, result=result))
            code = None
    return cells


def same_as_recorded(recorded: CellResult, again: CellLike) -> bool:
    """Whether a re-run came out as recorded. Tracebacks are not compared: they name the cell
    numbers of the kernel that ran them."""
    def err(e: Any) -> tuple[str, str] | None:
        return None if e is None else (e.ename, e.evalue)

    return ((recorded.status, recorded.stdout, recorded.stderr, list(recorded.display), err(recorded.error))
            == (again.status, again.stdout, again.stderr, list(again.display), err(again.error)))


async def rerun(kernel: KernelLike, cells: Sequence[RecordedCell], start: int = 0) -> list[int]:
    """Run `cells` in order in `kernel`; the indexes (from `start`) of those that came out differently."""
    diverged: list[int] = []
    for i, cell in enumerate(cells, start):
        again = await kernel.execute(cell.code, timeout=cell.timeout_s)
        if not same_as_recorded(cell.result, again):
            diverged.append(i)
    return diverged


def forked_state(base: KernelState, forked: Forked, cells: int) -> KernelState:
    """The state of a fork of a kernel whose state is `base`."""
    if forked.method == "snapshot":
        return KernelState(method="fork", cells=cells, reason=base.reason,
                           diverged=[i for i in base.diverged if i < cells], snapshot_bytes=forked.size)
    return KernelState(method="replay", cells=cells, reason=forked.reason, diverged=list(forked.diverged))


class _Stem:
    """One shared prefix: the kernel that holds its state, advanced cell by cell, and the copies
    kept for continuations that wait for an earlier point."""

    def __init__(self, pool: ForkingPool, cells: list[RecordedCell]) -> None:
        self.pool = pool
        self.cells = cells
        self.expected: Counter[int] = Counter()  # continuations still to come, by prefix cells
        self.lock = asyncio.Lock()
        self.head: Kernel | None = None
        self.at = 0  # cells the head has run
        self.state = KernelState(method="replay")  # how the head got its state
        self.copies: dict[int, tuple[Kernel, KernelState]] = {}
        self.reading: Counter[Kernel] = Counter()  # forks under way, by source kernel
        self.changed = asyncio.Condition()

    def seed(self, head: Kernel, at: int, state: KernelState) -> None:
        self.head, self.at, self.state = head, at, state

    @property
    def done(self) -> bool:
        return self.head is None and not self.copies and not +self.expected

    async def kernel(self, count: int, kernels: CountedKernels) -> tuple[Kernel, KernelState]:
        source: Kernel | None = None
        async with self.lock:
            if self.expected[count] > 0:
                self.expected[count] -= 1
            if count in self.copies:
                source, state = self.copies[count]
                if self.expected[count] == 0:  # the last one awaited here: the copy itself
                    del self.copies[count]
                    await self._quiet(source)
                    return await self._hand_over(source, kernels), state
            elif self.head is None or self.at <= count:
                await self._advance(count)
                assert self.head is not None
                source, state = self.head, self._state(count)
                if not any(n > 0 for c, n in self.expected.items() if c >= count):
                    self.head = None  # nothing else wants it: the head itself
                    await self._quiet(source)
                    return await self._hand_over(source, kernels), state
            if source is not None:
                self.reading[source] += 1
        if source is None:
            # Unplanned (not announced before the stem moved on): a kernel of its own.
            return await self._fresh(count, kernels, "the shared prefix's kernel had run past this prefix")
        # Outside the lock: forks of one source at one point run side by side (their snapshots
        # queue on the source kernel, their restores run in parallel); moving the source on, or
        # handing it over, waits for them (`_quiet`).
        try:
            return await self._fork(source, state, count, kernels)
        finally:
            async with self.changed:
                self.reading[source] -= 1
                self.changed.notify_all()

    async def _quiet(self, kernel: Kernel) -> None:
        """Wait until no fork of `kernel` is under way."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.reading[kernel] == 0)

    def _state(self, count: int) -> KernelState:
        return self.state.model_copy(update={"cells": count, "diverged": [i for i in self.state.diverged if i < count]})

    async def _hand_over(self, kernel: Kernel, kernels: CountedKernels) -> Kernel:
        """The stem's own kernel, now the continuation's (counted once a slot is free)."""
        try:
            return await kernels.take(_ready(kernel))
        except BaseException:
            await asyncio.shield(self.pool.release(kernel))
            raise

    async def _fork(self, source: Kernel, state: KernelState, count: int,
                    kernels: CountedKernels) -> tuple[Kernel, KernelState]:
        kernel, forked = await kernels.take(lambda: self.pool.fork(source, self.cells[:count]))
        return kernel, forked_state(state, forked, count)

    async def _fresh(self, count: int, kernels: CountedKernels, reason: str) -> tuple[Kernel, KernelState]:
        kernel = await kernels.take(self.pool.acquire)
        diverged = await rerun(kernel, self.cells[:count])
        return kernel, KernelState(method="replay", cells=count, reason=reason, diverged=diverged)

    async def _advance(self, count: int) -> None:
        if self.head is None:
            self.head, self.at, self.state = await self.pool.acquire(), 0, KernelState(method="replay")
        if self.at < count:
            await self._quiet(self.head)
        if self.at < count and self.at > 0 and self.expected[self.at] > 0:
            copy, forked = await self.pool.fork(self.head, self.cells[: self.at])
            self.copies[self.at] = (copy, forked_state(self.state, forked, self.at))
        if self.at < count:
            try:
                diverged = await rerun(self.head, self.cells[self.at : count], start=self.at)
            except BaseException:
                # Stopped part-way: the head's state is no known point of the prefix.
                head, self.head, self.at = self.head, None, 0
                await asyncio.shield(self.pool.release(head))
                raise
            self.state = self.state.model_copy(update={"diverged": [*self.state.diverged, *diverged]})
            self.at = count

    async def close(self) -> None:
        kernels = [k for k, _ in self.copies.values()] + ([self.head] if self.head is not None else [])
        self.head, self.copies = None, {}
        for kernel in kernels:
            await self.pool.release(kernel)


def _ready(kernel: Kernel) -> Callable[[], Awaitable[Kernel]]:
    async def made() -> Kernel:
        return kernel

    return made


class PrefixKernels:
    """The stems of one run, by key (the id of the trajectory whose steps are the prefix)."""

    def __init__(self, pool: ForkingPool) -> None:
        self.pool = pool
        self._stems: dict[str, _Stem] = {}

    def expect(self, key: str, steps: Sequence[Step], timeout_s: float, counts: Iterable[int]) -> None:
        """Announce continuations of the prefix `steps` (the longest one) that start after `counts` cells."""
        stem = self._stems.get(key)
        if stem is None:
            stem = self._stems[key] = _Stem(self.pool, recorded_cells(steps, timeout_s))
        stem.expected.update(c for c in counts if c > 0)

    def seed(self, key: str, head: Kernel, at: int, state: KernelState) -> None:
        """Give the stem of `key` its kernel, already holding `at` cells' state."""
        self._stems[key].seed(head, at, state)

    def expects(self, key: str) -> bool:
        return key in self._stems

    async def kernel(self, prefix: Prefix, kernels: Any) -> tuple[Kernel, KernelState] | None:
        """A kernel holding `prefix`'s state, or None where no stem of it was announced (or the
        episode's kernels cannot count a kernel made here): the caller re-runs the cells."""
        stem = self._stems.get(prefix.parent)
        if stem is None or not hasattr(kernels, "take"):
            return None
        try:
            return await stem.kernel(len(prefix.cells), kernels)
        finally:
            if stem.done and self._stems.get(prefix.parent) is stem:
                del self._stems[prefix.parent]

    async def drop(self, key: str) -> None:
        """Release a stem whose continuations will not all come (their jobs were withdrawn)."""
        stem = self._stems.pop(key, None)
        if stem is not None:
            async with stem.lock:
                await stem.close()

    async def aclose(self) -> None:
        for key in list(self._stems):
            await self.drop(key)
