"""The kernel's Landlock rules (the landlock tier): stdlib only."""

from __future__ import annotations

import ctypes
import os

from .libc import libc, no_new_privs

_ACCESS_FS_V1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_READ = 1 | 4 | 8  # EXECUTE, READ_FILE, READ_DIR


def landlock(ro: list[str], rw: list[str]) -> int:
    """Restrict this process and its children: read ``ro``, read/write ``rw``, nothing else.

    Also, where the Linux kernel supports it, no TCP bind/connect and no signals
    to processes outside. Returns the ABI used (0: Landlock unavailable).
    """
    lc = libc()
    lc.syscall.restype = ctypes.c_long
    abi = lc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    fs = _ACCESS_FS_V1
    if abi >= 2:
        fs |= 1 << 13  # REFER
    if abi >= 3:
        fs |= 1 << 14  # TRUNCATE
    net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP
    scoped = 3 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = lc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))

    for paths, access in ((ro, _FS_READ), (rw, fs)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            is_dir = os.path.isdir(path)
            rule = PathBeneath(access if is_dir else access & (1 | 2 | 4 | (1 << 14)), fd)
            lc.syscall(445, ruleset, 1, ctypes.byref(rule), ctypes.c_uint32(0))
            os.close(fd)
    no_new_privs()
    if lc.syscall(446, ruleset, ctypes.c_uint32(0)) != 0:
        os.close(ruleset)
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)
    return int(abi)
