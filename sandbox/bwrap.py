"""The bubblewrap command line for one sandbox, and what runs before it on the host.

Only what the kernel needs is visible: /usr (read-only), the interpreter's
install and the venv (read-only, at their own paths so shebangs and sys.prefix
hold), the kernel's run dir (connection file and ipc sockets). /tmp, the work
dir and /dev are the kernel's own size- and inode-bounded tmpfs mounts, made
by sandbox/inside. No /root, no /home, no host /tmp, no /etc/shadow, no network,
no view of host processes.

bwrap runs as the unprivileged sandbox user (``sandbox.user``), never as root,
so the sandbox's users map to that host user. A root runtime gets there with
a short host prelude (``host_prelude``): join the kernel's cgroups, bind the
read-only roots that user could not reach (an interpreter under /root, mode
0700) into a private mount namespace where it can, and drop to the user with
``setpriv``. bwrap's own ``--ro-bind-fd`` does not help there: it resolves the
fd back to its path, as the sandbox user.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sandbox import cgroups
from sandbox.cgroups import KernelCgroups
from sandbox.dirs import KernelDirs, base_dir
from sandbox.launch import INSIDE_SCRIPT, SubprocessLauncher
from sandbox.policy import SandboxPolicy
from sandbox.user import UidLease, sandbox_ids

RUN_DIR = "/sandbox/run"
WORK_DIR = "/sandbox/work"
SCRIPT_DIR = "/sandbox/lib"
# sandbox/inside, bound under SCRIPT_DIR, and its entry point as the sandbox sees them.
INSIDE_VIEW = f"{SCRIPT_DIR}/inside/{INSIDE_SCRIPT.name}"
# Where sandbox/inside builds the kernel's own /dev before moving it over /dev.
DEV_STAGE = "/sandbox/dev"
# The user inside; outside it is the sandbox user.
SANDBOX_UID = 1000

# Files from /etc a Python process reads; everything else under /etc stays hidden.
_ETC_FILES = ("ld.so.cache", "localtime", "nsswitch.conf", "host.conf", "mime.types", "ssl/openssl.cnf")


# The namespaces every sandbox gets: no network, no view of host processes,
# IPC objects or hostname. The probe checks exactly these.
NAMESPACE_FLAGS = ("--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts")
# Host tools a root runtime needs to drop to the sandbox user (util-linux).
_PRELUDE_TOOLS = ("setpriv", "unshare", "mount")


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


def read_only_binds(python: str) -> list[tuple[str, str]]:
    """Every read-only bind beyond /usr and /etc: the interpreter's roots and sandbox/inside."""
    return [*python_mounts(python), (str(INSIDE_SCRIPT.parent), f"{SCRIPT_DIR}/inside")]


def reachable_by_others(path: str) -> bool:
    """Whether a user who owns nothing on the way (the sandbox user) can look ``path`` up."""
    for parent in Path(os.path.realpath(path)).parents:
        try:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def staged(binds: Sequence[tuple[str, str]], ids: tuple[int, int] | None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The binds with unreachable sources replaced by staging dirs, and the (source, staging dir) pairs.

    A staging dir is an empty dir of this runtime's, which the prelude binds
    the real source onto, in a mount namespace of its own.
    """
    if ids is None:
        return list(binds), []
    out: list[tuple[str, str]] = []
    stage: list[tuple[str, str]] = []
    for i, (src, dst) in enumerate(binds):
        if reachable_by_others(src):
            out.append((src, dst))
            continue
        point = base_dir() / f"stage{i}"
        point.mkdir(mode=0o755, exist_ok=True)
        stage.append((src, str(point)))
        out.append((str(point), dst))
    return out, stage


def host_prelude(
    ids: tuple[int, int] | None, cgroup_procs: Sequence[Path] = (), stage: Sequence[tuple[str, str]] = ()
) -> list[str]:
    """The argv before bwrap's: join the kernel's cgroups, bind staged roots, become the sandbox user.

    Empty when there is nothing to do (a runtime that is not root, no cgroup).
    The process keeps its pid through every exec, so the pid written to
    ``cgroup.procs`` is bwrap's.
    """
    q = shlex.quote
    steps = [f"echo $$ > {q(str(p))}" for p in cgroup_procs]
    steps += [f"mount --bind -o ro {q(src)} {q(point)}" for src, point in stage]
    if ids is not None:
        uid, gid = ids
        steps.append(f'exec setpriv --reuid={uid} --regid={gid} --clear-groups --no-new-privs -- "$@"')
    elif not steps:
        return []
    else:
        steps.append('exec "$@"')
    argv = ["/bin/sh", "-c", " && ".join(steps), "sh"]
    if stage:
        argv = ["unshare", "--mount", "--propagation", "private", "--", *argv]
    return argv


@functools.cache
def bwrap_runs_as(uid: int | None) -> tuple[tuple[int, int] | None, str]:
    """The host user bwrap will run as for a policy's ``uid``, and why, after trying it once.

    Where an unprivileged user may not create user namespaces (a sysctl,
    Ubuntu's AppArmor restriction) or util-linux is missing, a root runtime
    falls back to running bwrap as root and says so.
    """
    ids = sandbox_ids(uid)
    if ids is None:
        return None, "not root"
    missing = [tool for tool in _PRELUDE_TOOLS if shutil.which(tool) is None]
    if missing:
        return None, f"{', '.join(missing)} not found (apt-get install util-linux)"
    ok, why = probe(ids, disable_userns=False)
    if not ok:
        return None, f"bwrap cannot run as uid {ids[0]} ({why})"
    return ids, ""


def probe(ids: tuple[int, int] | None, disable_userns: bool) -> tuple[bool, str]:
    """Run the smallest sandbox with our namespaces; (True, "") or (False, why)."""
    exe = bwrap_path()
    if exe is None:
        return False, "bubblewrap is not installed (apt-get install bubblewrap)"
    cmd = [
        *host_prelude(ids),
        exe,
        *NAMESPACE_FLAGS,
        *(["--disable-userns"] if disable_userns else []),
        "--die-with-parent",
        "--ro-bind",
        "/usr",
        "/usr",
        *_system_links(),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--",
        "/usr/bin/true",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=10, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"bubblewrap failed to run: {exc}"
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        return False, err[-1] if err else f"exit {proc.returncode}"
    return True, ""


@functools.cache
def disable_userns_works(ids: tuple[int, int] | None) -> bool:
    """bubblewrap >= 0.8 can forbid new user namespaces inside for good."""
    return probe(ids, disable_userns=True)[0]


def _system_links() -> list[str]:
    argv: list[str] = []
    for link in ("bin", "lib", "lib64", "sbin"):
        target = Path("/") / link
        if target.is_symlink():
            argv += ["--symlink", os.readlink(target), f"/{link}"]
        elif target.exists():
            argv += ["--ro-bind", str(target), f"/{link}"]
    return argv


def bwrap_argv(
    policy: SandboxPolicy,
    ro: Sequence[tuple[str, str]],
    rw: Sequence[tuple[str, str]],
    env: dict[str, str],
    single: bool,
    disable_userns: bool,
) -> list[str]:
    """bwrap's argv up to ``--``.

    ``single``: one kernel in this sandbox; sandbox/inside makes its /tmp, work
    dir and /dev in a mount namespace of its own, with CAP_SYS_ADMIN inside
    the sandbox's user namespace, which it drops before anything else runs.
    Otherwise the sandbox is a zygote's, whose kernels each get new
    namespaces from the zygote (and so may not have user namespaces
    disabled); its /tmp holds the IPython profile made once.
    """
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
        *_system_links(),
    ]
    if single:
        if disable_userns:
            argv.append("--disable-userns")
        argv += ["--cap-add", "CAP_SYS_ADMIN"]
    for name in _ETC_FILES:
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    # bwrap makes the missing parents of a bind 0700 (owner: the sandbox
    # user); kernels run as uids of their own, which must walk through them.
    parents = sorted({str(p) for _, inside in (*ro, *rw) for p in Path(inside).parents if str(p) != "/"})
    for parent in parents:
        argv += ["--perms", "0755", "--dir", parent]
    for host, inside in ro:
        argv += ["--ro-bind", host, inside]
    for host, inside in rw:
        argv += ["--bind", host, inside]
    argv += ["--proc", "/proc", "--dev", "/dev", "--dir", WORK_DIR, "--dir", DEV_STAGE, "--dir", RUN_DIR]
    if single:
        argv += ["--dir", "/tmp"]
    else:
        argv += ["--size", str(policy.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp"]
    argv += [
        "--chdir",
        "/",
        # bwrap's root is an unbounded tmpfs; without this, files written
        # outside the kernel's own mounts would eat the host's memory.
        "--remount-ro",
        "/",
        "--clearenv",
        "--new-session",
    ]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    return argv


def view_config(policy: SandboxPolicy, kid: str | None = None) -> dict[str, object]:
    """What sandbox/inside mounts for one kernel (see ``inside.mounts.mount_kernel_view``)."""
    mb = 1024 * 1024
    return {
        "kid": kid,
        "tmp_bytes": policy.tmp_mb * mb,
        "work_bytes": policy.work_mb * mb,
        "shm_bytes": policy.shm_mb * mb,
        "inodes": policy.max_inodes,
    }


class BwrapLauncher(SubprocessLauncher):
    """Cold start of one kernel in its own bubblewrap sandbox."""

    tier = "bwrap"

    def __init__(self, policy: SandboxPolicy, python: str | None = None) -> None:
        super().__init__(policy, python)
        self.cgroups = KernelCgroups.create()
        self.ids = bwrap_runs_as(policy.uid)[0]
        self.disable_userns = disable_userns_works(self.ids)

    def exec_python(self) -> str:
        return sandbox_python(self.python)

    def host_work_dir(self) -> bool:
        return False

    def dir_owner(self) -> tuple[int, int] | None:
        return self.ids

    def views(self, dirs: KernelDirs) -> tuple[str, str, str]:
        return RUN_DIR, WORK_DIR, INSIDE_VIEW

    def new_cgroup(self) -> Path | None:
        if self.cgroups is None:
            return None
        return self.cgroups.new(self.policy.max_procs, self.policy.memory_mb * 1024 * 1024)

    def inside_config(self) -> dict[str, object]:
        return {"view": view_config(self.policy)}

    def facts(self, cgroup: Path | None) -> dict[str, Any]:
        return {**super().facts(cgroup), "userns_disabled": self.disable_userns}

    def take_uid(self) -> UidLease | None:
        return UidLease.take() if self.ids is not None else None

    def command(
        self, dirs: KernelDirs, env: dict[str, str], cgroup: Path | None, lease: UidLease | None = None
    ) -> tuple[list[str], dict[str, str]]:
        ids = lease.ids if lease is not None else self.ids
        ro, stage = staged(read_only_binds(self.python), ids)
        argv = bwrap_argv(self.policy, ro, [(str(dirs.run), RUN_DIR)], env, True, self.disable_userns)
        procs = cgroups.procs_files(cgroup) if cgroup is not None else []
        # Join the groups before bwrap forks, so the kernel and all it starts are counted.
        return [*host_prelude(ids, procs, stage), *argv, "--"], {"PATH": "/usr/bin:/bin"}
