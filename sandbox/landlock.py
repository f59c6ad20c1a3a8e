"""The Landlock tier: for machines where bubblewrap cannot run.

The kernel process restricts itself before serving: read-only access to the
interpreter, the venv and system libraries; read/write only to its work dir and
run dir; where the Linux kernel allows, no TCP and no signals to outside
processes. There is no pid, network (UDP) or mount isolation.
"""

from __future__ import annotations

import sys

from sandbox.bwrap import python_roots
from sandbox.dirs import KernelDirs
from sandbox.launch import INSIDE_SCRIPT, SubprocessLauncher, kernel_env
from sandbox.policy import SandboxPolicy

_SYSTEM_RO = ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", "/etc/localtime", "/proc", "/dev"]


class LandlockLauncher(SubprocessLauncher):
    tier = "landlock"

    def __init__(self, policy: SandboxPolicy, python: str | None = None) -> None:
        super().__init__(policy, python)

    def landlock_paths(self, dirs: KernelDirs) -> dict[str, list[str]] | None:
        # Its own run and work dirs only: the runtime's dir above them holds
        # every other kernel's connection file and key. (Landlock does not
        # restrict walking through a directory, so nothing above is needed.)
        # The code that runs the kernel (sandbox/inside, importable from its
        # parent) is read from the runtime's checkout:
        ro = [*_SYSTEM_RO, *python_roots(self.python or sys.executable), str(INSIDE_SCRIPT.parent.parent)]
        return {"ro": ro, "rw": [str(dirs.run), str(dirs.work), "/dev/null"]}

    def command(
        self, dirs: KernelDirs, env: dict[str, str], cgroup: object, lease: object = None
    ) -> tuple[list[str], dict[str, str]]:
        env = dict(env)
        # The shared /tmp is not writable under Landlock; temp files go to the work dir.
        env["TMPDIR"] = str(dirs.work)
        return [], env


__all__ = ["LandlockLauncher", "kernel_env"]
