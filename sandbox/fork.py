"""A copy of a live kernel's state in a new, separately sandboxed kernel.

What is delivered: the copy is made by re-running the source's recorded cells,
in order, in a fresh pool kernel (its own namespaces, cgroups, network and
work dir, like every pool kernel), and every cell whose outcome differs from
the recorded one (randomness, time, files, the network, a cell that failed) is
named in ``Forked.diverged``. The method and the reason are always in the
answer: a caller never mistakes a replay for a copy.

What is not: copying the kernel process itself. A kernel runs under a seccomp
filter that denies ``unshare``/``setns``/``clone`` with namespace flags, and a
child of ``fork()`` inherits the filter and every namespace of its parent (its
pid, mount and network namespaces, its tmpfs work dir, its cgroups); no other
process can move a process into a new pid or mount namespace. A memory copy
therefore needs the kernel's own init (I, which is unfiltered and holds
CAP_SYS_ADMIN in the kernel's user namespace) to receive the copy: see
"Forking kernels" in sandbox/README.md for the design.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from sandbox.kernel import Kernel
from sandbox.pool import KernelPool
from sandbox.result import CellResult

NOT_COPIED = (
    "the kernel's memory was not copied: a kernel cannot be forked into new namespaces from inside its "
    "seccomp filter; its recorded cells were re-run in a fresh kernel instead"
)


class RecordedCell(BaseModel):
    """A cell a kernel ran, and how it ended there."""

    model_config = ConfigDict(frozen=True)

    code: str
    timeout_s: float
    result: CellResult


class Forked(BaseModel):
    model_config = ConfigDict(frozen=True)

    method: Literal["fork", "replay"]
    reason: str
    replayed: int = 0
    # Indexes of replayed cells whose status or output differs from the recorded run.
    diverged: list[int] = []


def same_outcome(a: CellResult, b: CellResult) -> bool:
    return (a.status, a.stdout, a.stderr, a.display, a.error) == (b.status, b.stdout, b.stderr, b.display, b.error)


async def fork_kernel(pool: KernelPool, cells: Sequence[RecordedCell]) -> tuple[Kernel, Forked]:
    """A fresh kernel of ``pool`` brought to the state ``cells`` left, and how that was done.

    The caller owns the kernel (``pool.release`` it). Cells that timed out or
    killed their kernel are not re-run: they left no state a later cell saw.
    """
    kernel = await pool.acquire()
    diverged: list[int] = []
    replayed = 0
    try:
        for i, cell in enumerate(cells):
            if cell.result.status in ("timeout", "died") or cell.result.restarted:
                continue
            again = await kernel.execute(cell.code, timeout=cell.timeout_s)
            replayed += 1
            if not same_outcome(cell.result, again):
                diverged.append(i)
    except BaseException:
        await pool.release(kernel)
        raise
    return kernel, Forked(method="replay", reason=NOT_COPIED, replayed=replayed, diverged=diverged)
