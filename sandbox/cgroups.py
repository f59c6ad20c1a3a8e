"""Per-kernel cgroups: a pids group and a memory group, and killing everything in them.

- pids: RLIMIT_NPROC counts per user, and every kernel runs as the same host
  user, so a pids group per kernel is what stops one fork bomb from starving
  the others (or the machine).
- memory: RLIMIT_AS bounds one process; the memory group bounds the kernel's
  processes together, tmpfs pages (/tmp, the work dir, /dev/shm) included.

cgroup v1 (a mount per controller) and v2 (one mount; controllers enabled in
the root's ``cgroup.subtree_control``) are both handled. On v1, this runtime's
groups sit under its own group of each hierarchy, so a limit set on the
runtime also covers its kernels. A kernel's group is named by its pids group
(the ``Path`` the rest of the sandbox passes around); its memory group has the
same name in the memory hierarchy and goes with it.

Teardown kills every process of the kernel's groups and of any group below
them, thawing frozen ones first (a frozen v1 process ignores SIGKILL until
thawed), until none is left or a deadline passes, and says so if any survives.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox.errors import SandboxError

_PREFIX = "tora-sbx-"
_counter = itertools.count()
# Teardown gives up after this long; a process still there is reported.
KILL_TIMEOUT_S = 10.0
# A kernel's groups in every hierarchy, and the one with its memory limit, keyed by its pids group.
_groups: dict[Path, tuple[Path, ...]] = {}
_memory: dict[Path, Path] = {}
_made: dict[int, KernelCgroups | None] = {}


@dataclass(frozen=True)
class Hierarchy:
    mount: Path
    v2: bool
    controllers: frozenset[str]


@functools.cache
def hierarchies() -> tuple[Hierarchy, ...]:
    """The cgroup mounts of this machine, from /proc/self/mountinfo."""
    found: list[Hierarchy] = []
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        left, _, right = line.partition(" - ")
        fields, extra = left.split(), right.split()
        if len(fields) < 5 or len(extra) < 3:
            continue
        mount = Path(fields[4].replace("\\040", " "))
        if extra[0] == "cgroup2":
            controllers = frozenset(_read(mount / "cgroup.subtree_control").split())
            found.append(Hierarchy(mount, True, controllers))
        elif extra[0] == "cgroup":
            controllers = frozenset(o for o in extra[2].split(",") if o in ("pids", "memory", "freezer"))
            found.append(Hierarchy(mount, False, controllers))
    return tuple(found)


def _own_path(h: Hierarchy) -> str:
    """This process's group in the hierarchy, relative to its root."""
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _, controllers, path = line.split(":", 2)
        if (h.v2 and controllers == "") or (not h.v2 and set(controllers.split(",")) & h.controllers):
            return path.lstrip("/")
    return ""


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class KernelCgroups:
    """This runtime's parent groups (one per hierarchy used); a child group per kernel in each."""

    def __init__(self, pids: Path, memory: Path | None, v2: bool) -> None:
        self.pids_parent = pids
        self.memory_parent = memory
        self.v2 = v2

    @property
    def memory(self) -> bool:
        return self.memory_parent is not None

    @classmethod
    def create(cls) -> KernelCgroups | None:
        """This runtime's groups (one set per process); None where no pids hierarchy is writable."""
        pid = os.getpid()
        if pid not in _made:
            _made[pid] = cls._create()
        return _made[pid]

    @classmethod
    def _create(cls) -> KernelCgroups | None:
        found: dict[str, Path] = {}
        v2 = False
        for h in hierarchies():
            for controller in ("pids", "memory"):
                if controller in h.controllers and controller not in found:
                    # v2: only the root group may have processes and delegate controllers.
                    base = h.mount if h.v2 else h.mount / _own_path(h)
                    if os.access(base, os.W_OK):
                        found[controller] = base
                        v2 = v2 or h.v2
        if "pids" not in found:
            return None
        parents: dict[str, Path] = {}
        for controller, base in found.items():
            _sweep(base)
            parent = base / f"{_PREFIX}{os.getpid()}"
            try:
                parent.mkdir(exist_ok=True)
                if v2:
                    _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in found))
            except OSError:
                if controller == "pids":
                    return None
                continue
            parents[controller] = parent
        groups = cls(parents["pids"], parents.get("memory"), v2)
        atexit.register(groups.remove)
        return groups

    def new(self, max_procs: int, memory_bytes: int) -> Path | None:
        """A kernel's groups, limits set; the pids group names them. None if that fails."""
        name = f"k{next(_counter)}"
        made: list[Path] = []
        try:
            pids = self.pids_parent / name
            pids.mkdir()
            made.append(pids)
            _write(pids / "pids.max", str(max_procs))
            memory = pids if self.v2 else (self.memory_parent / name if self.memory_parent else None)
            if memory is not None:
                if memory != pids:
                    memory.mkdir()
                    made.append(memory)
                _set_memory(memory, memory_bytes, self.v2)
        except OSError:
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    path.rmdir()
            return None
        _groups[pids] = tuple(made)
        if memory is not None:
            _memory[pids] = memory
        return pids

    def remove(self) -> None:
        """Kill what is left in this runtime's groups and remove them (at exit).

        Also what runtimes killed with -9 left next to them (a runtime's own
        runtimes, in tests), so no empty group outlives its parent's group.
        """
        for parent in {self.pids_parent, self.memory_parent} - {None}:
            assert parent is not None
            with contextlib.suppress(SandboxError):
                _kill_tree(parent, KILL_TIMEOUT_S)
            _sweep(parent.parent)


# A kernel's TCP buffers on cgroup v1 (its own loopback is all it can reach).
TCP_LIMIT = 64 * 1024 * 1024


def _set_memory(group: Path, limit: int, v2: bool) -> None:
    if v2:
        _write(group / "memory.max", str(limit))
        if (group / "memory.swap.max").exists():
            _write(group / "memory.swap.max", "0")
        return
    _write(group / "memory.limit_in_bytes", str(limit))
    # Swap as well, where swap is accounted: memory + swap may not exceed the limit either.
    if (group / "memory.memsw.limit_in_bytes").exists():
        _write(group / "memory.memsw.limit_in_bytes", str(limit))
    # v1 charges socket buffers to a group only once it has a TCP limit (v2
    # always does, under memory.max): without one, a kernel's loopback TCP
    # buffers come out of the machine's shared tcp_mem.
    if (group / "memory.kmem.tcp.limit_in_bytes").exists():
        with contextlib.suppress(OSError):
            _write(group / "memory.kmem.tcp.limit_in_bytes", str(min(limit, TCP_LIMIT)))


def memory_group(group: Path | None) -> str | None:
    """The kernel's memory group, if it has one."""
    memory = _memory.get(group) if group is not None else None
    return str(memory) if memory is not None else None


def lower_memory(group: Path | None, limit: int) -> bool:
    """Set the kernel's memory limit to ``limit`` bytes; False where it has no memory group."""
    memory = _memory.get(group) if group is not None else None
    if memory is None:
        return False
    try:
        _set_memory(memory, limit, (memory / "memory.max").exists())
    except OSError:
        return False
    return True


def _forget(group: Path) -> None:
    _groups.pop(group, None)
    _memory.pop(group, None)


def groups_of(group: Path) -> tuple[Path, ...]:
    return _groups.get(group, (group,))


def procs_files(group: Path) -> list[Path]:
    """The ``cgroup.procs`` files a process writes its pid into to join the kernel's groups."""
    return [g / "cgroup.procs" for g in groups_of(group)]


def add(group: Path, pid: int) -> None:
    for path in procs_files(group):
        _write(path, str(pid))


def remove(group: Path) -> None:
    """Remove a kernel's groups; kill what is still in them first if they are not empty.

    A pool kernel's groups empty by themselves when its pid namespace's init
    dies (the Linux kernel kills and reaps the whole namespace first), so the
    common case is one rmdir per group, without reading ``cgroup.procs``.
    """
    try:
        for g in groups_of(group):
            with contextlib.suppress(FileNotFoundError):
                g.rmdir()
    except OSError:
        kill_all(group)
        return
    _forget(group)


def kill_all(group: Path, timeout: float = KILL_TIMEOUT_S) -> None:
    """Kill every process in the kernel's groups and the groups below them, then remove them all.

    Raises SandboxError naming what survived ``timeout`` seconds.
    """
    left: list[str] = []
    for g in groups_of(group):
        try:
            _kill_tree(g, timeout)
        except SandboxError as exc:
            left.append(str(exc))
    _forget(group)
    if left:
        raise SandboxError("; ".join(left))


def _tree(group: Path) -> list[Path]:
    """The group and every group below it, deepest first."""
    out: list[Path] = []
    with contextlib.suppress(OSError):
        for root, _, _ in os.walk(group, topdown=False):
            out.append(Path(root))
    return out


def _kill_tree(group: Path, timeout: float) -> None:
    if not group.exists():
        return
    # No new process from here on: a fork racing the kill fails. A pids limit
    # holds for every group below, too.
    with contextlib.suppress(OSError):
        if (group / "pids.max").exists():
            _write(group / "pids.max", "0")
    with contextlib.suppress(OSError):
        if (group / "cgroup.kill").exists():
            _write(group / "cgroup.kill", "1")  # v2: kills the whole subtree, frozen or not
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        pids = {int(p) for g in _tree(group) for p in _read(g / "cgroup.procs").split()}
        for pid in pids:
            _thaw(pid)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for g in _tree(group):
            with contextlib.suppress(OSError):
                g.rmdir()
        if not group.exists():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    survivors = sorted({int(p) for g in _tree(group) for p in _read(g / "cgroup.procs").split()})
    raise SandboxError(
        f"{len(survivors)} process(es) of {group} survived {timeout:g} s of SIGKILL: {survivors[:20]} "
        "(stuck in the kernel, e.g. uninterruptible I/O); the group is left in place"
    )


def _thaw(pid: int) -> None:
    """Thaw whatever freezer cgroup (v1 or v2) holds ``pid``, and its frozen ancestors."""
    for line in _read(Path(f"/proc/{pid}/cgroup")).splitlines():
        _, controllers, path = line.split(":", 2)
        for h in hierarchies():
            if h.v2 and controllers == "":
                knob, frozen, thawed = "cgroup.freeze", "1", "0"
            elif not h.v2 and "freezer" in h.controllers and "freezer" in controllers.split(","):
                knob, frozen, thawed = "freezer.state", "FROZEN", "THAWED"
            else:
                continue
            g = h.mount / path.lstrip("/")
            while g != h.mount.parent and g.is_relative_to(h.mount):
                if _read(g / knob).strip() in (frozen, "FREEZING"):
                    with contextlib.suppress(OSError):
                        _write(g / knob, thawed)
                g = g.parent


def _sweep(root: Path) -> None:
    # Groups left by a runtime that was killed with -9.
    for entry in root.glob(_PREFIX + "*"):
        pid = entry.name.removeprefix(_PREFIX)
        if pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(SandboxError):
                _kill_tree(entry, KILL_TIMEOUT_S)
