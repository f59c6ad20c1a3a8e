"""Probe which isolation this machine offers, report it, and pick the launcher.

Tiers, strongest first:
- ``bwrap``: bubblewrap namespaces (user, pid, net, ipc, uts, mount) run as an
  unprivileged host user, read-only binds of only what the kernel needs,
  bounded tmpfs /tmp, work dir and /dev, cleared environment, seccomp, plus
  rlimits and pids and memory cgroups per kernel where the runtime may create
  them.
- ``landlock``: the kernel restricts its own file system access (read-only
  interpreter, writable work dir only) and its signals; no network or process
  isolation beyond rlimits.
- ``none``: rlimits, cleared environment and a private work dir only. Not isolated.

Every protection ``check`` lists is probed here, not assumed; what a kernel
actually got is in its own ``Kernel.info["protections"]``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import resource
from typing import Literal

from pydantic import BaseModel

from sandbox.bwrap import BwrapLauncher, bwrap_path, bwrap_runs_as, disable_userns_works, probe
from sandbox.cgroups import KernelCgroups
from sandbox.errors import IsolationUnavailableError
from sandbox.launch import Launcher, SubprocessLauncher
from sandbox.policy import SandboxPolicy
from sandbox.seccomp import kernel_filter
from sandbox.user import KERNEL_UID_BASE, KERNEL_UID_COUNT, describe

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
    memory_cgroup: bool
    seccomp: bool
    # The host uid kernels run as (None: the runtime's own, which is not root).
    host_uid: int | None
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
    """Whether bwrap can make our namespaces at all (as the runtime's own user); (ok, path or why)."""
    exe = bwrap_path()
    if exe is None:
        return False, "bubblewrap is not installed (apt-get install bubblewrap)"
    ok, why = probe(None, disable_userns=False)
    if not ok:
        return False, f"bubblewrap cannot create namespaces here ({why}); user namespaces may be disabled"
    return True, exe


@functools.cache
def _cgroups() -> tuple[bool, bool]:
    groups = KernelCgroups.create()
    return groups is not None, groups is not None and groups.memory


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


def _off(why: str) -> str:
    return f"none: {why}"


def _rlimit(name: str, which: int, value: int, unit: int, detail: str) -> Protection:
    """An rlimit the kernel sets on itself, after dropping its capabilities: never above the hard limit it inherits."""
    hard = resource.getrlimit(which)[1]
    if hard != resource.RLIM_INFINITY and value * unit > hard:
        return Protection(name=name, active=False, detail=_off(f"{detail} is above the hard limit {hard // unit}"))
    return Protection(name=name, active=True, detail=detail)


def check(policy: SandboxPolicy | None = None) -> SandboxReport:
    """What protections a kernel started under ``policy`` gets on this machine, and why not others."""
    policy = policy or SandboxPolicy()
    ok, bwrap_why = bwrap_works()
    abi = landlock_abi()
    filt = kernel_filter()
    try:
        tier: Tier = choose_tier(policy)
    except IsolationUnavailableError:
        tier = "none"
    is_bwrap = tier == "bwrap"
    not_bwrap = "needs the bwrap tier: " + (bwrap_why if not ok else f"isolation is {policy.isolation!r}")
    root = os.geteuid() == 0
    # Kernels get cgroups in the bwrap tier only (its launchers make them).
    pids_cg, memory_cg = _cgroups() if is_bwrap else (False, False)
    ids, ids_why = bwrap_runs_as(policy.uid) if is_bwrap else (None, "")
    unprivileged = not root or ids is not None
    userns_off = is_bwrap and disable_userns_works(ids)
    p = [
        Protection(
            name="host user",
            active=unprivileged,
            detail=(
                f"bwrap runs as {describe(ids)}, each kernel as a host uid of its own "
                f"({KERNEL_UID_BASE}-{KERNEL_UID_BASE + KERNEL_UID_COUNT - 1}); the runtime's files, root's "
                "privileges and other kernels' per-user counts are out of reach"
                if ids is not None and is_bwrap
                else f"kernels run as {describe(ids)}; the runtime's files and root's privileges are out of reach"
            )
            if unprivileged
            else _off(f"kernels run as host root: {ids_why}" if is_bwrap else "kernels run as host root: " + not_bwrap),
        ),
        Protection(
            name="filesystem",
            active=tier != "none",
            detail="read-only binds of /usr, the interpreter and the venv; no /root, /home, /etc/shadow"
            if is_bwrap
            else "Landlock: read-only interpreter, writable work dir and /tmp only"
            if tier == "landlock"
            else _off("the kernel can read and write whatever the runtime's user can"),
        ),
        Protection(
            name="storage",
            active=is_bwrap,
            detail=f"per kernel, in memory: /tmp {policy.tmp_mb} MB, work dir {policy.work_mb} MB, /dev/shm "
            f"{policy.shm_mb} MB, {policy.max_inodes} inodes each; nothing on the host disk"
            if is_bwrap
            else _off(f"the work dir is on the host disk, each file under RLIMIT_FSIZE only; {not_bwrap}"),
        ),
        Protection(
            name="/dev",
            active=is_bwrap,
            detail="per kernel, read-only: null, zero, full, random, urandom and its own /dev/shm"
            if is_bwrap
            else _off("the host's /dev; " + not_bwrap),
        ),
        Protection(
            name="network",
            active=is_bwrap or (tier == "landlock" and abi >= 4),
            detail="a network namespace per kernel, pooled or not (ipc transport for the kernel)"
            if is_bwrap
            else "Landlock blocks TCP bind/connect (UDP is not covered)"
            if tier == "landlock" and abi >= 4
            else _off(not_bwrap),
        ),
        Protection(
            name="processes",
            active=is_bwrap,
            detail="own pid namespace: host processes invisible and unkillable; killed with the kernel"
            if is_bwrap
            else _off(not_bwrap),
        ),
        Protection(
            name="system calls",
            active=filt.bpf is not None,
            detail=f"seccomp: {filt.detail}" if filt.bpf is not None else _off(filt.detail),
        ),
        Protection(
            name="nested namespaces",
            active=filt.bpf is not None or userns_off,
            detail=", ".join(
                (["seccomp denies unshare, setns, mount and clone with namespace flags"] if filt.bpf else [])
                + (["bwrap --disable-userns (one kernel per sandbox; not in pool kernels)"] if userns_off else [])
            )
            or _off("no seccomp filter and no --disable-userns (bubblewrap < 0.8)"),
        ),
        Protection(
            name="capabilities",
            active=True,
            detail="all dropped in the kernel: bounding and ambient sets emptied, no_new_privs",
        ),
        Protection(
            name="environment",
            active=True,
            detail=f"cleared; only {', '.join(policy.env_allow)} copied, plus HOME/PATH/TMPDIR set by the sandbox",
        ),
        _rlimit("memory", resource.RLIMIT_AS, policy.memory_mb, 1 << 20,
                f"RLIMIT_AS {policy.memory_mb} MB per process (MALLOC_ARENA_MAX=2)"),
        Protection(
            name="memory per kernel",
            active=memory_cg,
            detail=f"memory cgroup per kernel: {policy.memory_mb} MB for all its processes and its tmpfs files"
            if memory_cg
            else _off(
                ("no writable memory cgroup" if is_bwrap else not_bwrap)
                + ": a kernel's processes together are bounded only by their count"
            ),
        ),
        Protection(
            name="process count",
            active=pids_cg or unprivileged,
            detail=f"pids cgroup per kernel, max {policy.max_procs}"
            if pids_cg
            else f"RLIMIT_NPROC {policy.max_procs} (counted per user namespace: per kernel in the bwrap tier)"
            if unprivileged
            else _off("RLIMIT_NPROC does not apply to root and this kernel gets no pids cgroup"),
        ),
        Protection(
            name="teardown",
            active=pids_cg,
            detail="every process in the kernel's cgroups and the groups below them killed, frozen ones "
            "thawed, checked until none is left (10 s at most)"
            if pids_cg
            else _off("no cgroup: the pid namespace (bwrap) or the process group is killed"),
        ),
        _rlimit("file size", resource.RLIMIT_FSIZE, policy.max_file_mb, 1 << 20,
                f"RLIMIT_FSIZE {policy.max_file_mb} MB"),
        _rlimit("open files", resource.RLIMIT_NOFILE, policy.max_open_files, 1,
                f"RLIMIT_NOFILE {policy.max_open_files}"),
        _rlimit("cpu time", resource.RLIMIT_CPU, policy.cpu_time_s, 1, f"RLIMIT_CPU {policy.cpu_time_s} s per kernel"),
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
        pids_cgroup=pids_cg,
        memory_cgroup=memory_cg,
        seccomp=filt.bpf is not None,
        host_uid=ids[0] if ids else (None if not root else 0),
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
