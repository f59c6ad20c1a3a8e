"""The zygote's preparation: everything imported and built before the fork, once."""

from __future__ import annotations

import ctypes
import sys
from typing import Any

from .hardening import block_debugger, harden
from .libc import libc
from .seccomp import seccomp_program

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
        "concurrent.futures.thread",  # loaded by the thread-context patch on a kernel's first cell
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
        from . import kernelapp

        self.kernelapp: Any = kernelapp
        self.app: Any = self.prebuild()
        import gc

        # Everything imported so far is shared with every kernel; keeping the
        # collector off these objects keeps their pages shared after fork.
        gc.collect()
        gc.freeze()
        huge_pages()

    def prebuild(self) -> Any:
        """The application up to its connection file, and the IPython shell; None where that fails.

        The shell (magics, formatters, traceback handlers, prefilters: ~3 ms of
        CPU per kernel) holds no socket, thread or open file (history is off):
        built here, once; IPythonKernel then picks this singleton instead of
        building its own, and wires it to its session and iopub socket after
        the fork.
        """
        from importlib.metadata import version

        from ipykernel.compiler import XCachingCompiler
        from ipykernel.zmqshell import ZMQInteractiveShell

        ka = self.kernelapp
        try:
            if not ka.prebuilt_supported(version("ipykernel")):
                raise RuntimeError(f"ipykernel {version('ipykernel')}, not 7")
            app = ka.KernelApp.instance(config=ka.config(ka.KERNEL_CONNECTION_FILE))
            app.kernel_class = ka.Kernel
            app.prepare()
            shell = ZMQInteractiveShell.instance(
                config=app.config, profile_dir=app.profile_dir, compiler_class=XCachingCompiler
            )
            app.finish_shell(shell)
            # Only text reaches the model (``harden`` sets the same): built here, the
            # formatters' table is shared by every kernel instead of built in each (~4 ms).
            formatter: Any = shell.display_formatter
            formatter.active_types = ["text/plain"]
            # One silent cell through the shell, here: IPython's execution path (input
            # transformers, AST passes, compiler caches) is then built and its bytecode
            # specialised once, in memory every kernel shares, rather than in each kernel
            # on its first cell (~5 ms of CPU per kernel, measured side by side). It
            # leaves no name, no history and no output.
            warmed: Any = shell
            warmed.run_cell("x = [i * 2 for i in range(3)]\ndel x", store_history=False, silent=True)
            return app
        except Exception as exc:  # build everything in each kernel instead
            sys.stderr.write(f"building the kernel before the fork failed ({exc!r}); building it per kernel\n")
            sys.stderr.flush()
            ka.KernelApp.clear_instance()
            ZMQInteractiveShell.clear_instance()
            return None

    def run(self, connection_file: str) -> None:
        ka = self.kernelapp
        if self.app is not None and connection_file == ka.KERNEL_CONNECTION_FILE:
            app = self.app
        else:
            app = ka.KernelApp.instance(config=ka.config(connection_file))
            app.kernel_class = ka.Kernel
        app.initialize([])
        harden(app)
        app.start()
