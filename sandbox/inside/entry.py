"""What ``python .../sandbox/inside/__main__.py MODE CONFIG_JSON`` runs: a kernel, or a zygote."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from .confine import confine
from .hardening import block_debugger, harden
from .libc import check, die_with_parent, libc
from .mounts import mount_kernel_view
from .namespaces import CLONE_NEWNS
from .seccomp import seccomp_program


def kernel_argv(connection_file: str) -> list[str]:
    return [
        "-f",
        connection_file,
        "--HistoryManager.enabled=False",
        "--InteractiveShell.colors=nocolor",
        # Context mode formats a 3000-frame RecursionError for seconds; Plain
        # is the standard Python traceback, in milliseconds.
        "--InteractiveShell.xmode=Plain",
        "--IPKernelApp.log_level=CRITICAL",
        "--Application.log_level=CRITICAL",
    ]


def run_kernel(connection_file: str) -> None:
    """Build the IPython kernel from a connection file and serve until killed."""
    block_debugger()
    from ipykernel.kernelapp import IPKernelApp

    app: Any = IPKernelApp.instance()
    app.initialize(kernel_argv(connection_file))
    harden(app)
    app.start()


def main(argv: list[str]) -> None:
    mode, config_json = argv[1], argv[2]
    config = json.loads(config_json)
    if mode == "zygote":
        from .zygote import zygote

        zygote(config)
        return
    if config.get("die_with_parent"):
        die_with_parent()
        expected = config.get("parent_pid") or 0
        if expected and os.getppid() != expected:
            os._exit(1)
    view = config.get("view")
    if view:
        # One kernel in its own bwrap: CAP_SYS_ADMIN in the sandbox's user
        # namespace, for a mount namespace of its own; confine() drops it.
        check(libc().unshare(CLONE_NEWNS), "unshare")
        mount_kernel_view(view)
    seccomp = seccomp_program(config["seccomp"]) if config.get("seccomp") else None
    confine(config, seccomp)
    if mode == "kernel":
        run_kernel(config["connection_file"])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
