"""Probe which isolation this machine offers, report it, and pick the launcher.

Tiers, strongest first:
- ``bwrap``: bubblewrap namespaces (user, pid, net, ipc, uts, mount), read-only
  binds of only what the kernel needs, private /tmp, cleared environment, plus
  rlimits and a pids cgroup per kernel where the runtime may create one.
- ``landlock``: the kernel restricts its own file system access (read-only
  interpreter, writable work dir only) and its signals; no network or process
  isolation beyond rlimits.
- ``none``: rlimits, cleared environment and a private work dir only. Not isolated.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import subprocess
from typing import Literal

from pydantic import BaseModel

from sandbox.bwrap import NAMESPACE_FLAGS, BwrapLauncher, bwrap_path
from sandbox.cgroups import KernelCgroups
from sandbox.errors import IsolationUnavailableError
from sandbox.launch import Launcher, SubprocessLauncher
from sandbox.policy import SandboxPolicy

Tier = Literal["bwrap", "landlock", "none"]

_SYS_LANDLOCK_CREATE_RULESET = 444


class Protection(BaseModel):
    name: str
    active: bool
    detail: str


class SandboxReport(BaseModel):
    tier: Tier
    isolated: bool
    protections: list[Protection]
    bwrap: str | None
    landlock_abi: int
    pids_cgroup: bool
    python: str
    kernel_release: str

    def summary(self) -> str:
        head = f"tier: {self.tier}" + ("" if self.isolated else " (NOT ISOLATED)")
        lines = [head]
        for p in self.protections:
            lines.append(f"  [{'x' if p.active else ' '}] {p.name}: {p.detail}")
        return "\n".join(lines)


@functools.cache
def landlock_abi() -> int:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        abi = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except (OSError, AttributeError):
        return 0
    return max(int(abi), 0)


@functools.cache
def bwrap_works() -> tuple[bool, str]:
    exe = bwrap_path()
    if exe is None:
        return False, "bubblewrap is not installed (apt-get install bubblewrap)"
    cmd = [
        exe,
        *NAMESPACE_FLAGS,
        "--die-with-parent",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--",
        "/usr/bin/true",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"bubblewrap failed to run: {exc}"
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        why = err[-1] if err else f"exit {proc.returncode}"
        return False, f"bubblewrap cannot create namespaces here ({why}); user namespaces may be disabled"
    return True, exe


@functools.cache
def _pids_cgroup() -> bool:
    return KernelCgroups.create() is not None


def choose_tier(policy: SandboxPolicy) -> Tier:
    want = policy.isolation
    ok, why = bwrap_works()
    if want == "bwrap":
        if not ok:
            raise IsolationUnavailableError(f"isolation 'bwrap' was asked for but {why}")
        return "bwrap"
    if want == "landlock":
        if landlock_abi() < 1:
            raise IsolationUnavailableError(
                "isolation 'landlock' was asked for but this Linux kernel has no Landlock (needs 5.13+)"
            )
        return "landlock"
    if want == "none":
        return "none"
    if ok:
        return "bwrap"
    if landlock_abi() >= 1:
        return "landlock"
    return "none"


def check(policy: SandboxPolicy | None = None) -> SandboxReport:
    """What protections a kernel started under ``policy`` gets on this machine, and why not others."""
    policy = policy or SandboxPolicy()
    ok, bwrap_why = bwrap_works()
    abi = landlock_abi()
    cg = _pids_cgroup()
    try:
        tier: Tier = choose_tier(policy)
    except IsolationUnavailableError:
        tier = "none"
    is_bwrap = tier == "bwrap"
    not_bwrap = "needs the bwrap tier: " + (bwrap_why if not ok else f"isolation is {policy.isolation!r}")
    root = os.geteuid() == 0
    p = [
        Protection(
            name="filesystem",
            active=tier != "none",
            detail="read-only binds of /usr, the interpreter and the venv; no /root, /home, /etc/shadow"
            if is_bwrap
            else "Landlock: read-only interpreter, writable work dir and /tmp only"
            if tier == "landlock"
            else "none: the kernel can read and write whatever the runtime's user can",
        ),
        Protection(
            name="network",
            active=is_bwrap or (tier == "landlock" and abi >= 4),
            detail="own empty network namespace (ipc transport for the kernel)"
            if is_bwrap
            else "Landlock blocks TCP bind/connect (UDP is not covered)"
            if tier == "landlock" and abi >= 4
            else "none: " + not_bwrap,
        ),
        Protection(
            name="processes",
            active=is_bwrap,
            detail="own pid namespace: host processes invisible and unkillable; killed with the kernel"
            if is_bwrap
            else "none: " + not_bwrap,
        ),
        Protection(
            name="environment",
            active=True,
            detail=f"cleared; only {', '.join(policy.env_allow)} copied, plus HOME/PATH/TMPDIR set by the sandbox",
        ),
        Protection(
            name="private /tmp",
            active=is_bwrap,
            detail=f"tmpfs of {policy.tmp_mb} MB per kernel" if is_bwrap else "none: " + not_bwrap,
        ),
        Protection(
            name="memory",
            active=True,
            detail=f"RLIMIT_AS {policy.memory_mb} MB (MALLOC_ARENA_MAX=2)",
        ),
        Protection(
            name="process count",
            active=cg or not root,
            detail=f"pids cgroup per kernel, max {policy.max_procs}"
            if cg
            else f"RLIMIT_NPROC {policy.max_procs}"
            if not root
            else "none: RLIMIT_NPROC does not apply to root and no writable pids cgroup was found",
        ),
        Protection(
            name="file size",
            active=True,
            detail=f"RLIMIT_FSIZE {policy.max_file_mb} MB",
        ),
        Protection(name="cpu time", active=True, detail=f"RLIMIT_CPU {policy.cpu_time_s} s per kernel"),
        Protection(
            name="wall time",
            active=True,
            detail=f"{policy.timeout_s:g} s per cell: interrupt, then kill and restart after "
            f"{policy.interrupt_grace_s:g} s",
        ),
        Protection(
            name="output", active=True, detail=f"{policy.max_output_bytes} bytes per cell, head and tail kept"
        ),
    ]
    return SandboxReport(
        tier=tier,
        isolated=tier != "none",
        protections=p,
        bwrap=bwrap_path() if ok else None,
        landlock_abi=abi,
        pids_cgroup=cg,
        python=platform.python_version(),
        kernel_release=platform.release(),
    )


def launcher_for(policy: SandboxPolicy) -> Launcher:
    tier = choose_tier(policy)
    if tier == "bwrap":
        return BwrapLauncher(policy)
    if tier == "landlock":
        from sandbox.landlock import LandlockLauncher

        return LandlockLauncher(policy)
    return SubprocessLauncher(policy)
