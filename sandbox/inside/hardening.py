"""Keeping the kernel's own plumbing working whatever a cell did to it, and its messages small.

Runs in the kernel (IPython and ipykernel are imported by the caller); stdlib only itself.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any


def block_debugger() -> None:
    """Keep debugpy out: importing it is ~0.2 s per kernel and it starts threads; nobody debugs here.

    A None entry in sys.modules makes ``import debugpy`` fail, which ipykernel
    treats as "debugger not installed".
    """
    sys.modules.setdefault("debugpy", None)  # type: ignore[arg-type]


# Caps applied in the kernel, well under the runtime's limit for one message
# (sandbox.zmtp.WireLimits, 2 MB, past which the runtime ends the connection
# and replaces the kernel): an honest cell's big output arrives cut to head
# and tail in small messages.
STREAM_CHUNK = 65536  # characters per stream message
DISPLAY_TEXT_CAP = 131072  # characters of one display's text/plain
FIELD_CAP = 4000  # characters of one traceback entry, ename or evalue
TRACEBACK_KEEP = 20  # traceback entries kept at each end

# The first line of the runtime's own cells (a fork's snapshot and restore, sandbox.fork).
# IPython costs ~1 us per character of a cell before running it (its input transformers,
# and the hash its compiler names the cell by, which also keeps the source in linecache):
# a cell starting with this line is run as plain Python, named by this line alone. That
# is all it changes, for that cell only: a cell of the model's that starts with it runs
# with no %magics, as the same Python it could have written anyway.
PLAIN_CELL = "# tora: plain python\n"


def harden(app: Any) -> None:
    """Keep the kernel's own plumbing working whatever a cell did to it, and its messages small.

    Before each cell, before IPython touches sys.stdout (IPython 9 wraps
    ``sys.stdout.write`` first thing in ``run_cell``: a cell that set it to
    None made every later cell fail inside the kernel, unanswered), the
    kernel's streams are put back and file descriptors 1 and 2 lead to them
    again (see ``StreamGuard``). Threads report to the cell that started
    them. Tracebacks, exception values and display text are capped, and
    stream output is sent in chunks.

    What this cannot undo is the cell's own kernel being rewritten (``print``
    redefined, ipykernel's classes patched): that is the state of a stateful
    kernel, and the runtime's side does not depend on any of it.
    """
    from ipykernel import iostream

    out_stream: Any = iostream.OutStream
    guards = [StreamGuard(app, out_stream, "stdout", 1), StreamGuard(app, out_stream, "stderr", 2)]
    kernel = app.kernel
    shell = app.shell
    do_execute = kernel.do_execute
    first = [True]

    def repair(parent: Any) -> None:
        notes = [note for guard in guards if (note := guard.repair(parent))]
        if notes:
            sys.stderr.write("".join(notes))

    async def guarded_do_execute(*args: Any, **kwargs: Any) -> Any:
        if first[0]:
            # Not before: ipykernel's own threads start between here and the first cell.
            first[0] = False
            threads_report_to_their_cell()
        parent = kernel.get_parent("shell")
        repair(parent)
        try:
            reply = await do_execute(*args, **kwargs)
        finally:
            # Again before ipykernel flushes the streams and replies: a cell
            # that broke them still gets its reply (and its own output).
            repair(parent)
        if isinstance(reply, dict):
            for key in ("ename", "evalue"):
                if isinstance(reply.get(key), str):
                    reply[key] = _cap(reply[key])
            if isinstance(reply.get("traceback"), list):
                reply["traceback"] = _cap_traceback(reply["traceback"])
        return reply

    kernel.do_execute = guarded_do_execute
    # ipykernel sleeps 0.5 ms (~1 ms with timer slack) after each cell's flush "so the output
    # makes it to the clients": the runtime ends a cell on its reply and the idle status,
    # which ipykernel publishes after the flushed output on the same socket.
    kernel._execute_sleep = 0.0
    plain_cells(shell)

    show_traceback = shell._showtraceback

    def capped_show_traceback(etype: Any, evalue: Any, stb: Any) -> Any:
        try:
            value = str(evalue)
        except Exception:
            value = "<exception str() failed>"
        return show_traceback(etype, _cap(value), _cap_traceback(stb) if isinstance(stb, list) else stb)

    shell._showtraceback = capped_show_traceback

    # Only text reaches the model: nothing renders PNGs of figures, and
    # nobody's display text exceeds its cap.
    formatter = shell.display_formatter
    formatter.active_types = ["text/plain"]
    display_format = formatter.format

    def capped_format(obj: Any, include: Any = None, exclude: Any = None) -> Any:
        data, metadata = display_format(obj, include=include, exclude=exclude)
        text = data.get("text/plain") if isinstance(data, dict) else None
        if isinstance(text, str) and len(text) > DISPLAY_TEXT_CAP:
            data["text/plain"] = _cap(text, DISPLAY_TEXT_CAP)
        return data, metadata

    formatter.format = capped_format

    flush_buffers = out_stream._flush_buffers

    def chunked_flush_buffers(self: Any) -> Any:
        for parent, data in flush_buffers(self):
            for i in range(0, len(data), STREAM_CHUNK):
                yield parent, data[i : i + STREAM_CHUNK]

    out_stream._flush_buffers = chunked_flush_buffers


def plain_cells(shell: Any) -> None:
    """Cells starting with ``PLAIN_CELL`` skip IPython's input transformers and the compiler's hash."""
    transform_cell = shell.transform_cell
    compiler = shell.compile
    cache = compiler.cache

    def plain_transform_cell(raw_cell: str) -> Any:
        if raw_cell.startswith(PLAIN_CELL):
            return raw_cell
        return transform_cell(raw_cell)

    def plain_cache(transformed_code: str, number: int = 0, raw_code: str | None = None) -> Any:
        if transformed_code.startswith(PLAIN_CELL):
            return cache(PLAIN_CELL, number)
        return cache(transformed_code, number, raw_code)

    shell.transform_cell = plain_transform_cell
    compiler.cache = plain_cache


def _cap(text: str, limit: int = FIELD_CAP) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} ... [{len(text) - 2 * half} characters omitted] ... {text[-half:]}"


def _cap_traceback(lines: list[Any]) -> list[Any]:
    lines = [_cap(line) if isinstance(line, str) else line for line in lines]
    if len(lines) <= 2 * TRACEBACK_KEEP:
        return lines
    omitted = f"... [{len(lines) - 2 * TRACEBACK_KEEP} traceback entries omitted] ...\n"
    return [*lines[:TRACEBACK_KEEP], omitted, *lines[-TRACEBACK_KEEP:]]


def threads_report_to_their_cell() -> None:
    """A thread's output belongs to the cell that started it, even after that cell ended.

    ipykernel keeps the parent header (which request output belongs to) in
    context variables, falling back to the latest cell's for a thread with
    none; and a Python 3.11 thread starts with an empty context. So a thread
    printing after its cell ended had its lines sent as the *next* cell's
    output. Here a thread runs in a copy of its starter's context (what
    Python 3.14 does by default), and so does work submitted to a thread
    pool; the runtime drops what arrives for a finished cell. Output written
    to file descriptors (subprocesses, C code) cannot be attributed and still
    goes to the cell running at the time.
    """
    import contextvars
    import threading
    from concurrent.futures import ThreadPoolExecutor

    start = threading.Thread.start

    def start_in_context(self: threading.Thread) -> None:
        if _plumbing_threads:
            start(self)
            return
        context = contextvars.copy_context()
        run = self.run
        self.run = lambda: context.run(run)  # type: ignore[method-assign]
        start(self)

    threading.Thread.start = start_in_context  # type: ignore[method-assign]
    submit = ThreadPoolExecutor.submit

    def submit_in_context(self: ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return submit(self, contextvars.copy_context().run, fn, *args, **kwargs)

    ThreadPoolExecutor.submit = submit_in_context  # type: ignore[method-assign,assignment]


# True while the kernel builds threads of its own (a stream's pipe reader):
# those must not inherit the building cell's context, or everything they
# relay would belong to that cell for ever.
_plumbing_threads = False


class _Fd:
    """What OutStream reads the file descriptor to take over from (``sys.stdout.fileno()``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


class StreamGuard:
    """sys.stdout (or stderr) and file descriptor 1 (or 2), as the kernel set them up.

    ipykernel points the descriptor at a pipe whose reader thread sends what
    subprocesses and C code write. A cell may replace or close the stream,
    break its methods, close the descriptor (whose number the next ``open``
    then reuses) or the pipe, or kill the reader. ``repair`` runs before each
    cell: it puts the stream back, or builds a new one with a new pipe, and
    points the descriptor at the pipe again from a copy kept aside.
    """

    def __init__(self, app: Any, out_stream: Any, name: str, fd: int) -> None:
        self.app = app
        self.out_stream = out_stream
        self.name = name
        self.fd = fd
        self.stream: Any = getattr(sys, name)
        self.spare = self._spare()
        self._quiet(self.stream)

    def _spare(self) -> int | None:
        """A copy of the descriptor (the pipe's writing end), above the numbers a cell's files get first."""
        import fcntl

        above = max(10, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)
        try:
            return fcntl.fcntl(self.fd, fcntl.F_DUPFD_CLOEXEC, above)
        except OSError:
            return None

    @staticmethod
    def _quiet(stream: Any) -> None:
        """The pipe's reader also echoes everything to the kernel's log file: not any more.

        A cell writing gigabytes to fd 1 filled the log up to RLIMIT_FSIZE,
        which killed the reader, after which such writes blocked for ever.
        """
        copy = getattr(stream, "_original_stdstream_copy", None)
        if copy is None:
            return
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, copy)
            os.close(null)
        except OSError:
            pass

    def _usable(self, stream: Any) -> bool:
        if getattr(stream, "closed", True) or stream.pub_thread is None:
            return False
        # An instance attribute shadowing a method (sys.stdout.write = None).
        # IPython itself leaves ``write`` set to the bound method.
        own = vars(stream)
        for name in ("write", "flush", "writelines", "fileno", "set_parent"):
            if name in own and getattr(own[name], "__func__", None) is not getattr(type(stream), name, None):
                return False
        reader = getattr(stream, "watch_fd_thread", None)
        if reader is None:
            return True
        # The reader reads the pipe's other end (same inode): a cell may close that too.
        return reader.is_alive() and self._same_file(stream._fid, self.spare)

    @staticmethod
    def _same_file(a: int | None, b: int | None) -> bool:
        try:
            sa = os.fstat(a) if a is not None else None
            sb = sa if b is None else os.fstat(b)
        except OSError:
            return False
        return sa is not None and sb is not None and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)

    def repair(self, parent: Any) -> str | None:
        """Before a cell. Returns a note for the cell's stderr if output was lost for good."""
        note = None
        try:
            if not self._usable(self.stream):
                note = self._rebuild()
            elif not self._same_file(self.fd, self.spare):
                if self.spare is None:
                    raise OSError("no copy of the descriptor")
                os.dup2(self.spare, self.fd)
        except OSError:
            note = self._rebuild()
        if getattr(sys, self.name) is not self.stream:
            setattr(sys, self.name, self.stream)
        # shell.set_parent told this cell's parent to whatever sys.stdout was.
        self.stream.set_parent(parent)
        return note

    def _rebuild(self) -> str | None:
        """A new stream and pipe; the old reader, if any, keeps its own pipe."""
        if self.spare is not None:
            try:
                os.close(self.spare)
            except OSError:
                pass
        # The new stream's reader echoes to a copy of what the descriptor is
        # when it takes it over: make that /dev/null (and the descriptor open).
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.fd)
            os.close(null)
            setattr(sys, self.name, _Fd(self.fd))
            global _plumbing_threads
            _plumbing_threads = True
            try:
                self.stream = self.out_stream(self.app.session, self.app.iopub_thread, self.name, watchfd="force")
            finally:
                _plumbing_threads = False
            note = None
        except Exception:
            setattr(sys, self.name, None)
            self.stream = self.out_stream(self.app.session, self.app.iopub_thread, self.name, watchfd=False)
            note = (
                f"[sandbox: file descriptor {self.fd} could not be reconnected after an earlier cell broke it; "
                f"what subprocesses and C code write there is lost]\n"
            )
        self.spare = self._spare()
        return note
