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
from typing import Any, Protocol

from sandbox import cgroups
from sandbox.client import KernelClient, new_key, write_connection_file
from sandbox.dirs import KernelDirs
from sandbox.errors import KernelStartError
from sandbox.policy import SandboxPolicy
from sandbox.process import ProcessHandle, wait_first
from sandbox.seccomp import kernel_filter
from sandbox.user import UidLease

# The package that runs inside the sandbox (stdlib only), run by path.
INSIDE_SCRIPT = Path(__file__).with_name("inside") / "__main__.py"
# What a kernel writes into its run dir about itself before any cell runs.
REPORT_FILE = "protections.json"


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
    # What is in force for this kernel (see ``protections``); recorded with every trajectory.
    protections: dict[str, Any] = field(default_factory=dict)
    # The kernel's own host uid (root runtimes), given back once its processes are gone.
    lease: UidLease | None = None

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
        # Not reached when a process survived teardown: its uid stays taken.
        if self.lease is not None:
            self.lease.release()


class Launcher(Protocol):
    tier: str
    policy: SandboxPolicy

    async def spawn(self) -> Spawned: ...

    async def close(self) -> None: ...


async def connect_and_handshake(
    handle: ProcessHandle,
    dirs: KernelDirs,
    ip_prefix_host: str,
    key: str,
    tier: str,
    policy: SandboxPolicy,
    facts: dict[str, Any],
    lease: UidLease | None = None,
) -> Spawned:
    """Connect a client and wait for a real handshake, or fail with the kernel's log.

    ``facts``: what the launcher put in force from outside (cgroups,
    namespaces); the kernel's own report is added once it answers.
    """
    client = KernelClient(ip_prefix_host, key)
    spawned = Spawned(handle=handle, client=client, dirs=dirs, tier=tier, lease=lease)
    hs = asyncio.ensure_future(client.handshake())
    died = handle.exited_future()
    try:
        done = await wait_first(hs, died, timeout=policy.start_timeout_s)
    except BaseException:
        hs.cancel()
        await spawned.destroy()
        raise
    if hs in done and hs.exception() is None:
        # Written before the kernel opened its sockets, so before any cell ran.
        spawned.protections = protections(tier, facts, handle.pid, dirs.run / REPORT_FILE)
        if tier == "bwrap":
            try:
                sealed = dirs.seal()
            except OSError:
                sealed = False
            spawned.protections["run_dir_read_only"] = sealed
            if not sealed:
                spawned.protections["off"].append("run dir read-only to the kernel")
        return spawned
    hs.cancel()
    await asyncio.wait({hs})
    log = _log_tail(dirs.run / "kernel.log")
    await spawned.destroy()
    if hs in done:
        why = f"broke the wire protocol ({hs.exception()})"
    elif died in done:
        why = "exited"
    else:
        why = f"did not answer within {policy.start_timeout_s:g} s"
    raise KernelStartError(f"kernel ({tier}) {why} while starting. {log}".strip())


def outside_facts(cgroup: Path | None, own_network: bool) -> dict[str, Any]:
    """A kernel's cgroups (its pids group names them) and whether it has a network namespace of its own."""
    return {
        "cgroup": str(cgroup) if cgroup is not None else None,
        "pids_cgroup": cgroup is not None,
        "memory_cgroup": cgroups.memory_group(cgroup),
        "own_network": own_network,
    }


def host_uid(pid: int) -> int | None:
    """The real uid of a process as the host sees it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def protections(tier: str, facts: dict[str, Any], pid: int, report: Path) -> dict[str, Any]:
    """What is in force for one kernel: the launcher's facts, the kernel's own report, and what is off.

    ``off`` names every protection this tier should have and this kernel
    does not, so nothing is claimed that was not applied.
    """
    try:
        inside: dict[str, Any] = json.loads(report.read_text())
    except (OSError, ValueError):
        inside = {}
    out: dict[str, Any] = {**facts, **inside, "host_uid": host_uid(pid)}
    off: list[str] = []
    if out["host_uid"] in (0, None):
        off.append("unprivileged host uid")
    if not inside:
        off.append("kernel's own report")
    if not inside.get("seccomp"):
        off.append("seccomp")
    if inside.get("capabilities"):
        off.append("no capabilities")
    off += [f"rlimit {name}" for name in inside.get("rlimits_failed", [])]
    if not facts.get("pids_cgroup"):
        off.append("pids cgroup")
    if not facts.get("memory_cgroup"):
        off.append("memory cgroup")
    if tier == "bwrap" and not facts.get("own_network"):
        off.append("network namespace of its own")
    out["off"] = off
    return out


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
        """Run dir, work dir and sandbox/inside's entry point as the kernel sees them."""
        return str(dirs.run), str(dirs.work or dirs.run), str(INSIDE_SCRIPT)

    def command(
        self, dirs: KernelDirs, env: dict[str, str], cgroup: Path | None, lease: UidLease | None = None
    ) -> tuple[list[str], dict[str, str]]:
        """The argv prefix before ``python`` and the environment to start it with."""
        return [], env

    def take_uid(self) -> UidLease | None:
        """A host uid of the kernel's own (where the runtime can change users), else None."""
        return None

    def new_cgroup(self) -> Path | None:
        return None

    async def spawn(self) -> Spawned:
        lease = await asyncio.to_thread(self.take_uid)
        try:
            owner = lease.ids if lease is not None else self.dir_owner()
            dirs = await asyncio.to_thread(KernelDirs.create, owner, self.host_work_dir())
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        key = new_key()
        run_in, work_in, script = self.views(dirs)
        write_connection_file(dirs.run / "conn.json", f"{run_in}/k", key)
        filt = kernel_filter()
        config = {
            "connection_file": f"{run_in}/conn.json",
            "workdir": work_in,
            "limits": kernel_limits(self.policy),
            "die_with_parent": True,
            "parent_pid": 0 if self.tier != "none" else os.getpid(),
            "landlock": self.landlock_paths(dirs),
            "seccomp": filt.bpf.hex() if filt.bpf else None,
            "report": f"{run_in}/{REPORT_FILE}",
            **self.inside_config(),
        }
        python = self.exec_python()
        env = kernel_env(self.policy, work_in, str(Path(python).parent))
        cgroup = self.new_cgroup()
        prefix, env = self.command(dirs, env, cgroup, lease)
        argv = [*prefix, python, "-s", script, "kernel", json.dumps(config)]
        log = open(dirs.run / "kernel.log", "wb")  # noqa: SIM115
        try:
            popen = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(dirs.work or dirs.run),
                start_new_session=True,
                pass_fds=self.pass_fds(),
            )
        except OSError as exc:
            await asyncio.to_thread(dirs.remove)
            if lease is not None:
                lease.release()
            raise KernelStartError(f"cannot start {argv[0]}: {exc}") from exc
        finally:
            log.close()
        handle = ProcessHandle(popen.pid, popen, group=True, cgroup=cgroup)
        return await connect_and_handshake(
            handle, dirs, str(dirs.run / "k"), key, self.tier, self.policy, self.facts(cgroup), lease
        )

    def facts(self, cgroup: Path | None) -> dict[str, Any]:
        """What this launcher put in force for a kernel from outside."""
        return outside_facts(cgroup, own_network=self.tier == "bwrap")

    def dir_owner(self) -> tuple[int, int] | None:
        """Who owns the kernel's run dir on the host (None: the runtime)."""
        return None

    def host_work_dir(self) -> bool:
        """Whether the kernel works in a dir of the host's (tiers without a mount namespace)."""
        return True

    def inside_config(self) -> dict[str, Any]:
        """Tier-specific entries of the configuration sandbox/inside reads."""
        return {}

    def landlock_paths(self, dirs: KernelDirs) -> dict[str, list[str]] | None:
        return None

    def pass_fds(self) -> Sequence[int]:
        return ()

    async def close(self) -> None:
        return None
