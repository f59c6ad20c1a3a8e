"""The bubblewrap command line for one sandbox.

Only what the kernel needs is visible: /usr (read-only), the interpreter's
install and the venv (read-only, at their own paths so shebangs and sys.prefix
hold), a private size-limited /tmp, the kernel's run dir (connection file and
ipc sockets) and work dir. No /root, no /home, no host /tmp, no /etc/shadow,
no network, no view of host processes.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from sandbox.cgroups import PidsCgroups
from sandbox.dirs import KernelDirs
from sandbox.launch import INSIDE_SCRIPT, SubprocessLauncher
from sandbox.policy import SandboxPolicy

RUN_DIR = "/sandbox/run"
WORK_DIR = "/sandbox/work"
SCRIPT_DIR = "/sandbox/lib"
SANDBOX_UID = 1000

# Files from /etc a Python process reads; everything else under /etc stays hidden.
_ETC_FILES = ("ld.so.cache", "localtime", "nsswitch.conf", "host.conf", "mime.types", "ssl/openssl.cnf")


# The namespaces every sandbox gets: no network, no view of host processes,
# IPC objects or hostname. The probe in tiers.py checks exactly these.
NAMESPACE_FLAGS = ("--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts")


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def python_roots(python: str) -> list[str]:
    """Directories the interpreter needs: its install and, for a venv, the venv."""
    roots = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    exe = Path(python)
    if exe.is_symlink():
        roots.add(str(Path(os.path.realpath(exe)).parent.parent))
    # /usr is bound anyway; nested roots are covered by their parent.
    ordered = sorted(r for r in roots if not r.startswith("/usr/") and r != "/usr")
    kept: list[str] = []
    for r in ordered:
        if not any(r.startswith(k + "/") for k in kept):
            kept.append(r)
    return kept


def _under_tmp(path: str) -> bool:
    return path == "/tmp" or path.startswith("/tmp/")


def python_mounts(python: str) -> list[tuple[str, str]]:
    """(host path, path inside the sandbox) for each interpreter root.

    Roots keep their own paths so shebangs and sys.prefix hold, except those
    under /tmp: the sandbox's private /tmp would hide them (a checkout and its
    venv in /tmp is common in CI), so they appear under /sandbox/py<N>, and
    the interpreter is started from there (a venv finds its prefix from the
    path it was started by).
    """
    return [(r, f"/sandbox/py{i}" if _under_tmp(r) else r) for i, r in enumerate(python_roots(python))]


def sandbox_python(python: str) -> str:
    """`python` as the sandbox sees it."""
    path = os.path.abspath(python)
    real_dir = os.path.realpath(os.path.dirname(path))
    for host, inside in python_mounts(python):
        for prefix in (host, os.path.realpath(host)):
            for candidate in (path, os.path.join(real_dir, os.path.basename(path))):
                if candidate.startswith(prefix + "/"):
                    return inside + candidate[len(prefix) :]
    return python


def bwrap_argv(
    policy: SandboxPolicy,
    run_dir: Path,
    work_dir: Path,
    script: Path,
    python: str,
    env: dict[str, str],
    new_session: bool = True,
) -> list[str]:
    exe = bwrap_path() or "bwrap"
    argv = [
        exe,
        *NAMESPACE_FLAGS,
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--hostname",
        "sandbox",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for link in ("bin", "lib", "lib64", "sbin"):
        target = Path("/") / link
        if target.is_symlink():
            argv += ["--symlink", os.readlink(target), f"/{link}"]
        elif target.exists():
            argv += ["--ro-bind", str(target), f"/{link}"]
    for name in _ETC_FILES:
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for host, inside in python_mounts(python):
        argv += ["--ro-bind", host, inside]
    argv += [
        "--ro-bind",
        str(script.parent),
        SCRIPT_DIR,
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        str(policy.tmp_mb * 1024 * 1024),
        "--tmpfs",
        "/tmp",
        "--bind",
        str(run_dir),
        RUN_DIR,
        "--bind",
        str(work_dir),
        WORK_DIR,
        "--chdir",
        WORK_DIR,
        # bwrap's root is an unbounded tmpfs; without this, files written
        # outside /tmp and the work dir would eat the host's memory.
        "--remount-ro",
        "/",
        "--clearenv",
    ]
    if new_session:
        argv.append("--new-session")
    for key, value in env.items():
        argv += ["--setenv", key, value]
    return argv


class BwrapLauncher(SubprocessLauncher):
    """Cold start of one kernel in its own bubblewrap sandbox."""

    tier = "bwrap"

    def __init__(self, policy: SandboxPolicy, python: str | None = None) -> None:
        super().__init__(policy, python)
        self.cgroups = PidsCgroups.create()

    def exec_python(self) -> str:
        return sandbox_python(self.python)

    def views(self, dirs: KernelDirs) -> tuple[str, str, str]:
        return RUN_DIR, WORK_DIR, f"{SCRIPT_DIR}/{INSIDE_SCRIPT.name}"

    def new_cgroup(self) -> Path | None:
        return self.cgroups.new(self.policy.max_procs) if self.cgroups else None

    def command(
        self, dirs: KernelDirs, env: dict[str, str], cgroup: Path | None
    ) -> tuple[list[str], dict[str, str]]:
        argv = bwrap_argv(self.policy, dirs.run, dirs.work, INSIDE_SCRIPT, self.python, env)
        argv.append("--")
        if cgroup is not None:
            # Join the group before bwrap forks, so the kernel and all it starts are counted.
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *argv]
        return argv, {"PATH": "/usr/bin:/bin"}
