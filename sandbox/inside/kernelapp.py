"""The kernel application and kernel the zygote builds before the fork (ipykernel 7), and their config.

Importing this imports ipykernel: only the zygote does, after ``block_debugger``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, ClassVar

from ipykernel import ipkernel
from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp
from IPython.core.application import BaseIPythonApplication

# Every kernel's connection file is at the same path in its own view.
KERNEL_CONNECTION_FILE = "/sandbox/run/conn.json"


def prebuilt_supported(ipykernel_version: str) -> bool:
    """Whether ``KernelApp``, which repeats the steps of ipykernel 7's
    ``IPKernelApp.initialize``, may be built before the fork; others build per kernel.

    tests/test_sandbox_isolation.py checks those steps against the installed ipykernel.
    """
    return ipykernel_version.split(".")[0] == "7"


def config(connection_file: str | None) -> Any:
    from traitlets.config import Config

    cfg: Any = Config()
    cfg.HistoryManager.enabled = False
    cfg.InteractiveShell.colors = "nocolor"
    cfg.InteractiveShell.xmode = "Plain"
    if connection_file is not None:
        cfg.IPKernelApp.connection_file = connection_file
    cfg.Application.log_level = "CRITICAL"
    return cfg


class KernelApp(IPKernelApp):  # type: ignore[misc]
    """``IPKernelApp`` split in two: what holds no socket or thread (in the zygote), the rest per kernel."""

    prepared = False

    # Configuration comes as a Config object; building argparse parsers for
    # an empty command line costs ~15 ms per kernel.
    def parse_command_line(self, argv: Any = None) -> None:
        return None

    # Nobody talks to the heartbeat channel (the runtime watches the process
    # through a pidfd): no zmq context, io thread and heartbeat thread per kernel.
    def init_heartbeat(self) -> None:
        self.heartbeat = None

    # The runtime wrote the connection file; nothing to rewrite.
    def write_connection_file(self, **kwargs: Any) -> None:
        return None

    def prepare(self) -> None:
        """In the zygote: the part of ``initialize`` before the connection file.

        Profile, config files, crash handler, pdb: no socket, no thread,
        nothing per kernel.
        """
        app: Any = self
        base: Any = BaseIPythonApplication
        base.initialize(app, [])
        app.init_pdb()
        app.init_blackhole()

    def finish_shell(self, shell: Any) -> None:
        """In the zygote, once the shell is built: the shell steps of ``initialize``.

        Extensions (storemagic), startup files and exec lines touch only the
        shell and its namespace.
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


class _SysWithoutModules:
    """``sys`` as ``ipykernel.ipkernel`` sees it while a kernel is built: no ``modules``."""

    modules: ClassVar[dict[str, Any]] = {}

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class Kernel(IPythonKernel):  # type: ignore[misc]
    """``IPythonKernel`` on the shell the zygote built."""

    def __init__(self, **kwargs: Any) -> None:
        # IPythonKernel lists the file of every loaded module for the debugger
        # (kept out here): touching ~1000 module objects right after the fork
        # copies ~1800 shared pages, ~4 ms per kernel.
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

    def _send_interrupt_children(self) -> None:
        """SIGINT to the kernel and the processes of its group, as ipykernel means to.

        ipykernel calls ``killpg(pgid)`` when the kernel leads its group, which
        for a pool kernel (its namespace's init, pid 1) is ``kill(-1)``: every
        process but the kernel itself. ``kill(0)`` reaches the whole group, the
        kernel included (Python's SIGINT handler is what lets it reach pid 1).
        """
        if os.getpgid(0) == os.getpid():
            os.kill(0, signal.SIGINT)
        else:
            os.kill(os.getpid(), signal.SIGINT)
