"""A fork's two halves in the kernel (``sandbox.fork``): ``take`` in the source, ``restore`` in the copy.

Imported by the zygote before its fork (``sandbox.fork.fork_preimports``), so the
runtime's cells only call these: nothing to compile per fork. Needs cloudpickle
in the kernel's Python (a snapshot says so where it is missing).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import sys
import tarfile
import threading
import zlib
from collections import ChainMap
from typing import Any, ClassVar

# The shell's own names, and the cells' history, are not the state.
_SKIP = re.compile(r"^(_+|_i+|_i?\d+|_ih|_oh|_dh|In|Out)$")


def _own(thread: threading.Thread) -> bool:
    """ipykernel's threads, and pyzmq's garbage collector (started by a large send)."""
    target = getattr(getattr(thread, "_target", None), "__module__", None) or ""
    return type(thread).__module__.startswith(("ipykernel", "zmq")) or target.startswith("ipykernel")


def _shell() -> Any:
    from IPython import get_ipython

    return get_ipython()


def take(limit: int) -> None:
    """Print one JSON line: ``{"ok": true, "data": base64, "size": n}``, or ``{"ok": false, "why": ...}``."""
    print(json.dumps(_take(limit)))


def _take(limit: int) -> dict[str, Any]:
    extra = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not _own(t)]
    if extra:
        return _refuse("threads a cell left running cannot be copied: " + ", ".join(extra))
    try:
        if os.waitpid(-1, os.WNOHANG) == (0, 0):
            return _refuse("child processes a cell left running cannot be copied")
    except ChildProcessError:
        pass
    try:
        import cloudpickle
    except ImportError as exc:
        return _refuse(f"cloudpickle is not importable in the kernel ({exc})")
    shell = _shell()
    hidden = shell.user_ns_hidden
    names = {k: v for k, v in shell.user_ns.items() if k not in hidden and not _SKIP.match(k)}
    home = os.environ.get("HOME") or os.getcwd()
    entries = [e for e in sorted(os.listdir(home)) if e != ".ipython"]
    files = b""
    if entries:  # else no tar at all (10 KB of padding, and tarfile's time on both sides)
        buffer = io.BytesIO()
        # GNU: no pax headers to parse on arrival (tarfile compiles a regex for those).
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for entry in entries:
                tar.add(os.path.join(home, entry), arcname=entry)
        files = buffer.getvalue()
    state: dict[str, Any] = {"random": random.getstate(), "cwd": os.getcwd(), "home": home, "files": files}
    # numpy's global generator, where numpy is loaded (numpy.random is preimported with it).
    np = sys.modules.get("numpy")
    if np is not None:
        state["numpy_random"] = np.random.get_state()
    try:
        # The names apart: loaded after the files, they may refer to modules of the work dir.
        state["names"] = _dumps(cloudpickle, names)
        blob = zlib.compress(cloudpickle.dumps(state), 1)
    except Exception as exc:
        return _refuse(f"the kernel's state cannot be copied ({type(exc).__name__}: {exc})")
    if len(blob) > limit:
        return _refuse(f"the kernel's state is {len(blob)} bytes, more than the {limit} bytes a fork copies")
    return {"ok": True, "data": base64.b64encode(blob).decode(), "size": len(blob), "quiet": _quiet()}


def _quiet() -> bool:
    """Whether only a cell can change this state: nothing a cell left to run later on the
    kernel's event loop (a timer, a callback, a task) and no interval timer (``signal.alarm``).
    Threads and child processes were refused already. The runtime keeps a quiet kernel's
    snapshot for its next forks until the kernel runs anything again."""
    import asyncio
    import signal

    for timer in (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF):
        if signal.getitimer(timer) != (0.0, 0.0):
            return False
    try:
        loop: Any = asyncio.get_running_loop()
    except RuntimeError:
        return False
    if getattr(loop, "_scheduled", True) or getattr(loop, "_ready", True):
        return False
    for task in asyncio.all_tasks(loop):
        frame = getattr(task.get_coro(), "cr_frame", None)
        if frame is None or not str(frame.f_globals.get("__name__", "")).startswith("ipykernel."):
            return False
    return True


def _dumps(cloudpickle: Any, names: dict[str, Any]) -> bytes:
    """cloudpickle's, but a closed file (what ``with open(...) as f`` leaves) arrives as a closed file."""
    files = (io.TextIOWrapper, io.BufferedReader, io.BufferedWriter, io.BufferedRandom, io.FileIO)

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc,name-defined]
        # A class attribute: the C pickler reads it once, when built.
        dispatch_table: ClassVar[Any] = ChainMap(dict.fromkeys(files, _reduce_file), cloudpickle.Pickler.dispatch_table)

    buffer = io.BytesIO()
    Pickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(names)
    return buffer.getvalue()


def _reduce_file(f: Any) -> Any:
    if f.closed:
        return _closed_file, (not isinstance(f, io.TextIOWrapper),)
    if isinstance(f, io.TextIOWrapper):
        from cloudpickle.cloudpickle import _file_reduce

        return _file_reduce(f)  # cloudpickle's: an open text file for reading, as its contents
    raise TypeError(f"an open file ({type(f).__name__} {getattr(f, 'name', '')!r})")


def _closed_file(binary: bool) -> Any:
    """A closed file object: any use raises ValueError, as the original's did."""
    f = io.BytesIO() if binary else io.StringIO()
    f.close()
    return f


def _refuse(why: str) -> dict[str, Any]:
    return {"ok": False, "why": why}


def restore(data: str) -> None:
    """Load a snapshot ``take`` printed: names, files, RNG states, working directory."""
    import cloudpickle

    state = cloudpickle.loads(zlib.decompress(base64.b64decode(data)))
    if state["files"]:
        # "r:", not "r": no probing for gzip, bz2 and xz (importing each) first.
        with tarfile.open(fileobj=io.BytesIO(state["files"]), mode="r:") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(state["home"], filter="data")
            else:
                tar.extractall(state["home"])
    try:
        os.chdir(state["cwd"])
    except OSError:
        pass
    _shell().user_ns.update(cloudpickle.loads(state["names"]))
    random.setstate(state["random"])
    if "numpy_random" in state:
        import numpy.random

        numpy.random.set_state(state["numpy_random"])
