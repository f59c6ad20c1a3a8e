"""Code that runs inside the sandbox, in the kernel's (or the zygote's) process.

Run as a script by path (``python .../sandbox/inside.py kernel CONFIG_JSON``), so
that it imports neither the ``sandbox`` package nor pydantic: only the standard
library and ipykernel. Keep it that way, the zygote forks from this module.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
from typing import Any, ClassVar

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

_libc: Any = None


def libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def die_with_parent() -> None:
    libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def no_new_privs() -> None:
    libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def apply_limits(limits: dict[str, int]) -> dict[str, int]:
    """Set rlimits for this process and everything it starts; returns those that took."""
    mb = 1024 * 1024
    table = {
        "memory_mb": (resource.RLIMIT_AS, mb),
        "max_file_mb": (resource.RLIMIT_FSIZE, mb),
        "cpu_time_s": (resource.RLIMIT_CPU, 1),
        "max_open_files": (resource.RLIMIT_NOFILE, 1),
        "max_procs": (resource.RLIMIT_NPROC, 1),
    }
    applied: dict[str, int] = {}
    for key, (which, unit) in table.items():
        if key in limits:
            value = int(limits[key]) * unit
            try:
                resource.setrlimit(which, (value, value))
            except (ValueError, OSError):
                continue
            applied[key] = int(limits[key])
    # A core dump of a 2 GB kernel would fill the work dir.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return applied


PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def seccomp_program(bpf_hex: str) -> Any:
    """The filter the runtime compiled (sandbox/seccomp.py), ready for ``load_seccomp``."""
    bpf = bytes.fromhex(bpf_hex)
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.addressof(buf))
    return prog, buf


def load_seccomp(program: Any) -> None:
    """Install the filter on this (single-threaded) process and everything it starts."""
    no_new_privs()
    prog, _buf = program
    _check(libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")


def effective_capabilities() -> int:
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(libc().capget(ctypes.byref(header), ctypes.byref(data)), "capget")
    return int(data[0]) | int(data[3]) << 32


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


_ACCESS_FS_V1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_READ = 1 | 4 | 8  # EXECUTE, READ_FILE, READ_DIR


def landlock(ro: list[str], rw: list[str]) -> int:
    """Restrict this process and its children: read ``ro``, read/write ``rw``, nothing else.

    Also, where the Linux kernel supports it, no TCP bind/connect and no signals
    to processes outside. Returns the ABI used (0: Landlock unavailable).
    """
    lc = libc()
    lc.syscall.restype = ctypes.c_long
    abi = lc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    fs = _ACCESS_FS_V1
    if abi >= 2:
        fs |= 1 << 13  # REFER
    if abi >= 3:
        fs |= 1 << 14  # TRUNCATE
    net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP
    scoped = 3 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = lc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))

    for paths, access in ((ro, _FS_READ), (rw, fs)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            is_dir = os.path.isdir(path)
            rule = PathBeneath(access if is_dir else access & (1 | 2 | 4 | (1 << 14)), fd)
            lc.syscall(445, ruleset, 1, ctypes.byref(rule), ctypes.c_uint32(0))
            os.close(fd)
    no_new_privs()
    if lc.syscall(446, ruleset, ctypes.c_uint32(0)) != 0:
        os.close(ruleset)
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)
    return int(abi)


def block_debugger() -> None:
    """Keep debugpy out: importing it is ~0.2 s per kernel and it starts threads; nobody debugs here.

    A None entry in sys.modules makes ``import debugpy`` fail, which ipykernel
    treats as "debugger not installed".
    """
    sys.modules.setdefault("debugpy", None)  # type: ignore[arg-type]


def kernel_argv(connection_file: str) -> list[str]:
    return [
        "-f",
        connection_file,
        "--HistoryManager.enabled=False",
        "--InteractiveShell.colors=nocolor",
        # Context mode formats a 3000-frame RecursionError for seconds; Plain
        # is the standard Python traceback, in milliseconds.
        "--InteractiveShell.xmode=Plain",
        "--IPKernelApp.log_level=CRITICAL",
        "--Application.log_level=CRITICAL",
    ]


def run_kernel(connection_file: str) -> None:
    """Build the IPython kernel from a connection file and serve until killed."""
    block_debugger()
    from ipykernel.kernelapp import IPKernelApp

    app: Any = IPKernelApp.instance()
    app.initialize(kernel_argv(connection_file))
    harden(app)
    app.start()


# Caps applied in the kernel, well under the runtime's limit for one message
# (sandbox.zmtp.WireLimits, 2 MB): an honest cell's big output then arrives
# cut to head and tail in small messages instead of being dropped whole.
STREAM_CHUNK = 65536  # characters per stream message
DISPLAY_TEXT_CAP = 131072  # characters of one display's text/plain
FIELD_CAP = 4000  # characters of one traceback entry, ename or evalue
TRACEBACK_KEEP = 20  # traceback entries kept at each end


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


# --- zygote -----------------------------------------------------------------
# The zygote runs in one bwrap sandbox with everything imported and the kernel
# application and shell built. For each kernel it clones I straight into new
# user, mount, pid, ipc, uts and network namespaces (I is pid 1 of the new pid
# namespace); where that is refused, it forks a child C that unshares them and
# forks I. I brings up loopback, mounts the kernel's own view (run dir, bounded
# /tmp, work dir and /dev; the other kernels' dirs and /proc hidden), says
# hello to the runtime over a unix socket (which tells the runtime I's host pid
# so it can put it in the kernel's cgroups and watch it), then forks K, the
# kernel, which confines itself (no capabilities, rlimits, seccomp), and waits
# for it. Killing I tears down the whole pid namespace.

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if v is None else v.encode() for v in (src, target, fstype, data)]
    _check(libc().mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def drop_capabilities() -> None:
    lc = libc()
    for cap in range(64):
        if lc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break
    lc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(lc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def _namespace_flags(net: bool) -> int:
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    return flags | CLONE_NEWNET if net else flags


def _map_ids(uid: int, gid: int, outer_uid: int, outer_gid: int) -> None:
    """Map our own user (``outer_*`` in the parent namespace) to ``uid``/``gid``; no supplementary groups."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {outer_uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {outer_gid} 1")


def map_child(pid: int, uid: int, gid: int, host_uid: int) -> None:
    """In the zygote: map a cloned kernel's user to its own host uid (the zygote's namespace maps the range)."""
    for name, inner in (("uid_map", uid), ("gid_map", gid)):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
        try:
            os.write(fd, f"{inner} {host_uid} 1".encode())
        finally:
            os.close(fd)


def _enter_namespaces(uid: int, gid: int, outer_uid: int, outer_gid: int, net: bool) -> None:
    _check(libc().unshare(_namespace_flags(net)), "unshare")
    _map_ids(uid, gid, outer_uid, outer_gid)


SYS_CLONE = 56  # x86_64


def clone_into_namespaces(net: bool) -> int:
    """fork() whose child starts in new namespaces, as pid 1 of a new pid namespace.

    One copy of the zygote's address space per kernel fewer than fork, unshare
    and fork again (~4 ms of CPU per kernel: page tables copied, then torn
    down). The interpreter is told about the fork exactly as ``os.fork`` does
    it. Raises OSError where the raw syscall is refused or unknown (the caller
    falls back to fork and unshare).
    """
    if os.uname().machine != "x86_64":
        raise OSError(38, "clone into namespaces: x86_64 only")
    api = ctypes.pythonapi
    lc = libc()
    lc.syscall.restype = ctypes.c_long
    api.PyOS_BeforeFork()
    pid = lc.syscall(
        ctypes.c_long(SYS_CLONE),
        ctypes.c_ulong(_namespace_flags(net) | signal.SIGCHLD),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
        ctypes.c_ulong(0),
    )
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return int(pid)


def _tmpfs(target: str, size: int, inodes: int, mode: str, flags: int = MS_NOSUID | MS_NODEV) -> None:
    _mount("tmpfs", target, "tmpfs", flags, f"size={size},nr_inodes={inodes},mode={mode}")


# What /dev holds for a kernel: the harmless character devices, bound from
# the sandbox's own /dev; the rest of it is read-only.
_DEVICES = ("null", "zero", "full", "random", "urandom")
_DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
              ("stderr", "/proc/self/fd/2"))  # fmt: skip


def _private_dev(stage: str, shm_bytes: int, inodes: int) -> None:
    """A /dev of the kernel's own: device nodes, read-only, plus a small /dev/shm."""
    _mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for name in _DEVICES:
        os.close(os.open(f"{stage}/{name}", os.O_WRONLY | os.O_CREAT, 0o666))
        _mount(f"/dev/{name}", f"{stage}/{name}", None, MS_BIND)
    for name, target in _DEV_LINKS:
        os.symlink(target, f"{stage}/{name}")
    os.mkdir(f"{stage}/shm")
    _tmpfs(f"{stage}/shm", shm_bytes, inodes, "1777")
    _mount(None, stage, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    _mount(stage, "/dev", None, MS_MOVE)


def mount_kernel_view(view: dict[str, Any]) -> None:
    """The kernel's own file system, in a mount namespace of its own (CAP_SYS_ADMIN in it).

    Its /tmp, work dir and /dev/shm are tmpfs mounts bounded in size and
    inodes (their pages count against the kernel's memory cgroup too); its
    /dev holds nothing but a few device nodes. In a zygote's kernel
    (``view["kid"]``), the kernel's own run dir is bound at /sandbox/run and
    every other kernel's dirs are hidden, as is the zygote's /proc.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    kid = view.get("kid")
    if kid:
        _mount(f"/sandbox/kernels/{kid}/run", "/sandbox/run", None, MS_BIND | MS_REC)
        _mount("tmpfs", "/sandbox/kernels", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
    inodes = int(view["inodes"])
    _tmpfs("/tmp", view["tmp_bytes"], inodes, "1777")
    _tmpfs("/sandbox/work", view["work_bytes"], inodes, "0755")
    _private_dev("/sandbox/dev", view["shm_bytes"], inodes)
    if kid:
        # The kernel refuses a new proc when the old one has overmounts (bwrap
        # covers /proc/sys and others); hide it instead so the zygote's other
        # kernels are not listed.
        _mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")


SIOCSIFFLAGS, IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x8914, 0x1, 0x8, 0x40


def loopback_up() -> None:
    """Bring up ``lo`` of a fresh network namespace, as bwrap does for its own."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING))


def _hello(kid: str) -> None:
    """Tell the runtime our pid (it reads it from SO_PEERCRED) and wait until it has caged us."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect("/sandbox/ctl/sock")
        s.sendall(kid.encode() + b"\n")
        if s.recv(16) != b"go\n":
            os._exit(3)


def _init_loop(child: int) -> None:
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == child:
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


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


def _spawn_kernel(
    kid: str, config: dict[str, Any], warm: Any, entered: bool, host_uid: int | None, gate: int | None
) -> None:
    """Runs in the zygote's fresh child; never returns.

    ``entered``: the child was cloned straight into its namespaces and is
    already I; otherwise it is C, which enters them and forks I.
    ``host_uid``: the kernel's own host uid; once ``gate`` reads end of file,
    the zygote has mapped the kernel's user to it (cloned child), or C maps
    it itself (see ``_enter_namespaces``).
    """
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open("/dev/null", os.O_RDWR)
        # fd 1 is the zygote's pipe to the runtime; fd 2 (the zygote's log)
        # takes what goes wrong until the kernel's own log is open.
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        os.setsid()
        net = config.get("net_per_kernel", False)
        uid, gid = config["uid"], config["gid"]
        if entered and host_uid is None:
            _map_ids(uid, gid, uid, gid)
        elif not entered:
            if host_uid is not None:
                # C, still in the zygote's namespace (whose CAP_SETUID it holds), becomes the kernel's user.
                os.setresgid(host_uid, host_uid, host_uid)
                os.setresuid(host_uid, host_uid, host_uid)
            _enter_namespaces(uid, gid, host_uid or uid, host_uid or gid, net)
            if os.fork() != 0:
                os._exit(0)
        # I: pid 1 of the kernel's namespace.
        if net:
            loopback_up()
        _hello(kid)
        if gate is not None:
            os.read(gate, 1)  # end of file: the zygote has written our maps
            os.close(gate)
            # Capabilities in our own namespace are kept: the old uid was not its root.
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        log = os.open(f"/sandbox/kernels/{kid}/run/kernel.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        mount_kernel_view({**config["view"], "kid": kid})
        # The kernel must not be able to talk to the runtime's control socket.
        _mount("tmpfs", "/sandbox/ctl", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
        child = os.fork()
        if child != 0:
            _init_loop(child)
        # K: the kernel.
        os.setsid()
        confine(config, warm.seccomp)
        if "numpy.random" in sys.modules:
            sys.modules["numpy.random"].seed()
        warm.run(KERNEL_CONNECTION_FILE)
    except BaseException as exc:
        try:
            import traceback

            where = "".join(traceback.format_tb(exc.__traceback__)[-2:])
            os.write(2, f"kernel {kid} failed to start: {exc!r}\n{where}".encode())
        finally:
            os._exit(4)
    os._exit(0)


KERNEL_CONNECTION_FILE = "/sandbox/run/conn.json"


def prebuilt_supported(ipykernel_version: str) -> bool:
    """Whether ``Warm``'s KernelApp, which repeats the steps of ipykernel 7's
    ``IPKernelApp.initialize``, may be built before the fork; others build per kernel.

    tests/test_sandbox_isolation.py checks those steps against the installed ipykernel.
    """
    return ipykernel_version.split(".")[0] == "7"


class _SysWithoutModules:
    """``sys`` as ``ipykernel.ipkernel`` sees it while a kernel is built: no ``modules``."""

    modules: ClassVar[dict[str, Any]] = {}

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
HUGE = 2 * 1024 * 1024


def huge_pages() -> int:
    """Back the zygote's anonymous memory (the Python heap) with transparent huge pages.

    fork() then copies one page-table entry per 2 MB instead of 512, and an
    exit tears down as few; a kernel that writes a page still copies only
    that 4 KB page (Linux splits the shared huge mapping in the child). Done
    once, in the zygote, with MADV_COLLAPSE (Linux >= 6.1); elsewhere a no-op.
    Returns the bytes collapsed.
    """
    lc = libc()
    lc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    done = 0
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.split()
        span, perms = fields[0], fields[1]
        path = fields[5] if len(fields) > 5 else ""
        if perms != "rw-p" or (path and path != "[heap]"):
            continue
        lo, hi = (int(x, 16) for x in span.split("-"))
        start, end = (lo + HUGE - 1) // HUGE * HUGE, hi // HUGE * HUGE
        if end <= start:
            continue
        lc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)
        if lc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_COLLAPSE) == 0:
            done += end - start
    return done


class Warm:
    """Everything done before the fork so each kernel builds fast (~15 ms of CPU instead of ~0.6 s)."""

    # What IPKernelApp.initialize() would otherwise import in every child.
    MODULES = (
        "ipykernel.kernelapp",
        "ipykernel.ipkernel",
        "ipykernel.zmqshell",
        "ipykernel.debugger",
        "IPython.core.completerlib",
        "IPython.core.debugger",
        "IPython.core.oinspect",
        "IPython.extensions.storemagic",
        "IPython.utils.wildcard",
        "pdb",
        "code",
        "faulthandler",
        "tornado.gen",
        "tornado.locks",
        "tornado.queues",
        "tornado.platform.asyncio",
    )

    def __init__(self, preimport: list[str], seccomp: str | None) -> None:
        import importlib

        # Decoded once; each kernel only loads it.
        self.seccomp = seccomp_program(seccomp) if seccomp else None

        block_debugger()
        for name in [*preimport, *self.MODULES]:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        from ipykernel import ipkernel
        from ipykernel.ipkernel import IPythonKernel
        from ipykernel.kernelapp import IPKernelApp
        from IPython.core.application import BaseIPythonApplication

        class KernelApp(IPKernelApp):  # type: ignore[misc]
            # Configuration comes as a Config object; building argparse
            # parsers for an empty command line costs ~15 ms per kernel.
            def parse_command_line(self, argv: Any = None) -> None:
                return None

            # Nobody talks to the heartbeat channel (the runtime watches the
            # process through a pidfd): no zmq context, io thread and heartbeat
            # thread per kernel.
            def init_heartbeat(self) -> None:
                self.heartbeat = None

            # The runtime wrote the connection file; nothing to rewrite.
            def write_connection_file(self, **kwargs: Any) -> None:
                return None

            prepared = False

            def prepare(self) -> None:
                """In the zygote: the part of ``initialize`` before the connection file.

                Profile, config files, crash handler, pdb: no socket, no
                thread, nothing per kernel.
                """
                app: Any = self
                base: Any = BaseIPythonApplication
                base.initialize(app, [])
                app.init_pdb()
                app.init_blackhole()

            def finish_shell(self, shell: Any) -> None:
                """In the zygote, once the shell is built: the shell steps of ``initialize``.

                Extensions (storemagic), startup files and exec lines touch
                only the shell and its namespace.
                """
                app: Any = self
                app.shell = shell
                app.init_gui_pylab()
                app.init_extensions()
                app.init_code()
                app.prepared = True

            def initialize(self, argv: Any = None) -> None:
                app: Any = self
                if not app.prepared:
                    parent: Any = IPKernelApp
                    parent.initialize(app, argv)
                    return
                # The rest of IPKernelApp.initialize (ipykernel 7), in the kernel.
                app.init_connection_file()
                app.init_poller()
                app.init_sockets()
                app.init_heartbeat()
                app.write_connection_file()
                app.log_connection_info()
                app.init_io()
                try:
                    app.init_signal()
                except Exception:
                    pass
                app.init_kernel()
                app.init_path()
                app.init_shell()
                # init_gui_pylab, init_extensions, init_code: done in finish_shell.
                sys.stdout.flush()
                sys.stderr.flush()

        class Kernel(IPythonKernel):  # type: ignore[misc]
            def __init__(self, **kwargs: Any) -> None:
                # IPythonKernel lists the file of every loaded module for the
                # debugger (kept out here): touching ~1000 module objects right
                # after the fork copies ~1800 shared pages, ~4 ms per kernel.
                real = getattr(ipkernel, "sys")  # noqa: B009
                setattr(ipkernel, "sys", _SysWithoutModules(real))  # noqa: B010
                try:
                    # Returns the shell the zygote built (a singleton).
                    parent: Any = IPythonKernel
                    parent.__init__(self, **kwargs)
                finally:
                    setattr(ipkernel, "sys", real)  # noqa: B010
                shell: Any = getattr(self, "shell")  # noqa: B009
                shell.parent = self
                shell.kernel = self

        self.app_class: Any = KernelApp
        self.kernel_class: Any = Kernel
        # The IPython shell (magics, formatters, traceback handlers, prefilters:
        # ~3 ms of CPU per kernel) holds no socket, thread or open file
        # (history is off): build it here, once. IPythonKernel then picks this
        # singleton instead of building its own, and wires it to its session
        # and iopub socket after the fork.
        from ipykernel.compiler import XCachingCompiler
        from ipykernel.zmqshell import ZMQInteractiveShell

        # The application itself, up to its connection file, likewise; every
        # kernel's connection file is at the same path in its own view.
        self.app: Any = None
        try:
            from importlib.metadata import version

            if not prebuilt_supported(version("ipykernel")):
                raise RuntimeError(f"ipykernel {version('ipykernel')}, not 7")
            app = KernelApp.instance(config=self.config(KERNEL_CONNECTION_FILE))
            app.kernel_class = Kernel
            app.prepare()
            shell = ZMQInteractiveShell.instance(
                config=app.config, profile_dir=app.profile_dir, compiler_class=XCachingCompiler
            )
            app.finish_shell(shell)
            self.app = app
        except Exception as exc:  # build everything in each kernel instead
            sys.stderr.write(
                f"building the kernel before the fork failed ({exc!r}); building it per kernel\n"
            )
            sys.stderr.flush()
            KernelApp.clear_instance()
            ZMQInteractiveShell.clear_instance()
        import gc

        # Everything imported so far is shared with every kernel; keeping the
        # collector off these objects keeps their pages shared after fork.
        gc.collect()
        gc.freeze()
        huge_pages()

    @staticmethod
    def config(connection_file: str | None) -> Any:
        from traitlets.config import Config

        config: Any = Config()
        config.HistoryManager.enabled = False
        config.InteractiveShell.colors = "nocolor"
        config.InteractiveShell.xmode = "Plain"
        if connection_file is not None:
            config.IPKernelApp.connection_file = connection_file
        config.Application.log_level = "CRITICAL"
        return config

    def run(self, connection_file: str) -> None:
        if self.app is not None and connection_file == KERNEL_CONNECTION_FILE:
            app = self.app
        else:
            app = self.app_class.instance(config=self.config(connection_file))
            app.kernel_class = self.kernel_class
        app.initialize([])
        harden(app)
        app.start()


def zygote(config: dict[str, Any]) -> None:
    warm = Warm(config.get("preimport", []), config.get("seccomp"))
    # Children are reaped automatically (I, or C which exits right after its fork).
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    use_clone = True
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            os._exit(0)  # the runtime is gone
        fields = line.decode().split()
        if not fields:
            continue
        kid = fields[0]
        host_uid = int(fields[1]) if len(fields) > 1 else None
        net = config.get("net_per_kernel", False)
        if use_clone:
            gate = os.pipe() if host_uid is not None else None
            try:
                pid = clone_into_namespaces(net)
            except OSError as exc:
                if gate is not None:
                    os.close(gate[0])
                    os.close(gate[1])
                use_clone = False
                sys.stderr.write(f"clone into namespaces refused ({exc}); forking and unsharing\n")
                sys.stderr.flush()
            else:
                if pid == 0:
                    if gate is not None:
                        os.close(gate[1])
                    _spawn_kernel(kid, config, warm, True, host_uid, gate[0] if gate else None)
                if gate is not None and host_uid is not None:
                    os.close(gate[0])
                    try:
                        map_child(pid, config["uid"], config["gid"], host_uid)
                    except OSError as exc:
                        # The child fails to switch users and exits; the runtime reports it.
                        sys.stderr.write(f"mapping kernel {kid} to uid {host_uid} failed: {exc}\n")
                        sys.stderr.flush()
                    finally:
                        os.close(gate[1])
                continue
        if os.fork() == 0:
            _spawn_kernel(kid, config, warm, False, host_uid, None)


def main(argv: list[str]) -> None:
    mode, config_json = argv[1], argv[2]
    config = json.loads(config_json)
    if mode == "zygote":
        zygote(config)
        return
    if config.get("die_with_parent"):
        die_with_parent()
        expected = config.get("parent_pid") or 0
        if expected and os.getppid() != expected:
            os._exit(1)
    view = config.get("view")
    if view:
        # One kernel in its own bwrap: CAP_SYS_ADMIN in the sandbox's user
        # namespace, for a mount namespace of its own; confine() drops it.
        _check(libc().unshare(CLONE_NEWNS), "unshare")
        mount_kernel_view(view)
    seccomp = seccomp_program(config["seccomp"]) if config.get("seccomp") else None
    confine(config, seccomp)
    if mode == "kernel":
        run_kernel(config["connection_file"])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
