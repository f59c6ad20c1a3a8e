"""Starting kernel processes: the launchers the ``Kernel`` and the pool draw from."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sandbox.client import KernelClient, new_key, write_connection_file
from sandbox.dirs import KernelDirs
from sandbox.errors import KernelStartError
from sandbox.policy import SandboxPolicy
from sandbox.process import ProcessHandle, wait_first

INSIDE_SCRIPT = Path(__file__).with_name("inside.py")


def kernel_env(policy: SandboxPolicy, home: str, python_bin: str) -> dict[str, str]:
    """The kernel's whole environment: an allow-list, never the runtime's secrets."""
    env = {k: os.environ[k] for k in policy.env_allow if k in os.environ}
    env.update(
        {
            "HOME": home,
            "IPYTHONDIR": f"{home}/.ipython",
            "TMPDIR": "/tmp",
            "PATH": f"{python_bin}:/usr/local/bin:/usr/bin:/bin",
            "MPLBACKEND": "Agg",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            # One BLAS/OpenMP thread: kernels share two cores with everything
            # else, and the zygote must stay thread-free before it forks.
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            # glibc makes one 64 MB arena per thread; under RLIMIT_AS that
            # exhausts the address space long before real memory is used.
            "MALLOC_ARENA_MAX": "2",
            "LANG": os.environ.get("LANG", "C.UTF-8"),
        }
    )
    env.update(policy.env)
    return env


def kernel_limits(policy: SandboxPolicy) -> dict[str, int]:
    return {
        "memory_mb": policy.memory_mb,
        "max_file_mb": policy.max_file_mb,
        "cpu_time_s": policy.cpu_time_s,
        "max_open_files": policy.max_open_files,
        "max_procs": policy.max_procs,
    }


@dataclass
class Spawned:
    """One running kernel process and the client connected to it."""

    handle: ProcessHandle
    client: KernelClient
    dirs: KernelDirs
    tier: str
    _teardown: asyncio.Future[None] | None = field(default=None, repr=False)

    async def destroy(self) -> None:
        """Kill now (before the first await); every caller waits for the same reaping and cleanup."""
        if self._teardown is None:
            self.client.close()
            self.handle.kill()
            self._teardown = asyncio.ensure_future(self._reap())
        await asyncio.shield(self._teardown)

    async def _reap(self) -> None:
        await self.handle.kill_and_wait()
        await asyncio.to_thread(self.dirs.remove)


class Launcher(Protocol):
    tier: str
    policy: SandboxPolicy

    async def spawn(self) -> Spawned: ...

    async def close(self) -> None: ...


async def connect_and_handshake(
    handle: ProcessHandle, dirs: KernelDirs, ip_prefix_host: str, key: str, tier: str, policy: SandboxPolicy
) -> Spawned:
    """Connect a client and wait for a real handshake, or fail with the kernel's log."""
    client = KernelClient(ip_prefix_host, key)
    spawned = Spawned(handle=handle, client=client, dirs=dirs, tier=tier)
    hs = asyncio.ensure_future(client.handshake())
    died = handle.exited_future()
    try:
        done = await wait_first(hs, died, timeout=policy.start_timeout_s)
    except BaseException:
        hs.cancel()
        await spawned.destroy()
        raise
    if hs in done:
        hs.result()
        return spawned
    hs.cancel()
    await asyncio.wait({hs})
    log = _log_tail(dirs.run / "kernel.log")
    await spawned.destroy()
    why = "exited" if died in done else f"did not answer within {policy.start_timeout_s:g} s"
    raise KernelStartError(f"kernel ({tier}) {why} while starting. {log}".strip())


def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")[-2000:].strip()
    except OSError:
        return ""
    return f"Its last output:\n{text}" if text else ""


class SubprocessLauncher:
    """Cold start: a new interpreter per kernel, optionally wrapped (bwrap)."""

    tier = "none"

    def __init__(self, policy: SandboxPolicy, python: str | None = None) -> None:
        self.policy = policy
        self.python = python or sys.executable

    def exec_python(self) -> str:
        """The interpreter's path as the kernel's own world sees it."""
        return self.python

    def views(self, dirs: KernelDirs) -> tuple[str, str, str]:
        """Run dir, work dir and inside.py as the kernel sees them."""
        return str(dirs.run), str(dirs.work), str(INSIDE_SCRIPT)

    def command(
        self, dirs: KernelDirs, env: dict[str, str], cgroup: Path | None
    ) -> tuple[list[str], dict[str, str]]:
        """The argv prefix before ``python`` and the environment to start it with."""
        return [], env

    def new_cgroup(self) -> Path | None:
        return None

    async def spawn(self) -> Spawned:
        dirs = await asyncio.to_thread(KernelDirs.create)
        key = new_key()
        run_in, work_in, script = self.views(dirs)
        write_connection_file(dirs.run / "conn.json", f"{run_in}/k", key)
        config = {
            "connection_file": f"{run_in}/conn.json",
            "workdir": work_in,
            "limits": kernel_limits(self.policy),
            "die_with_parent": True,
            "parent_pid": 0 if self.tier != "none" else os.getpid(),
            "landlock": self.landlock_paths(dirs),
        }
        python = self.exec_python()
        env = kernel_env(self.policy, work_in, str(Path(python).parent))
        cgroup = self.new_cgroup()
        prefix, env = self.command(dirs, env, cgroup)
        argv = [*prefix, python, "-s", script, "kernel", json.dumps(config)]
        log = open(dirs.run / "kernel.log", "wb")  # noqa: SIM115
        try:
            popen = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(dirs.work),
                start_new_session=True,
                pass_fds=self.pass_fds(),
            )
        except OSError as exc:
            await asyncio.to_thread(dirs.remove)
            raise KernelStartError(f"cannot start {argv[0]}: {exc}") from exc
        finally:
            log.close()
        handle = ProcessHandle(popen.pid, popen, group=True, cgroup=cgroup)
        return await connect_and_handshake(handle, dirs, str(dirs.run / "k"), key, self.tier, self.policy)

    def landlock_paths(self, dirs: KernelDirs) -> dict[str, list[str]] | None:
        return None

    def pass_fds(self) -> Sequence[int]:
        return ()

    async def close(self) -> None:
        return None
