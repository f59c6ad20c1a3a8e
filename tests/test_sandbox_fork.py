"""Forking kernels in the library (``KernelPool.fork``): what is copied, what the source keeps,
when a snapshot is reused, and the kernel-side plain cells a fork's cells are.

The service's fork (and its replay fallback) is tested in tests/test_sandbox_service.py.
"""

from __future__ import annotations

import asyncio

import pytest

from sandbox import Kernel, KernelPool, SandboxPolicy
from sandbox.fork import RecordedCell
from sandbox.inside.hardening import PLAIN_CELL
from sandbox.result import CellResult


@pytest.fixture
async def pool() -> KernelPool:  # type: ignore[misc]
    async with KernelPool(SandboxPolicy(), size=1) as p:
        yield p


async def run(k: Kernel, code: str) -> str:
    r = await k.execute(code)
    assert r.status == "ok", r
    return r.stdout


async def test_fork_copies_state_and_leaves_the_source_as_it_was(pool: KernelPool) -> None:
    source = await pool.acquire()
    await run(source, "import numpy as np, random\nnp.random.seed(3)\nrandom.seed(4)\nimport os\nos.mkdir('d')")
    await run(source, "def f(n):\n    return n * 2\nopen('d/f.txt', 'w').write('x')\nys = [f(i) for i in range(3)]")
    await run(source, "n = len(In)")
    new, forked = await pool.fork(source)
    assert forked.method == "snapshot" and forked.size > 0, forked
    check = "print(ys, f(5), open('d/f.txt').read(), np.random.randint(10**9), random.random())"
    assert await run(new, check) == await run(source, check)
    # The fork's own cells are silent: nothing in the source's history (In, execution count).
    assert await run(source, "print(len(In) - n)") == "2\n"
    # The copy's own history starts empty (its restore cell is not in it): '', check, this cell.
    assert await run(new, "print(len(In))") == "3\n"
    for k in (source, new):
        await pool.release(k)


async def test_names_from_a_module_of_the_work_dir_are_copied(pool: KernelPool) -> None:
    source = await pool.acquire()
    # Pickled by reference: the copy imports the module from the files it received first.
    await run(source, "open('helpers.py', 'w').write('def triple(n):\\n    return 3 * n\\n')\nfrom helpers import triple")
    new, forked = await pool.fork(source)
    assert forked.method == "snapshot", forked
    assert await run(new, "print(triple(5))") == "15\n"
    for k in (source, new):
        await pool.release(k)


async def test_a_file_a_with_block_closed_is_copied_closed(pool: KernelPool) -> None:
    source = await pool.acquire()
    await run(source, "with open('a.txt', 'w') as f:\n    f.write('hi')\nwith open('a.txt', 'rb') as g:\n    data = g.read()")
    new, forked = await pool.fork(source)
    assert forked.method == "snapshot", forked
    assert await run(new, "print(f.closed, g.closed, data, open('a.txt').read())") == "True True b'hi' hi\n"
    # An open one still cannot be copied: the fork re-runs the cells instead, and says why.
    await run(source, "h = open('a.txt', 'rb')")
    cells = [RecordedCell(code="h = open('a.txt', 'rb')", timeout_s=5, result=CellResult(status="ok", duration_s=0))]
    other, forked = await pool.fork(source, cells)
    assert forked.method == "replay" and "open file" in forked.reason, forked
    for k in (source, new, other):
        await pool.release(k)


async def test_a_fork_of_a_kernel_that_ran_nothing_since_reuses_its_snapshot(pool: KernelPool) -> None:
    source = await pool.acquire()
    await run(source, "x = 1")
    first, _ = await pool.fork(source)
    kept = source.kept_snapshot
    assert kept is not None
    generation = source.generation
    second, forked = await pool.fork(source)
    # No cell ran in the source for the second fork: the same snapshot, the same state.
    assert source.generation == generation and forked.method == "snapshot"
    assert await run(second, "print(x)") == "1\n"
    # Any cell drops it: the next fork copies the state as it is now.
    await run(source, "x = 2")
    assert source.kept_snapshot is None
    third, _ = await pool.fork(source)
    assert await run(third, "print(x)") == "2\n"
    for k in (source, first, second, third):
        await pool.release(k)


async def test_a_snapshot_is_not_reused_while_a_cell_left_work_on_the_event_loop(pool: KernelPool) -> None:
    source = await pool.acquire()
    # Changes the state after its cell ended, with no cell running.
    await run(source, "import asyncio\nx = 1\nasyncio.get_running_loop().call_later(0.3, globals().update, {'x': 2})")
    first, _ = await pool.fork(source)
    assert source.kept_snapshot is None
    await asyncio.sleep(0.6)
    second, _ = await pool.fork(source)
    assert await run(second, "print(x)") == "2\n"
    for k in (source, first, second):
        await pool.release(k)


async def test_a_fork_from_a_drained_pool_waits_for_a_start_and_the_pool_refills(pool: KernelPool) -> None:
    source = await pool.acquire()
    await run(source, "x = 7")
    while pool.ready < pool.size:
        await asyncio.sleep(0.01)
    taken = await pool.acquire(refill=False)
    assert pool.ready == 0 and pool.starting == 0
    new, forked = await pool.fork(source)
    assert forked.method == "snapshot" and await run(new, "print(x)") == "7\n"
    # The pool is topped up again after the fork (and after the refill=False acquire).
    for _ in range(500):
        if pool.ready + pool.starting >= pool.size:
            break
        await asyncio.sleep(0.01)
    assert pool.ready + pool.starting >= pool.size
    for k in (source, taken, new):
        await pool.release(k)


async def test_a_cancelled_fork_leaves_no_kernel_behind(pool: KernelPool) -> None:
    source = await pool.acquire()
    await run(source, "x = 1")
    live = len(pool._live)
    task = asyncio.create_task(pool.fork(source))
    await asyncio.sleep(0.002)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert len(pool._live) == live
    # The source still runs cells.
    assert await run(source, "print(x)") == "1\n"
    await pool.release(source)


async def test_kernels_do_not_share_numpy_s_generator(pool: KernelPool) -> None:
    # numpy.random is imported by the zygote (a fork copies its state): each kernel reseeds it.
    kernels = [await pool.acquire() for _ in range(3)]
    draws = {await run(k, "import numpy as np\nprint(np.random.randint(10**9))") for k in kernels}
    assert len(draws) == 3, draws
    for k in kernels:
        await pool.release(k)


async def test_plain_cells_skip_ipython_transforms_for_themselves_only(pool: KernelPool) -> None:
    k = await pool.acquire()
    plain = await k.execute(PLAIN_CELL + "%time x = 1")
    # No input transformers: a magic is a syntax error, as in Python.
    assert plain.status == "error" and plain.error is not None and plain.error.ename == "SyntaxError"
    assert (await k.execute(PLAIN_CELL + "print(6 * 7)")).stdout == "42\n"
    # The next cell is transformed as usual.
    r = await k.execute("x = 3\n%time y = x")
    assert r.status == "ok" and "Wall time" in r.stdout, r
    assert await run(k, "print(y)") == "3\n"
    await pool.release(k)
