"""Hostile code: each test asserts the damage is contained AND that the next cell still works.

Runs on pool kernels (zygote forks inside bwrap: the production path). Tests
that need a protection this machine lacks are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio
from conftest import needs_protection

from sandbox import CellResult, Kernel, KernelPool, SandboxPolicy
from sandbox.tiers import check
from sandbox.zygote import ZygoteLauncher

pytestmark = pytest.mark.asyncio(loop_scope="module")

REPORT = check()
needs_bwrap = needs_protection(REPORT.tier != "bwrap", f"bubblewrap tier unavailable: {REPORT.tier}")
needs_pids_cgroup = needs_protection(
    not REPORT.pids_cgroup and os.geteuid() == 0,
    "no writable pids cgroup and running as root (RLIMIT_NPROC does not apply to root)",
)

POLICY = SandboxPolicy(
    timeout_s=3,
    interrupt_grace_s=0.5,
    memory_mb=1024,
    max_procs=48,
    tmp_mb=32,
    max_file_mb=16,
    max_output_bytes=20_000,
)
FAKE_SECRET = "sk-tora-test-fake-secret-0123456789"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def pool() -> AsyncIterator[KernelPool]:
    os.environ["TORA_TEST_API_KEY"] = FAKE_SECRET
    async with KernelPool(POLICY, size=2) as p:
        yield p
    os.environ.pop("TORA_TEST_API_KEY", None)


@pytest_asyncio.fixture(loop_scope="module")
async def k(pool: KernelPool) -> AsyncIterator[Kernel]:
    kernel = await pool.acquire()
    yield kernel
    await pool.release(kernel)


async def still_works(k: Kernel) -> None:
    r = await k.execute("print(6 * 7)")
    assert r.status == "ok", r
    assert r.stdout == "42\n"


async def run(k: Kernel, code: str, timeout: float | None = None) -> CellResult:
    r = await k.execute(code, timeout=timeout)
    # Whatever happened must be representable for the record.
    CellResult.model_validate_json(r.model_dump_json())
    return r


# --- time ---------------------------------------------------------------------


async def test_busy_loop_is_interrupted(k: Kernel) -> None:
    await run(k, "keep = 1")
    r = await run(k, "while True: pass")
    assert r.status == "timeout" and not r.restarted
    assert (await run(k, "print(keep)")).stdout == "1\n"


async def test_loop_ignoring_sigint_is_killed(k: Kernel) -> None:
    r = await run(k, "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass")
    assert r.status == "timeout" and r.restarted
    await still_works(k)


async def test_loop_with_a_swallowing_sigint_handler_is_killed(k: Kernel) -> None:
    code = "import signal\nsignal.signal(signal.SIGINT, lambda *a: None)\nwhile True: pass"
    r = await run(k, code)
    assert r.status == "timeout" and r.restarted
    await still_works(k)


async def test_c_level_loop_is_killed(k: Kernel) -> None:
    r = await run(k, "sum(range(10**11))")
    assert r.status == "timeout" and r.restarted
    assert r.duration_s < POLICY.timeout_s + POLICY.interrupt_grace_s + 3
    await still_works(k)


async def test_catastrophic_regex_is_killed(k: Kernel) -> None:
    r = await run(k, "import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')")
    assert r.status == "timeout" and r.restarted
    await still_works(k)


async def test_sleep_past_deadline(k: Kernel) -> None:
    r = await run(k, "import time\ntime.sleep(100)", timeout=0.5)
    assert r.status == "timeout" and r.duration_s < 2
    await still_works(k)


# --- memory -------------------------------------------------------------------


async def test_memory_bomb_at_once(k: Kernel) -> None:
    r = await run(k, "x = bytearray(8 * 1024**3)")
    assert r.status == "error" and r.error is not None and r.error.ename == "MemoryError"
    await still_works(k)


async def test_memory_bomb_gradual(k: Kernel) -> None:
    before = psutil.virtual_memory().available
    # The memory limit ends it, not the clock: a loaded machine fills 1 GB slowly, so the cell may
    # take far longer than the policy's 3 s (it timed out there, under load, before the limit).
    r = await run(k, "hog = []\nwhile True:\n    hog.append(bytearray(16 * 1024**2))", timeout=60)
    assert r.status in ("error", "died"), r
    if r.status == "error":
        assert r.error is not None and r.error.ename == "MemoryError"
    # The kernel never came near the machine's memory.
    assert psutil.virtual_memory().available > before - 2 * POLICY.memory_mb * 1024**2
    await run(k, "hog = None")
    await still_works(k)


# --- processes ----------------------------------------------------------------


@needs_pids_cgroup
async def test_fork_loop_is_capped(k: Kernel) -> None:
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(500):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('stopped', n, type(e).__name__)\n"
    )
    r = await run(k, code)
    assert "stopped" in r.stdout, r
    assert int(r.stdout.split()[1]) < POLICY.max_procs
    await still_works(k)


@needs_pids_cgroup
async def test_fork_bomb_is_contained(pool: KernelPool, k: Kernel) -> None:
    other = await pool.acquire()
    try:
        code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
        bomb = asyncio.create_task(run(k, code, timeout=2))
        await asyncio.sleep(0.5)
        # Another kernel keeps working while the bomb goes off.
        assert (await other.execute("print('unaffected')", timeout=10)).stdout == "unaffected\n"
        r = await bomb
        assert r.status in ("timeout", "died", "error")
        await still_works(k)
    finally:
        await pool.release(other)


@needs_pids_cgroup
async def test_thread_bomb_is_capped(k: Kernel) -> None:
    code = (
        "import threading, time\n"
        "ev = threading.Event()\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(1000):\n"
        "        threading.Thread(target=ev.wait, daemon=True).start()\n"
        "        n += 1\n"
        "except RuntimeError as e:\n"
        "    print('capped', n)\n"
        "ev.set()\n"
    )
    r = await run(k, code)
    assert "capped" in r.stdout, r
    await still_works(k)


async def test_spinning_threads_do_not_block_the_deadline(k: Kernel) -> None:
    code = (
        "import threading, time\n"
        "stop = False\n"
        "def spin():\n"
        "    while not stop: pass\n"
        "for _ in range(4): threading.Thread(target=spin, daemon=True).start()\n"
        "time.sleep(100)\n"
    )
    r = await run(k, code, timeout=1)
    assert r.status == "timeout"
    await run(k, "stop = True")
    await still_works(k)


async def test_subprocess_runs_inside_the_sandbox(k: Kernel) -> None:
    r = await run(k, "import subprocess\nprint(subprocess.run(['ls', '/'], capture_output=True, text=True).stdout)")
    assert r.status == "ok", r
    seen = set(r.stdout.split())
    if REPORT.tier == "bwrap":
        assert not seen & {"home", "farm", "mnt", "srv", "var", "old_root"}, seen
    await still_works(k)


async def test_os_exit_is_reported_as_died(k: Kernel) -> None:
    r = await run(k, "import os\nos._exit(0)")
    assert r.status == "died" and r.restarted
    await still_works(k)


def outside_the_kernels(pool: KernelPool) -> dict[int, float]:
    """The runtime's processes a cell must not reach: the zygote's chain (bwrap, its init, the
    zygote itself), with start times so that a pid reused after a kill does not pass."""
    launcher = pool.launcher
    assert isinstance(launcher, ZygoteLauncher) and launcher.zygote_pid is not None
    chain = [psutil.Process(launcher.zygote_pid)]
    while not os.path.basename(chain[-1].cmdline()[0]).startswith("python"):
        kids = chain[-1].children()
        assert len(kids) == 1, kids
        chain.append(kids[0])
    assert chain[-1].cmdline()[-2] == "zygote" and len(chain) >= 2, [p.cmdline()[:3] for p in chain]
    return {p.pid: p.create_time() for p in chain}


def still_running(procs: dict[int, float]) -> bool:
    for pid, started in procs.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() != started or p.status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
    return True


@needs_bwrap
async def test_killing_the_parent_does_not_reach_the_runtime(pool: KernelPool, k: Kernel) -> None:
    outside = outside_the_kernels(pool)
    r = await run(k, "import os\nos.kill(os.getppid(), 9)\nos.kill(1, 9)\nprint('still here')")
    assert r.status in ("ok", "died", "error")
    await asyncio.sleep(0.2)
    assert still_running(outside)
    fresh = await pool.acquire()
    try:
        await still_works(fresh)
    finally:
        await pool.release(fresh)
    await still_works(k)


@needs_bwrap
async def test_signals_cannot_reach_other_processes(pool: KernelPool, k: Kernel) -> None:
    outside = outside_the_kernels(pool)
    other = await pool.acquire()
    try:
        await other.execute("alive = 'yes'")
        code = (
            "import os, signal\n"
            "hit = []\n"
            "for pid in range(1, 5000):\n"
            "    if pid == os.getpid():\n"
            "        continue\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n"
            "        hit.append(pid)\n"
            "    except OSError:\n"
            "        pass\n"
            "print(hit)\n"
        )
        await run(k, code)
        await asyncio.sleep(0.2)
        assert still_running(outside)
        r = await other.execute("print(alive)")
        assert r.stdout == "yes\n" and not r.restarted
        await still_works(k)
    finally:
        await pool.release(other)


# --- network ------------------------------------------------------------------


@needs_bwrap
async def test_tcp_to_the_host_is_unreachable(k: Kernel) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    accepted: list[object] = []
    server.settimeout(3)

    def accept() -> None:
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        r = await run(k, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert r.status == "error", r
        r = await run(k, "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)")
        assert r.status == "error", r
    finally:
        server.close()
        t.join()
    assert accepted == []
    await still_works(k)


@needs_bwrap
async def test_udp_and_dns_fail(k: Kernel) -> None:
    r = await run(k, "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('8.8.8.8', 53))")
    assert r.status == "error" and r.error is not None and r.error.ename == "OSError", r
    r = await run(k, "import socket\nsocket.getaddrinfo('pypi.org', 443)")
    assert r.status == "error" and r.error is not None and "gaierror" in r.error.ename, r
    await still_works(k)


# --- files --------------------------------------------------------------------


@needs_bwrap
async def test_writes_outside_the_work_dir_fail(k: Kernel) -> None:
    # A path the host can see and the runtime's user could write: this checkout.
    target = Path(__file__).resolve().parents[1] / ".tora_sandbox_escape"
    for path in ("/usr/evil", "/sandbox/lib/evil.py", str(target), "/etc/evil"):
        r = await run(k, f"open({path!r}, 'w').write('x')")
        assert r.status == "error", (path, r)
    assert not target.exists()
    r = await run(k, "open('here.txt', 'w').write('ok')\nprint(open('here.txt').read())")
    assert r.stdout == "ok\n"
    await still_works(k)


@needs_bwrap
async def test_filling_tmp_hits_its_size(k: Kernel) -> None:
    # Several files, each under the file size limit, together over the /tmp size.
    code = (
        "chunk = b'x' * 1024 * 1024\n"
        "for i in range(100):\n"
        "    with open(f'/tmp/fill{i}', 'wb') as f:\n"
        "        for _ in range(8):\n"
        "            f.write(chunk)\n"
    )
    r = await run(k, code)
    assert r.status == "error" and r.error is not None and "No space" in r.error.evalue, r
    await run(k, "import glob, os\nfor p in glob.glob('/tmp/fill*'): os.remove(p)")
    await still_works(k)


async def test_huge_file_hits_the_file_size_limit(k: Kernel) -> None:
    code = "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (64 * 1024 * 1024))"
    r = await run(k, code)
    assert r.status == "error" and r.error is not None and "File too large" in r.error.evalue, r
    await run(k, "import os\nos.remove('big.bin')")
    await still_works(k)


@needs_bwrap
async def test_root_and_shadow_are_not_readable(k: Kernel) -> None:
    r = await run(k, "import os\nprint(sorted(os.listdir('/root')) if os.path.exists('/root') else [])")
    assert r.status == "ok"
    assert set(eval(r.stdout)) <= {".pyenv"}
    for path in ("/etc/shadow", "/root/.bashrc", "/root/.ssh/id_rsa", "/etc/passwd"):
        r = await run(k, f"open({path!r}).read()")
        assert r.status == "error", (path, r)
    await still_works(k)


async def test_runtime_environment_secrets_are_not_visible(k: Kernel) -> None:
    r = await run(k, "import os\nprint([k for k, v in os.environ.items() if 'sk-tora' in v or 'API_KEY' in k])")
    assert r.stdout == "[]\n"
    r = await run(k, f"print(open('/proc/{os.getpid()}/environ', 'rb').read())")
    assert FAKE_SECRET not in r.stdout
    r = await run(k, "print(open('/proc/1/environ', 'rb').read())")
    assert FAKE_SECRET not in r.stdout
    await still_works(k)


# --- output -------------------------------------------------------------------


async def test_huge_stdout_is_capped(k: Kernel) -> None:
    rss = psutil.Process().memory_info().rss
    r = await run(k, "for _ in range(500):\n    print('y' * 100_000)", timeout=60)
    assert r.status == "ok" and r.truncated
    assert len(r.stdout) <= POLICY.max_output_bytes + 100
    assert psutil.Process().memory_info().rss < rss + 200 * 1024**2
    await still_works(k)


async def test_binary_garbage_output(k: Kernel) -> None:
    r = await run(k, "import os, sys\nos.write(1, os.urandom(50_000))\nsys.stdout.write(bytes(range(256)).decode('latin-1'))")
    assert r.status == "ok"
    await still_works(k)


async def test_closing_stdout_does_not_break_later_cells(k: Kernel) -> None:
    await run(k, "import sys, os\nsys.stdout.close()\nsys.stderr.close()")
    await still_works(k)
    await run(k, "import os\nos.close(1)\nos.close(2)")
    await still_works(k)


# --- interpreter ----------------------------------------------------------------


async def test_deep_recursion(k: Kernel) -> None:
    r = await run(k, "def f(n):\n    return f(n + 1)\nf(0)")
    assert r.status == "error" and r.error is not None and r.error.ename == "RecursionError"
    assert len(r.error.traceback) < 50
    await still_works(k)
    r = await run(k, "import sys\nsys.setrecursionlimit(10**7)\ndef g(n):\n    return g(n + 1)\ng(0)")
    # A huge limit lets the stack grow until memory, the C stack or the clock runs out.
    assert r.status in ("died", "error", "timeout")
    await still_works(k)


async def test_input_does_not_hang(k: Kernel) -> None:
    r = await run(k, "input('name? ')", timeout=5)
    assert r.status == "error" and r.duration_s < 3
    await still_works(k)


async def test_cwd_env_and_files_stay_in_their_kernel(pool: KernelPool, k: Kernel) -> None:
    setup = (
        "import os\n"
        "open('mine.txt', 'w').write('a')\n"
        "open('/tmp/mine.txt', 'w').write('a')\n"
        "os.environ['LEAK'] = '1'\n"
        "os.chdir('/tmp')\n"
        "import fractions\n"
        "fractions.Fraction = lambda *a, **k: 'patched'\n"
    )
    assert (await run(k, setup)).status == "ok"
    r = await run(k, "import os, fractions\nprint(os.getcwd(), os.environ.get('LEAK'), fractions.Fraction(1))")
    assert r.stdout == "/tmp 1 patched\n"
    fresh = await pool.acquire()
    try:
        probe = (
            "import os, fractions\n"
            "print(os.getcwd(), os.environ.get('LEAK'), fractions.Fraction(1),"
            " os.path.exists('mine.txt'), os.path.exists('/tmp/mine.txt'))"
        )
        r = await fresh.execute(probe)
        assert r.stdout.split()[1:] == ["None", "1", "False", "False"], r
    finally:
        await pool.release(fresh)
