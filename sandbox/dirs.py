"""Per-kernel directories on the host: a run dir (connection file, ipc sockets) and a work dir."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

_PREFIX = "tora-sbx-"
_counter = itertools.count()
_base: Path | None = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(root: Path) -> None:
    # A runtime killed with -9 cannot clean up; the next one does.
    for entry in root.glob(_PREFIX + "*"):
        pid = entry.name.removeprefix(_PREFIX)
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def base_dir() -> Path:
    """This runtime's directory; ipc socket paths must stay under ~107 bytes, so it is short."""
    global _base
    if _base is None or not _base.exists():
        root = Path(tempfile.gettempdir())
        _sweep_stale(root)
        path = root / f"{_PREFIX}{os.getpid()}"
        path.mkdir(mode=0o711, exist_ok=True)
        atexit.register(shutil.rmtree, path, True)
        _base = path
    return _base


@dataclass(frozen=True)
class KernelDirs:
    """``work`` is None where the kernel works in a tmpfs of its own (the bwrap tier)."""

    root: Path
    run: Path
    work: Path | None

    @classmethod
    def create(cls, owner: tuple[int, int] | None = None, work: bool = True) -> KernelDirs:
        """``owner``: the sandbox user, who must write the run dir (sockets, its report)."""
        root = base_dir() / f"k{next(_counter)}"
        run = root / "run"
        root.mkdir(mode=0o711)
        run.mkdir(mode=0o700)
        if owner is not None:
            os.chown(run, *owner)
        if not work:
            return cls(root=root, run=run, work=None)
        (root / "work").mkdir(mode=0o700)
        return cls(root=root, run=run, work=root / "work")

    def seal(self) -> bool:
        """Once the kernel is up: its run dir and every file in it become root's (mode 0700 / 0644).

        The kernel made its sockets and wrote its report there while it
        started (no cell had run); after that it can create, grow or replace
        nothing there (a host directory, outside every bound), and the
        runtime, which dials those sockets again on reconnect, never meets a
        path the kernel can change. False where the runtime is not root (the
        kernel is then the run dir's owner, whatever its mode).
        """
        if os.geteuid() != 0:
            return False
        fd = os.open(self.run, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for name in os.listdir(fd):
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if st.st_uid != 0 or st.st_mode & 0o022:
                    os.chown(name, 0, 0, dir_fd=fd, follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        os.chmod(name, 0o644 if stat.S_ISREG(st.st_mode) else 0o600, dir_fd=fd)
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        return True

    def remove(self) -> None:
        try:
            self._remove_flat()
        except OSError:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.root, ignore_errors=True)

    def _remove_flat(self) -> None:
        """The common case in a few syscalls: run and work dirs holding only files (or nothing).

        Raises OSError on anything else (a subdirectory, a dir laid out
        differently), and ``rmtree`` takes over.
        """
        subdirs = [d for d in (self.run, self.work) if d is not None and d != self.root]
        for sub in subdirs:
            with os.scandir(sub) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        raise IsADirectoryError(entry.path)
                    os.unlink(entry.path)
            os.rmdir(sub)
        os.rmdir(self.root)
