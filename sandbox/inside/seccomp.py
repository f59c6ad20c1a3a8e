"""Loading the seccomp filter the runtime compiled (sandbox/seccomp.py) into the kernel: stdlib only."""

from __future__ import annotations

import ctypes
from typing import Any

from .libc import check, libc, no_new_privs

PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def seccomp_program(bpf_hex: str) -> Any:
    """The filter the runtime compiled (sandbox/seccomp.py), ready for ``load_seccomp``."""
    bpf = bytes.fromhex(bpf_hex)
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.addressof(buf))
    return prog, buf


def load_seccomp(program: Any) -> None:
    """Install the filter on this (single-threaded) process and everything it starts."""
    no_new_privs()
    prog, _buf = program
    check(libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")
