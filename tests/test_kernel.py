"""The basic kernel contract: state, errors, deadlines, death, output caps, cancellation, cleanup."""

from __future__ import annotations

import asyncio
import os
import time

import psutil
import pytest
from conftest import assert_within, kernel_start_s

from sandbox import CellResult, Kernel, SandboxPolicy, start_kernel

FAST = SandboxPolicy(timeout_s=5, interrupt_grace_s=0.5)


@pytest.fixture
async def kernel() -> Kernel:
    k = await start_kernel(FAST)
    yield k
    await k.shutdown()


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


async def test_state_survives_between_cells(kernel: Kernel) -> None:
    assert (await kernel.execute("x = 21")).status == "ok"
    r = await kernel.execute("print(x * 2)")
    assert r.status == "ok"
    assert r.stdout == "42\n"


async def test_display_and_streams_are_separated(kernel: Kernel) -> None:
    r = await kernel.execute("import sys\nprint('out')\nprint('err', file=sys.stderr)\n6 * 7")
    assert (r.stdout, r.stderr, r.display) == ("out\n", "err\n", ["42"])


async def test_error_is_structured_and_keeps_prior_output(kernel: Kernel) -> None:
    r = await kernel.execute("print('before')\n1/0")
    assert r.status == "error"
    assert r.stdout == "before\n"
    assert r.error is not None and r.error.ename == "ZeroDivisionError"
    assert not any("\x1b[" in line for line in r.error.traceback)
    assert (await kernel.execute("print('next')")).stdout == "next\n"


async def test_interruptible_timeout_keeps_state(kernel: Kernel) -> None:
    await kernel.execute("y = 3")
    r = await kernel.execute("import time\nprint('start', flush=True)\ntime.sleep(30)", timeout=0.5)
    assert r.status == "timeout"
    assert not r.restarted
    assert "start" in r.stdout
    assert r.error is not None and "time limit" in r.error.evalue
    assert r.duration_s < 2
    assert (await kernel.execute("print(y)")).stdout == "3\n"


async def test_uninterruptible_timeout_restarts(kernel: Kernel) -> None:
    await kernel.execute("z = 1")
    pid = kernel.info["pid"]
    r = await kernel.execute("sum(range(10**12))", timeout=0.5)
    assert r.status == "timeout" and r.restarted
    assert kernel.info["pid"] != pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    after = await kernel.execute("print('fresh', 'z' in globals())")
    assert after.stdout == "fresh False\n"


async def test_death_is_detected_fast_and_kernel_replaced(kernel: Kernel) -> None:
    cold = await kernel_start_s(FAST)
    t = time.monotonic()
    r = await kernel.execute("import os\nos._exit(3)")
    assert r.status == "died" and r.restarted
    # Detection is immediate; most of the time is starting the replacement.
    assert_within(time.monotonic() - t, cold, 3, what="death detected and the kernel replaced")
    assert (await kernel.execute("print('back')")).stdout == "back\n"


async def test_huge_output_is_capped_head_and_tail() -> None:
    async with await start_kernel(SandboxPolicy(max_output_bytes=10_000)) as k:
        r = await k.execute("for i in range(200000): print(i)")
        assert r.status == "ok" and r.truncated
        assert r.stdout.startswith("0\n1\n2\n")
        assert r.stdout.endswith("199999\n")
        assert len(r.stdout) < 10_000


async def test_first_cell_output_is_never_lost() -> None:
    for _ in range(3):
        async with await start_kernel(FAST) as k:
            r = await k.execute("print('first')")
            assert r.stdout == "first\n"


async def test_cancelled_execute_interrupts_and_kernel_stays_usable(kernel: Kernel) -> None:
    await kernel.execute("w = 7")
    task = asyncio.create_task(kernel.execute("import time\ntime.sleep(60)", timeout=60))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    r = await kernel.execute("print(w)")
    assert r.stdout == "7\n"


async def test_a_hung_kernel_does_not_block_another() -> None:
    a, b = await asyncio.gather(start_kernel(FAST), start_kernel(FAST))
    try:
        t = time.monotonic()
        for _ in range(20):
            assert (await b.execute("print(1)")).stdout == "1\n"
        control = time.monotonic() - t
        hung = asyncio.create_task(a.execute("while True: pass", timeout=6))
        await asyncio.sleep(0.2)
        t = time.monotonic()
        for _ in range(20):
            assert (await b.execute("print(1)")).stdout == "1\n"
        # b's cells ran while a's still spun (not after its timeout), at most a few times slower than alone.
        assert not hung.done()
        assert_within(time.monotonic() - t, control, 5, fixed=0.2, what="20 cells beside a hung kernel")
        assert (await hung).status == "timeout"
    finally:
        await asyncio.gather(a.shutdown(), b.shutdown())


async def test_many_concurrent_kernels_start_without_races() -> None:
    kernels = await asyncio.gather(*(start_kernel(FAST) for _ in range(6)))
    try:
        results: list[CellResult] = await asyncio.gather(
            *(k.execute(f"print({i})") for i, k in enumerate(kernels))
        )
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    finally:
        await asyncio.gather(*(k.shutdown() for k in kernels))


async def test_shutdown_is_idempotent_and_leaves_no_processes() -> None:
    before = descendants()
    k = await start_kernel(FAST)
    await k.execute("import subprocess\np = subprocess.Popen(['sleep', '300'])")
    assert len(descendants() - before) >= 2
    await k.shutdown()
    await k.shutdown()
    await asyncio.sleep(0.2)
    left = [p for p in descendants() - before if psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert left == []
    with pytest.raises(Exception, match="shut down"):
        await k.execute("1")


async def test_info_describes_the_kernel(kernel: Kernel) -> None:
    info = kernel.info
    assert info["pid"] > 0 and info["pid"] != os.getpid()
    assert {"tier", "python", "limits"} <= set(info)
    assert info["limits"]["timeout_s"] == FAST.timeout_s


async def test_shutdown_during_a_running_cell_starts_nothing_new() -> None:
    before = descendants()
    k = await start_kernel(FAST)
    task = asyncio.create_task(k.execute("import time\ntime.sleep(30)", timeout=30))
    await asyncio.sleep(0.3)
    await k.shutdown()
    with pytest.raises(Exception, match="shut down"):
        await task
    await asyncio.sleep(0.2)
    left = [p for p in descendants() - before if psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert left == []


async def test_shutdown_during_a_cell_raises_and_leaves_nothing() -> None:
    cold = await kernel_start_s(FAST)  # its start and shutdown: the control
    before = descendants()
    k = await start_kernel(FAST)
    task = asyncio.create_task(k.execute("import time\ntime.sleep(60)", timeout=60))
    await asyncio.sleep(0.3)
    t = time.monotonic()
    await k.shutdown()
    with pytest.raises(Exception, match="shut down"):
        await task
    # Not the cell's 60 s: an interrupt's grace, then a kill.
    assert_within(time.monotonic() - t, cold, 2, fixed=FAST.interrupt_grace_s, what="shutdown during a cell")
    await asyncio.sleep(0.2)
    left = [p for p in descendants() - before if psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert left == []
