"""The kernel's last steps before it is built, and its report of them: stdlib only."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from .landlock import landlock
from .libc import drop_capabilities, effective_capabilities, no_new_privs
from .rlimits import apply_limits
from .seccomp import load_seccomp


def confine(config: dict[str, Any], seccomp: Any) -> None:
    """The kernel's last steps before it is built, in every mode; then its report.

    No capabilities, no_new_privs, rlimits, Landlock (its own tier), and the
    seccomp filter last: nothing after it needs what it denies.
    """
    drop_capabilities()
    no_new_privs()
    limits = apply_limits(config.get("limits", {}))
    os.chdir(config["workdir"])
    rules = config.get("landlock")
    abi = landlock(rules["ro"], rules["rw"]) if rules else 0
    filtered = False
    if seccomp is not None:
        try:
            load_seccomp(seccomp)
            filtered = True
        except OSError as exc:
            sys.stderr.write(f"seccomp filter not loaded: {exc}\n")
    report(config["report"], config.get("limits", {}), limits, filtered, abi)


def report(path: str, asked: dict[str, int], limits: dict[str, int], seccomp: bool, landlock_abi: int) -> None:
    """Write what this kernel put in force on itself, before any cell runs; the runtime records it.

    Sizes of the kernel's own mounts are measured, not copied from the policy.
    """
    storage = {}
    for mount in ("/tmp", "/sandbox/work", "/dev/shm"):
        try:
            st = os.statvfs(mount)
        except OSError:
            continue
        storage[mount] = {"bytes": st.f_blocks * st.f_frsize, "inodes": st.f_files}
    facts = {
        "rlimits": limits,
        "rlimits_failed": sorted(set(asked) - set(limits)),
        "storage": storage,
        "seccomp": seccomp,
        "capabilities": effective_capabilities(),
        "landlock_abi": landlock_abi,
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(facts).encode())
    finally:
        os.close(fd)
