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
        if os.getppid() != config.get("parent_pid", os.getppid()):
            os._exit(1)
    apply_limits(config.get("limits", {}))
    os.chdir(config["workdir"])
    if mode == "kernel":
        run_kernel(config["connection_file"])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
