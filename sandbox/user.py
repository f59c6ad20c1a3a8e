"""The host user kernels run as.

A runtime running as root must never hand root to model code: bwrap run by
root maps the sandbox user to host root, whose uid still counts for sysctls,
root-only /proc files and root's keyring quota once a cell finds a way out of
its namespaces. So bwrap is started as an unprivileged host user instead, and
everything inside maps to that user.

The user is ``tora-sandbox`` where it exists (``setup.sh`` creates it), else
a fixed high uid/gid that belongs to nobody. ``SandboxPolicy.uid`` (or
``TORA_SANDBOX_UID``) overrides both. One user for every kernel: kernels
cannot reach each other's processes, files or sockets anyway (each has its
own pid, mount, ipc and network namespaces), so the uid only ever meets the
read-only binds of the host.
"""

from __future__ import annotations

import os
import pwd

SANDBOX_USER = "tora-sandbox"
# Above systemd's container ranges (up to 0x6FFFFFFF) and below 2**31; in no /etc/passwd.
FALLBACK_UID = 2_100_000_000


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
