"""Per-kernel pids cgroups (cgroup v1 or v2), where the runtime may create them.

RLIMIT_NPROC does not hold for a kernel whose real uid is root (bwrap run by
root maps the sandbox user to uid 0 outside), so a pids cgroup is what stops a
fork bomb. Every kernel gets its own, so one bomb cannot starve the others.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import signal
from pathlib import Path

_PREFIX = "tora-sbx-"
_counter = itertools.count()


def _pids_root() -> Path | None:
    for candidate in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        if (candidate / "cgroup.procs").exists() and (
            candidate.name == "pids" or "pids" in _read(candidate / "cgroup.subtree_control")
        ):
            return candidate
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PidsCgroups:
    """This runtime's parent group; one child group per kernel."""

    def __init__(self, root: Path) -> None:
        self.parent = root / f"{_PREFIX}{os.getpid()}"

    @classmethod
    def create(cls) -> PidsCgroups | None:
        root = _pids_root()
        if root is None or not os.access(root, os.W_OK):
            return None
        _sweep(root)
        groups = cls(root)
        try:
            groups.parent.mkdir(exist_ok=True)
        except OSError:
            return None
        atexit.register(groups.remove)
        return groups

    def remove(self) -> None:
        """Kill what is left in this runtime's groups and remove them."""
        if not self.parent.exists():
            return
        for child in self.parent.iterdir():
            if child.is_dir():
                kill_all(child)
        with contextlib.suppress(OSError):
            self.parent.rmdir()

    def new(self, max_procs: int) -> Path | None:
        path = self.parent / f"k{next(_counter)}"
        try:
            path.mkdir()
            (path / "pids.max").write_text(str(max_procs))
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return path


def add(group: Path, pid: int) -> None:
    (group / "cgroup.procs").write_text(str(pid))


def remove(group: Path) -> None:
    """Remove a kernel's group; kill what is still in it first if it is not empty.

    A pool kernel's group empties by itself when its pid namespace's init dies
    (the Linux kernel kills and reaps the whole namespace first), so the common
    case is one rmdir, without reading ``cgroup.procs``.
    """
    try:
        group.rmdir()
    except FileNotFoundError:
        return
    except OSError:
        kill_all(group)


def kill_all(group: Path) -> None:
    """Kill every process left in the group, then remove it."""
    for _ in range(50):
        pids = [int(p) for p in _read(group / "cgroup.procs").split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            group.rmdir()
            return
        os.sched_yield()
    with contextlib.suppress(OSError):
        group.rmdir()


def _sweep(root: Path) -> None:
    # Groups left by a runtime that was killed with -9.
    for entry in root.glob(_PREFIX + "*"):
        pid = entry.name.removeprefix(_PREFIX)
        if pid.isdigit() and not _pid_alive(int(pid)):
            for child in entry.iterdir():
                if child.is_dir():
                    kill_all(child)
            with contextlib.suppress(OSError):
                entry.rmdir()
