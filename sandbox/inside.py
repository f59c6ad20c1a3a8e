"""Code that runs inside the sandbox, in the kernel's (or the zygote's) process.

Run as a script by path (``python .../sandbox/inside.py kernel CONFIG_JSON``), so
that it imports neither the ``sandbox`` package nor pydantic: only the standard
library and ipykernel. Keep it that way, the zygote forks from this module.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

_libc: Any = None


def libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def die_with_parent() -> None:
    libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def no_new_privs() -> None:
    libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def apply_limits(limits: dict[str, int]) -> None:
    """Set rlimits for this process and everything it starts."""
    mb = 1024 * 1024
    table = {
        "memory_mb": (resource.RLIMIT_AS, mb),
        "max_file_mb": (resource.RLIMIT_FSIZE, mb),
        "cpu_time_s": (resource.RLIMIT_CPU, 1),
        "max_open_files": (resource.RLIMIT_NOFILE, 1),
        "max_procs": (resource.RLIMIT_NPROC, 1),
    }
    for key, (which, unit) in table.items():
        if key in limits:
            value = int(limits[key]) * unit
            try:
                resource.setrlimit(which, (value, value))
            except (ValueError, OSError):
                pass
    # A core dump of a 2 GB kernel would fill the work dir.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


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


def kernel_argv(connection_file: str) -> list[str]:
    return [
        "-f",
        connection_file,
        "--HistoryManager.enabled=False",
        "--InteractiveShell.colors=nocolor",
        "--IPKernelApp.log_level=CRITICAL",
        "--Application.log_level=CRITICAL",
    ]


def run_kernel(connection_file: str) -> None:
    """Build the IPython kernel from a connection file and serve until killed."""
    from ipykernel.kernelapp import IPKernelApp

    app: Any = IPKernelApp.instance()
    app.initialize(kernel_argv(connection_file))
    app.start()


def main(argv: list[str]) -> None:
    mode, config_json = argv[1], argv[2]
    config = json.loads(config_json)
    if config.get("die_with_parent"):
        die_with_parent()
        expected = config.get("parent_pid") or 0
        if expected and os.getppid() != expected:
            os._exit(1)
    apply_limits(config.get("limits", {}))
    os.chdir(config["workdir"])
    rules = config.get("landlock")
    if rules:
        landlock(rules["ro"], rules["rw"])
    if mode == "kernel":
        run_kernel(config["connection_file"])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
