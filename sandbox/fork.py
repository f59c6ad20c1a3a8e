"""A copy of a live kernel's state in a new, separately sandboxed kernel (``KernelPool.fork``).

How the copy is made. The new kernel is a fresh pool kernel: its own namespaces,
cgroups, network, work dir and host user, exactly as any other. Into it goes a
snapshot the source kernel takes of itself: every name the cells defined (with
cloudpickle: functions, classes and lambdas of the cells by value, modules by
reference, re-imported on arrival), the state of ``random`` and of numpy's global
generator, the working directory, and the files of its work dir. The runtime only
relays the snapshot (bounded by the policy's output limit) and never unpickles it:
it is loaded in the new kernel, which belongs to the same author as the source.
Both halves run in the kernels (sandbox/inside/snapshot.py); a quiet source's
snapshot is kept for its next forks until it runs anything again.

Where a copy is not possible, the copy is made by re-running the source's recorded
cells in order instead, and the answer says so (``method="replay"`` and the
reason): a cell left threads or child processes running (they cannot be copied),
the state holds what cannot be pickled (open files, sockets, generators), or it
is larger than the limit. A replay can differ from the original where cells used
randomness, time, files or the network: each cell whose outcome differs is named in
``Forked.diverged``.

What this is not: a copy of the process (its memory as is, C-level state, module
state other than the RNGs). That would be slower, not faster: the child of a
``fork()`` must rebuild ipykernel's sockets and threads as any fresh kernel does,
and would need a hole in the seccomp filter to leave its parent's namespaces and
cgroups (see "Forking kernels" in sandbox/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from sandbox.inside.hardening import PLAIN_CELL
from sandbox.result import CellResult

if TYPE_CHECKING:
    from sandbox.kernel import Kernel
    from sandbox.pool import KernelPool


class RecordedCell(BaseModel):
    """A cell a kernel ran, and how it ended there."""

    model_config = ConfigDict(frozen=True)

    code: str
    timeout_s: float
    result: CellResult


class Forked(BaseModel):
    model_config = ConfigDict(frozen=True)

    method: Literal["snapshot", "replay"]
    reason: str = ""  # why a replay, where it was one
    size: int = 0  # bytes of the snapshot
    replayed: int = 0
    # Indexes of replayed cells whose status or output differs from the recorded run.
    diverged: list[int] = []


# The runtime's two cells call sandbox/inside/snapshot.py (preimported by the zygote as
# ``inside.snapshot``). Both start with PLAIN_CELL: the kernel runs them as plain Python,
# without IPython's per-character costs (see sandbox.inside.hardening); and both run
# silent (no execution count, no history: a fork leaves the source's In/Out as they were).
_SNAPSHOT = PLAIN_CELL + '__import__("inside.snapshot").snapshot.take(%d)\n'
# The new kernel's first cell: the data as one base64 string literal.
_RESTORE = PLAIN_CELL + '__import__("inside.snapshot").snapshot.restore(%r)\n'


async def _release_when_acquired(pool: KernelPool, acquiring: asyncio.Future[Kernel]) -> None:
    with contextlib.suppress(BaseException):
        await pool.release(await acquiring)


def same_outcome(a: CellResult, b: CellResult) -> bool:
    return (a.status, a.stdout, a.stderr, a.display, a.error) == (b.status, b.stdout, b.stderr, b.display, b.error)


def fork_preimports(preimport: Sequence[str]) -> list[str]:
    """What the snapshot and restore cells import, for the zygote to import before its fork
    (shared by every kernel instead of ~30 ms in each new one): their module, cloudpickle,
    tarfile, and numpy's global generator (whose state a fork copies) where numpy is preimported."""
    return ["cloudpickle", "tarfile", "inside.snapshot", *(["numpy.random"] if "numpy" in preimport else [])]


def snapshot_limit(kernel: Kernel) -> int:
    """The largest snapshot that fits one cell's output as base64 in JSON."""
    return int(kernel.policy.max_output_bytes * 0.74) - 1024


async def take_snapshot(kernel: Kernel) -> tuple[str | None, int, str]:
    """(base64 snapshot, its size, "") or (None, 0, why not).

    A snapshot of a quiet kernel (see sandbox/inside/snapshot.py) is kept on it until
    it runs anything again (``Kernel.generation``): the forks in between reuse it.
    """
    if kernel.kept_snapshot is not None:
        data, size = kernel.kept_snapshot
        return data, size, ""
    before = kernel.generation
    result = await kernel.execute(_SNAPSHOT % snapshot_limit(kernel), silent=True)
    if result.status != "ok" or result.truncated:
        why = f"{result.error.ename}: {result.error.evalue}" if result.error else result.status
        return None, 0, f"the snapshot cell failed ({'output over the limit' if result.truncated else why})"
    try:
        answer = json.loads(result.stdout)
    except json.JSONDecodeError:
        return None, 0, "the snapshot could not be read (the kernel's output was not the snapshot)"
    if not isinstance(answer, dict) or not isinstance(answer.get("size", 0), int):
        return None, 0, "the snapshot could not be read"
    if not answer.get("ok"):
        return None, 0, str(answer.get("why", "unknown"))
    data, size = str(answer.get("data")), int(answer.get("size", 0))
    # Kept only if no other cell ran since this one began (one generation: this cell's).
    if answer.get("quiet") is True and kernel.generation == before + 1:
        kernel.kept_snapshot = (data, size)
    return data, size, ""


async def _restore(kernel: Kernel, data: str) -> CellResult:
    return await kernel.execute(_RESTORE % data, silent=True)


async def replay(kernel: Kernel, cells: Sequence[RecordedCell]) -> tuple[int, list[int]]:
    """Re-run ``cells`` in ``kernel``: how many ran, and which came out differently.

    Cells that timed out or killed their kernel are not re-run (their effects
    were interrupted, or lost with the kernel).
    """
    diverged: list[int] = []
    replayed = 0
    for i, cell in enumerate(cells):
        if cell.result.status in ("timeout", "died") or cell.result.restarted:
            continue
        again = await kernel.execute(cell.code, timeout=cell.timeout_s)
        replayed += 1
        if not same_outcome(cell.result, again):
            diverged.append(i)
    return replayed, diverged


async def fork_kernel(pool: KernelPool, source: Kernel, cells: Sequence[RecordedCell] = ()) -> tuple[Kernel, Forked]:
    """A fresh kernel of ``pool`` holding ``source``'s state, and how it got there.

    ``cells``: what ``source`` ran since its state began, re-run where a
    snapshot cannot be taken or loaded. The caller owns the new kernel.
    """
    # The new kernel is acquired while the source takes its snapshot (from a drained pool,
    # that is a kernel start overlapping the snapshot), and the pool replaces it once the
    # copy is made (a kernel start takes more CPU than the fork: on few cores, it would
    # double the fork's time).
    acquiring = asyncio.ensure_future(pool.acquire(refill=False))
    try:
        try:
            data, size, why = await take_snapshot(source)
        except BaseException:
            acquiring.cancel()
            await _release_when_acquired(pool, acquiring)
            raise
        kernel = await acquiring
        if data is not None:
            try:
                loaded = await _restore(kernel, data)
            except BaseException:
                await pool.release(kernel)
                raise
            if loaded.status == "ok":
                return kernel, Forked(method="snapshot", size=size)
            err = f"{loaded.error.ename}: {loaded.error.evalue}" if loaded.error else loaded.status
            why = f"the snapshot could not be loaded in the new kernel ({err})"
            source.kept_snapshot = None  # the next fork tries a new one
            # The half-loaded kernel is not the state: start the replay from a fresh one.
            await pool.release(kernel)
            kernel = await pool.acquire(refill=False)
    finally:
        pool.refill()
    try:
        replayed, diverged = await replay(kernel, cells)
    except BaseException:
        await pool.release(kernel)
        raise
    return kernel, Forked(method="replay", reason=why, replayed=replayed, diverged=diverged)
