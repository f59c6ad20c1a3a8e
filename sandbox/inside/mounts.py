"""The kernel's own file system: bounded tmpfs mounts, a private /dev, its run dir: stdlib only."""

from __future__ import annotations

import ctypes
import os
from typing import Any

from .libc import check, libc

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if v is None else v.encode() for v in (src, target, fstype, data)]
    check(libc().mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _tmpfs(target: str, size: int, inodes: int, mode: str, flags: int = MS_NOSUID | MS_NODEV) -> None:
    mount("tmpfs", target, "tmpfs", flags, f"size={size},nr_inodes={inodes},mode={mode}")


# What /dev holds for a kernel: the harmless character devices, bound from
# the sandbox's own /dev; the rest of it is read-only.
_DEVICES = ("null", "zero", "full", "random", "urandom")
_DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
              ("stderr", "/proc/self/fd/2"))  # fmt: skip


def _private_dev(stage: str, shm_bytes: int, inodes: int) -> None:
    """A /dev of the kernel's own: device nodes, read-only, plus a small /dev/shm."""
    mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for name in _DEVICES:
        os.close(os.open(f"{stage}/{name}", os.O_WRONLY | os.O_CREAT, 0o666))
        mount(f"/dev/{name}", f"{stage}/{name}", None, MS_BIND)
    for name, target in _DEV_LINKS:
        os.symlink(target, f"{stage}/{name}")
    os.mkdir(f"{stage}/shm")
    _tmpfs(f"{stage}/shm", shm_bytes, inodes, "1777")
    mount(None, stage, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    mount(stage, "/dev", None, MS_MOVE)


def mount_kernel_view(view: dict[str, Any]) -> None:
    """The kernel's own file system, in a mount namespace of its own (CAP_SYS_ADMIN in it).

    Its /tmp, work dir and /dev/shm are tmpfs mounts bounded in size and
    inodes (their pages count against the kernel's memory cgroup too); its
    /dev holds nothing but a few device nodes. In a zygote's kernel
    (``view["kid"]``), the kernel's own run dir is bound at /sandbox/run and
    every other kernel's dirs are hidden, as is the zygote's /proc.
    """
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    kid = view.get("kid")
    if kid:
        mount(f"/sandbox/kernels/{kid}/run", "/sandbox/run", None, MS_BIND | MS_REC)
        mount("tmpfs", "/sandbox/kernels", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
    inodes = int(view["inodes"])
    _tmpfs("/tmp", view["tmp_bytes"], inodes, "1777")
    _tmpfs("/sandbox/work", view["work_bytes"], inodes, "0755")
    _private_dev("/sandbox/dev", view["shm_bytes"], inodes)
    if kid:
        # The kernel refuses a new proc when the old one has overmounts (bwrap
        # covers /proc/sys and others); hide it instead so the zygote's other
        # kernels are not listed.
        mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
