"""Per-kernel directories on the host: a run dir (connection file, ipc sockets) and a work dir."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
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
