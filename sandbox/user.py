"""The host user kernels run as.

A runtime running as root must never hand root to model code: bwrap run by
root maps the sandbox user to host root, whose uid still counts for sysctls,
root-only /proc files and root's keyring quota once a cell finds a way out of
its namespaces. So bwrap is started as an unprivileged host user instead, and
everything inside maps to that user.

The user is ``tora-sandbox`` where it exists (``setup.sh`` creates it), else
a fixed high uid/gid that belongs to nobody. ``SandboxPolicy.uid`` (or
``TORA_SANDBOX_UID``) overrides both. That user runs bwrap (and a pool's
zygote); each kernel then runs as a host uid of its own (``UidLease``), drawn
from a range that belongs to nobody and given back at teardown: Linux keeps
some counts per host user outside every namespace (pipe buffer pages, file
descriptors in flight over unix sockets, epoll watches), and one kernel
must not be able to use up its siblings' share.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import secrets

SANDBOX_USER = "tora-sandbox"
# Above systemd's container ranges (up to 0x6FFFFFFF) and below 2**31; in no /etc/passwd.
FALLBACK_UID = 2_100_000_000
# One host uid (and gid of the same number) per live kernel, from here; also in no /etc/passwd.
KERNEL_UID_BASE = 2_100_100_000
KERNEL_UID_COUNT = 65_536
# Which uids of the range are taken, across every runtime on the machine: a
# file per uid, locked (flock) while its kernel lives; a runtime that dies
# releases its locks with it.
LEASE_DIR = "/run/tora-sandbox-uids"


def sandbox_ids(uid: int | None = None) -> tuple[int, int] | None:
    """(uid, gid) that kernels run as on the host; None when the runtime is not root.

    A runtime that is not root cannot change users: its kernels run as its
    own uid (unprivileged already).
    """
    if os.geteuid() != 0:
        return None
    if uid is not None:
        try:
            return uid, pwd.getpwuid(uid).pw_gid
        except KeyError:
            return uid, uid
    try:
        entry = pwd.getpwnam(SANDBOX_USER)
    except KeyError:
        return FALLBACK_UID, FALLBACK_UID
    return entry.pw_uid, entry.pw_gid


def describe(ids: tuple[int, int] | None) -> str:
    if ids is None:
        return f"the runtime's own uid {os.geteuid()} (not root)"
    try:
        name = pwd.getpwuid(ids[0]).pw_name
    except KeyError:
        name = "no user of that uid"
    return f"uid {ids[0]} / gid {ids[1]} ({name})"


class UidLease:
    """One host uid of the kernel range, held until ``release`` (after every process of it is gone)."""

    def __init__(self, uid: int, fd: int) -> None:
        self.uid = uid
        self._fd: int | None = fd

    @property
    def ids(self) -> tuple[int, int]:
        return self.uid, self.uid

    @classmethod
    def take(cls, lease_dir: str = LEASE_DIR) -> UidLease:
        """A free uid of the range; OSError if none is (65536 live kernels on one machine)."""
        os.makedirs(lease_dir, mode=0o700, exist_ok=True)
        start = secrets.randbelow(KERNEL_UID_COUNT)
        for i in range(KERNEL_UID_COUNT):
            uid = KERNEL_UID_BASE + (start + i) % KERNEL_UID_COUNT
            fd = os.open(f"{lease_dir}/{uid}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return cls(uid, fd)
        raise OSError(f"no free uid in {KERNEL_UID_BASE}..{KERNEL_UID_BASE + KERNEL_UID_COUNT - 1}")

    def release(self) -> None:
        """Only once no process runs as this uid (a survivor of teardown keeps its uid taken)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
