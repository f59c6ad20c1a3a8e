"""New namespaces for a kernel: cloning into them, its user's maps, its loopback: stdlib only."""

from __future__ import annotations

import ctypes
import os
import signal

from .libc import check, libc

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000


def namespace_flags(net: bool) -> int:
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    return flags | CLONE_NEWNET if net else flags


def map_ids(uid: int, gid: int, outer_uid: int, outer_gid: int) -> None:
    """Map our own user (``outer_*`` in the parent namespace) to ``uid``/``gid``; no supplementary groups."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {outer_uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {outer_gid} 1")


def map_child(pid: int, uid: int, gid: int, host_uid: int) -> None:
    """In the zygote: map a cloned kernel's user to its own host uid (the zygote's namespace maps the range)."""
    for name, inner in (("uid_map", uid), ("gid_map", gid)):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
        try:
            os.write(fd, f"{inner} {host_uid} 1".encode())
        finally:
            os.close(fd)


def enter_namespaces(uid: int, gid: int, outer_uid: int, outer_gid: int, net: bool) -> None:
    check(libc().unshare(namespace_flags(net)), "unshare")
    map_ids(uid, gid, outer_uid, outer_gid)


SYS_CLONE = 56  # x86_64


def clone_into_namespaces(net: bool) -> int:
    """fork() whose child starts in new namespaces, as pid 1 of a new pid namespace.

    One copy of the zygote's address space per kernel fewer than fork, unshare
    and fork again (~4 ms of CPU per kernel: page tables copied, then torn
    down). The interpreter is told about the fork exactly as ``os.fork`` does
    it. Raises OSError where the raw syscall is refused or unknown (the caller
    falls back to fork and unshare).
    """
    if os.uname().machine != "x86_64":
        raise OSError(38, "clone into namespaces: x86_64 only")
    api = ctypes.pythonapi
    lc = libc()
    lc.syscall.restype = ctypes.c_long
    api.PyOS_BeforeFork()
    pid = lc.syscall(
        ctypes.c_long(SYS_CLONE),
        ctypes.c_ulong(namespace_flags(net) | signal.SIGCHLD),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
        ctypes.c_ulong(0),
    )
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return int(pid)


SIOCSIFFLAGS, IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x8914, 0x1, 0x8, 0x40


def loopback_up() -> None:
    """Bring up ``lo`` of a fresh network namespace, as bwrap does for its own."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING))
