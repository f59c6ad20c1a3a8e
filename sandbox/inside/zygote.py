"""The zygote: one pre-imported process in one bwrap sandbox that forks every kernel.

For each kernel it clones K straight into new user, mount, pid, ipc, uts and
network namespaces (K is pid 1 of the new pid namespace); where that is
refused, it forks a child C that unshares them and forks K. K brings up
loopback, says hello to the runtime over a unix socket (which tells the
runtime K's host pid so it can put it in the kernel's cgroups and watch it),
switches to the kernel's own host uid (mapped by the zygote), mounts the
kernel's own view (run dir, bounded /tmp, work dir and /dev; the other
kernels' dirs and /proc hidden), confines itself (no capabilities, rlimits,
seccomp) and becomes the kernel. It is its namespace's init, so killing it
tears down the whole pid namespace. Stdlib only, plus what ``Warm`` imports.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from .confine import confine
from .mounts import MS_NODEV, MS_NOEXEC, MS_NOSUID, mount, mount_kernel_view
from .namespaces import clone_into_namespaces, enter_namespaces, loopback_up, map_child, map_ids
from .warm import Warm


def hello(kid: str) -> None:
    """Tell the runtime our pid (it reads it from SO_PEERCRED) and wait until it has caged us."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect("/sandbox/ctl/sock")
        s.sendall(kid.encode() + b"\n")
        if s.recv(16) != b"go\n":
            os._exit(3)


def spawn_kernel(
    kid: str, config: dict[str, Any], warm: Any, entered: bool, host_uid: int | None, gate: int | None
) -> None:
    """Runs in the zygote's fresh child; never returns.

    ``entered``: the child was cloned straight into its namespaces and is
    already K; otherwise it is C, which enters them and forks K.
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
            map_ids(uid, gid, uid, gid)
        elif not entered:
            if host_uid is not None:
                # C, still in the zygote's namespace (whose CAP_SETUID it holds), becomes the kernel's user.
                os.setresgid(host_uid, host_uid, host_uid)
                os.setresuid(host_uid, host_uid, host_uid)
            enter_namespaces(uid, gid, host_uid or uid, host_uid or gid, net)
            if os.fork() != 0:
                os._exit(0)
            os.setsid()  # K leads a session of its own, as a cloned K does
        # K: pid 1 of the kernel's namespace, capable there until it confines itself.
        if net:
            loopback_up()
        hello(kid)
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
        mount("tmpfs", "/sandbox/ctl", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
        # Now the kernel itself, still pid 1 (see the module's docstring).
        confine(config, warm.seccomp)
        if "numpy.random" in sys.modules:
            sys.modules["numpy.random"].seed()
        warm.run(warm.kernelapp.KERNEL_CONNECTION_FILE)
    except BaseException as exc:
        try:
            import traceback

            where = "".join(traceback.format_tb(exc.__traceback__)[-2:])
            os.write(2, f"kernel {kid} failed to start: {exc!r}\n{where}".encode())
        finally:
            os._exit(4)
    os._exit(0)


def zygote(config: dict[str, Any]) -> None:
    warm = Warm(config.get("preimport", []), config.get("seccomp"))
    # Children are reaped automatically (K, or C which exits right after its fork).
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
                    spawn_kernel(kid, config, warm, True, host_uid, gate[0] if gate else None)
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
            spawn_kernel(kid, config, warm, False, host_uid, None)
