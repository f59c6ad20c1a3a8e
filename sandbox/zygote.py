"""Fast fresh kernels: fork them from a pre-imported zygote inside one bwrap sandbox.

A cold kernel spends ~0.6 s of CPU importing numpy, sympy, IPython and
ipykernel, and building the IPython shell. The zygote does that once; each
kernel is then a clone into new namespaces, a fork, and opening the kernel's
sockets and threads in the child.

Isolation tradeoff, compared with one bwrap per kernel (``BwrapLauncher``):
all kernels of one zygote share the zygote's bwrap sandbox (its read-only
binds, cleared environment, host user) and may not have user namespaces
disabled by bwrap (the zygote needs them; the seccomp filter denies them to
the kernel instead). Each kernel gets, from the forked child itself, its own
user, mount, pid, ipc, uts and (``net_per_kernel``, the default) network
namespaces: its own run dir (the other kernels' dirs are hidden under a
tmpfs), its own bounded /tmp, work dir and /dev, no capabilities,
no_new_privs, rlimits, the seccomp filter, and its own pids and memory
cgroups (the runtime places the kernel's init there before the kernel
exists). Kernels of one zygote share the zygote's pre-import state as it was
at fork time, never each other's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
from pathlib import Path

from sandbox import cgroups
from sandbox.bwrap import (
    INSIDE_VIEW,
    SANDBOX_UID,
    bwrap_argv,
    bwrap_runs_as,
    host_prelude,
    read_only_binds,
    sandbox_python,
    staged,
    view_config,
)
from sandbox.cgroups import KernelCgroups
from sandbox.client import new_key, write_connection_file
from sandbox.dirs import KernelDirs, base_dir
from sandbox.errors import KernelStartError
from sandbox.fork import fork_preimports
from sandbox.launch import (
    REPORT_FILE,
    Spawned,
    connect_and_handshake,
    kernel_env,
    kernel_limits,
    outside_facts,
)
from sandbox.policy import SandboxPolicy
from sandbox.process import ProcessHandle, wait_first
from sandbox.seccomp import kernel_filter
from sandbox.user import KERNEL_UID_BASE, KERNEL_UID_COUNT, UidLease

_zygote_ids = itertools.count()


class ZygoteLauncher:
    tier = "bwrap"

    def __init__(self, policy: SandboxPolicy, python: str | None = None, net_per_kernel: bool = True) -> None:
        self.policy = policy
        self.python = python or sys.executable
        self.net_per_kernel = net_per_kernel
        self._ids = itertools.count()
        self._proc: asyncio.subprocess.Process | None = None
        self._server: asyncio.Server | None = None
        self._hellos: dict[str, asyncio.Future[tuple[int, asyncio.StreamWriter]]] = {}
        self._start_lock = asyncio.Lock()
        self._cgroups = KernelCgroups.create()
        self.ids = bwrap_runs_as(policy.uid)[0]
        self._root: Path | None = None
        self._closed = False
        self._exited: asyncio.Future[int] | None = None

    async def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            return
        async with self._start_lock:
            if self._proc is not None and self._proc.returncode is None:
                return
            await self._start()

    async def _start(self) -> None:
        root = base_dir() / f"z{next(_zygote_ids)}"
        kernels, ctl = root / "kernels", root / "ctl"
        for d in (root, kernels, ctl):
            d.mkdir(mode=0o755, exist_ok=True)
        self._root = root
        if self._server is not None:
            self._server.close()
        self._server = await asyncio.start_unix_server(self._on_hello, path=str(ctl / "sock"))
        (ctl / "sock").chmod(0o777)
        filt = kernel_filter()
        config = {
            "uid": SANDBOX_UID,
            "gid": SANDBOX_UID,
            "view": view_config(self.policy),
            "workdir": "/sandbox/work",
            "report": f"/sandbox/run/{REPORT_FILE}",
            "limits": kernel_limits(self.policy),
            "preimport": [*self.policy.preimport, *fork_preimports(self.policy.preimport)],
            "net_per_kernel": self.net_per_kernel,
            "seccomp": filt.bpf.hex() if filt.bpf else None,
            # A root runtime gives each kernel a host uid of its own (see spawn),
            # which the zygote maps (it may: CAP_SETUID in its own namespace).
            "map_ids": "zygote" if self.ids is not None else "self",
        }
        python = sandbox_python(self.python)
        env = kernel_env(self.policy, "/sandbox/work", str(Path(python).parent))
        # IPython's profile (six dirs and a file) is made once, by the zygote,
        # in its own /tmp; a kernel that needs it later makes it in its private
        # tmpfs /tmp: no disk inodes per kernel, nothing to remove.
        env["IPYTHONDIR"] = "/tmp/.ipython"
        ro, stage = staged(read_only_binds(self.python), self.ids)
        rw = [(str(kernels), "/sandbox/kernels"), (str(ctl), "/sandbox/ctl")]
        wrap = bwrap_argv(self.policy, ro, rw, env, single=False, disable_userns=False)
        pass_fds: tuple[int, ...] = ()
        if self.ids is not None:
            # The zygote's user namespace maps the sandbox user (the zygote
            # itself) and the kernels' uid range, written by us (root) while
            # bwrap waits, so each kernel's namespace can map a uid of its own.
            info_r, info_w = os.pipe()
            block_r, block_w = os.pipe()
            wrap[1:1] = ["--info-fd", str(info_w), "--userns-block-fd", str(block_r)]
            wrap += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
            pass_fds = (info_w, block_r)
        argv = [
            *host_prelude(self.ids, (), stage),
            *wrap,
            "--",
            python,
            "-s",
            INSIDE_VIEW,
            "zygote",
            json.dumps(config),
        ]
        self._proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(root / "zygote.log", "wb"),  # noqa: SIM115
            env={"PATH": "/usr/bin:/bin"},
            start_new_session=True,
            pass_fds=pass_fds,
        )
        if self.ids is not None:
            os.close(info_w)
            os.close(block_r)
            try:
                await asyncio.wait_for(
                    asyncio.to_thread(_map_zygote, info_r, block_w, self.ids), self.policy.start_timeout_s
                )
            except (OSError, ValueError, TimeoutError) as exc:
                self._proc.kill()
                await self._proc.wait()
                raise KernelStartError(f"could not map the zygote's user namespace: {exc!r}") from exc
            finally:
                os.close(info_r)
                os.close(block_w)
        assert self._proc.stdout is not None
        self._exited = asyncio.ensure_future(self._proc.wait())
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), self.policy.start_timeout_s)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            self._proc.kill()
            await self._proc.wait()
            log = (root / "zygote.log").read_text(errors="replace")[-2000:]
            raise KernelStartError(f"the kernel zygote did not start. Its output:\n{log}")

    @property
    def log(self) -> Path | None:
        """The zygote's stderr (what it says when it cannot build the kernel before the fork)."""
        return self._root / "zygote.log" if self._root is not None else None

    @property
    def zygote_pid(self) -> int | None:
        """The host pid of the zygote's bwrap process (for measurements)."""
        return self._proc.pid if self._proc is not None else None

    async def _on_hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _, _ = struct.unpack("3i", creds)
        try:
            kid = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
        except (TimeoutError, OSError):
            writer.close()
            return
        fut = self._hellos.get(kid)
        if fut is None or fut.done():
            writer.close()
            return
        fut.set_result((pid, writer))

    async def spawn(self) -> Spawned:
        await self._ensure_started()
        assert self._proc is not None and self._proc.stdin is not None and self._root is not None
        kid = f"k{next(self._ids)}-{secrets.token_hex(6)}"
        kroot = self._root / "kernels" / kid
        dirs = KernelDirs(root=kroot, run=kroot / "run", work=None)
        key = new_key()
        lease = await asyncio.to_thread(UidLease.take) if self.ids is not None else None
        hello: asyncio.Future[tuple[int, asyncio.StreamWriter]] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.to_thread(_make_dirs, dirs, key, lease.ids if lease is not None else self.ids)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        self._hellos[kid] = hello
        try:
            self._proc.stdin.write(f"{kid} {lease.uid if lease is not None else ''}\n".encode())
            await self._proc.stdin.drain()
            assert self._exited is not None
            done = await wait_first(hello, self._exited, timeout=self.policy.start_timeout_s)
            if hello not in done:
                why = "the zygote exited" if self._exited in done else "no answer in time"
                raise KernelStartError(why)
            pid, writer = hello.result()
        except (KernelStartError, OSError, ConnectionError) as exc:
            await asyncio.to_thread(dirs.remove)
            if lease is not None:
                # The kernel never said hello: its uid was never mapped.
                lease.release()
            log = _read(dirs.run / "kernel.log") or _read(self._root / "zygote.log")
            raise KernelStartError(f"the zygote did not start a kernel ({exc!r}). {log}") from exc
        finally:
            self._hellos.pop(kid, None)
        handle = ProcessHandle(pid, None)
        if self._cgroups is not None:
            # cgroup writes take milliseconds (attach waits for RCU): off the loop.
            handle.cgroup = await asyncio.to_thread(_cage, self._cgroups, self.policy, pid)
            if handle.cgroup is None:
                handle.kill()
        writer.write(b"go\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()
        facts = outside_facts(handle.cgroup, own_network=self.net_per_kernel)
        return await connect_and_handshake(
            handle, dirs, str(dirs.run / "k"), key, self.tier, self.policy, facts, lease
        )

    async def close(self) -> None:
        self._closed = True
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        if self._server is not None:
            self._server.close()
        if self._root is not None:
            root = self._root
            await asyncio.to_thread(lambda: KernelDirs(root, root, root).remove())


def _cage(groups: KernelCgroups, policy: SandboxPolicy, pid: int) -> Path | None:
    group = groups.new(policy.max_procs, policy.memory_mb * 1024 * 1024)
    if group is None:
        return None
    try:
        cgroups.add(group, pid)
    except OSError:
        cgroups.kill_all(group)
        return None
    return group


def _map_zygote(info_fd: int, block_fd: int, ids: tuple[int, int]) -> None:
    """Write the zygote's uid and gid maps (bwrap blocks until then): its own user plus the kernels' range."""
    data = b""
    while b"}" not in data:
        chunk = os.read(info_fd, 4096)
        if not chunk:
            raise ValueError(f"bwrap said no child pid ({data!r})")
        data += chunk
    pid = int(json.loads(data[: data.index(b"}") + 1])["child-pid"])
    for name, own in (("uid_map", ids[0]), ("gid_map", ids[1])):
        _write_proc(pid, name, f"{SANDBOX_UID} {own} 1\n{KERNEL_UID_BASE} {KERNEL_UID_BASE} {KERNEL_UID_COUNT}\n")
    os.write(block_fd, b"1")


def _write_proc(pid: int, name: str, text: str) -> None:
    fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _make_dirs(dirs: KernelDirs, key: str, owner: tuple[int, int] | None) -> None:
    dirs.root.mkdir(mode=0o755)
    dirs.run.mkdir(mode=0o700)
    if owner is not None:
        os.chown(dirs.run, *owner)
    write_connection_file(dirs.run / "conn.json", "/sandbox/run/k", key)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""
