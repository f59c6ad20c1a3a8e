"""The kernels' seccomp filter: compiled here with libseccomp, loaded by sandbox/inside/seccomp.py.

The runtime resolves syscall names for its own architecture with libseccomp
(a small ctypes binding: nothing to build, and numbers are never written down
by hand: x86_64 and aarch64 each get their own table from the same names) and
exports the filter as classic BPF bytes; sandbox/inside, which must stay
stdlib-only, loads it with ``prctl(PR_SET_SECCOMP)`` in the kernel process once
its namespaces and mounts are in place (the zygote itself needs clone with
namespace flags and mount, so the filter cannot go on bwrap).

An allow-list: ``ALLOWED`` is what CPython, NumPy, SymPy, pandas, ipykernel
(zmq, tornado), threads and subprocesses use (derived with strace from those
workloads, see the README), plus the ordinary calls of their kind that a
program may use instead (``readv`` beside ``read``...). Every other call,
including any the Linux kernel adds later, answers ENOSYS, which
well-behaved code takes as "not supported here" and falls back from (glibc
does so for ``clone3``, whose flags live in memory a filter cannot read, and
uses ``clone``, whose flags it can). The calls on ``DENIED`` answer EPERM, so
Python raises an ordinary ``PermissionError`` for what is refused on
purpose. System calls of any other architecture (i386 ``int 0x80``, x32)
kill the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
from dataclasses import dataclass

# Namespace flags of clone(2)/unshare(2): NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET.
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)

ALLOWED = (
    # files and descriptors
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "open", "openat", "openat2", "creat", "close", "close_range", "dup", "dup2", "dup3", "lseek",
    "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs", "access", "faccessat", "faccessat2",
    "readlink", "readlinkat", "getdents", "getdents64", "getcwd", "chdir", "fchdir",
    "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2",
    "link", "linkat", "symlink", "symlinkat", "mknod", "mknodat", "chmod", "fchmod", "fchmodat", "fchmodat2",
    "chown", "fchown", "lchown", "fchownat", "umask", "truncate", "ftruncate", "fallocate",
    "fsync", "fdatasync", "sync_file_range", "utime", "utimes", "utimensat", "futimesat",
    "fcntl", "flock", "ioctl", "sendfile", "copy_file_range", "splice", "tee", "fadvise64", "readahead",
    "getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr", "flistxattr",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "pipe", "pipe2", "memfd_create", "eventfd", "eventfd2", "signalfd", "signalfd4",
    "timerfd_create", "timerfd_settime", "timerfd_gettime",
    "select", "pselect6", "poll", "ppoll", "epoll_create", "epoll_create1", "epoll_ctl",
    "epoll_wait", "epoll_pwait", "epoll_pwait2",
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "msync", "mincore",
    "mbind", "get_mempolicy", "set_mempolicy", "membarrier",
    # processes, threads, signals, time
    "clone", "fork", "vfork", "execve", "execveat", "exit", "exit_group", "wait4", "waitid",
    "kill", "tkill", "tgkill", "pidfd_open", "pidfd_send_signal",
    "getpid", "getppid", "gettid", "getpgid", "setpgid", "getpgrp", "getsid", "setsid",
    "getuid", "geteuid", "getgid", "getegid", "getgroups", "getresuid", "getresgid",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid", "setfsgid",
    "capget", "prctl", "arch_prctl", "set_tid_address", "set_robust_list", "get_robust_list", "rseq",
    "futex", "futex_waitv", "futex_wake", "futex_wait", "futex_requeue",
    "sched_yield", "sched_getaffinity", "sched_setaffinity", "sched_getparam", "sched_setparam",
    "sched_getscheduler", "sched_setscheduler", "sched_get_priority_max", "sched_get_priority_min",
    "sched_rr_get_interval", "sched_getattr", "sched_setattr", "getpriority", "setpriority",
    "ioprio_get", "getcpu",
    "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday", "time", "times",
    "getitimer", "setitimer", "alarm", "timer_create", "timer_settime", "timer_gettime",
    "timer_getoverrun", "timer_delete", "pause", "restart_syscall",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend",
    "rt_sigtimedwait", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "sigaltstack",
    "getrlimit", "setrlimit", "prlimit64", "getrusage", "sysinfo", "uname", "getrandom",
    # sockets (socket itself: some families only, below)
    "socketpair", "bind", "listen", "accept", "accept4", "connect", "getsockname", "getpeername",
    "getsockopt", "setsockopt", "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg",
    "shutdown",
    # System V IPC: the kernel's own ipc namespace (POSIX message queues are
    # counted per user outside it: left off)
    "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl",
    "msgget", "msgsnd", "msgrcv", "msgctl",
)  # fmt: skip

DENIED = (
    # file systems and mounts: a new mount could uncover or shadow anything
    "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsmount", "fspick", "fsconfig", "mount_setattr",
    # namespaces (clone is filtered on its flags below)
    "unshare", "setns",
    # kernel keyrings are per host user, not per namespace; inotify instances
    # and watches are counted per user of the zygote's namespace, shared by its kernels
    "keyctl", "add_key", "request_key", "inotify_init", "inotify_init1", "inotify_add_watch",
    # large kernel attack surfaces nobody's cell needs
    "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp", "pidfd_getfd",
    # the host kernel itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "syslog", "acct", "quotactl", "quotactl_fd",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "iopl", "ioperm", "lookup_dcookie", "nfsservctl", "uselib", "vhangup", "fanotify_init",
    # file handles bypass path permissions
    "open_by_handle_at", "name_to_handle_at",
)  # fmt: skip

# Architectures whose clone(2) takes its flags as the first argument (s390 does not).
_FLAGS_FIRST = {
    0xC000003E: "x86_64",
    0xC00000B7: "aarch64",
    0xC00000F3: "riscv64",
    0xC0000015: "ppc64le",
}

_ACT_ALLOW = 0x7FFF0000
# Socket families a kernel may open: unix, IPv4, IPv6 (its own loopback), netlink (getifaddrs).
_FAMILIES = (1, 2, 10, 16)
_ACT_KILL_PROCESS = 0x80000000
_ATTR_ACT_BADARCH = 2
_ATTR_CTL_OPTIMIZE = 8  # 2: a binary tree of syscall numbers instead of a linear list
_CMP_MASKED_EQ = 7
_AF_VSOCK = 40  # not namespaced: it would reach the hypervisor's host from a VM
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C  # type into, or control, the terminal


def _errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


@dataclass(frozen=True)
class Filter:
    """The compiled filter (None where it cannot be built here) and what to say about it."""

    bpf: bytes | None
    detail: str


@functools.cache
def kernel_filter() -> Filter:
    try:
        return _build()
    except OSError as exc:
        return Filter(None, f"not applied: {exc}")


def _build() -> Filter:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return Filter(None, "not applied: libseccomp is not installed (apt-get install libseccomp2)")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    )
    lib.seccomp_export_bpf.argtypes = (ctypes.c_void_p, ctypes.c_int)
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)

    arch = int(lib.seccomp_arch_native())
    if arch not in _FLAGS_FIRST:
        return Filter(None, f"not applied: architecture {arch:#x} is not one whose clone flags this filter knows")
    ctx = lib.seccomp_init(_errno(errno.ENOSYS))
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        _check(lib.seccomp_attr_set(ctx, _ATTR_ACT_BADARCH, _ACT_KILL_PROCESS), "seccomp_attr_set")
        # Every system call of the kernel runs the filter: a binary tree, not a list of ~250.
        lib.seccomp_attr_set(ctx, _ATTR_CTL_OPTIMIZE, 2)  # libseccomp >= 2.5; linear before

        def nr(syscall: str) -> int:
            return int(lib.seccomp_syscall_resolve_name(syscall.encode()))

        def rule(action: int, syscall: str, *cmps: tuple[int, int, int]) -> None:
            number = nr(syscall)
            if number < 0:  # not a system call on this architecture
                return
            args = (_ArgCmp * max(1, len(cmps)))(*(_ArgCmp(a, _CMP_MASKED_EQ, m, v) for a, m, v in cmps))
            _check(lib.seccomp_rule_add_array(ctx, action, number, len(cmps), args), f"rule for {syscall}")

        for syscall in ALLOWED:
            if syscall not in ("clone", "ioctl"):
                rule(_ACT_ALLOW, syscall)
        for syscall in DENIED:
            rule(_errno(errno.EPERM), syscall)
        all_namespaces = functools.reduce(lambda a, b: a | b, NAMESPACE_FLAGS)
        rule(_ACT_ALLOW, "clone", (0, all_namespaces, 0))
        for flag in NAMESPACE_FLAGS:
            rule(_errno(errno.EPERM), "clone", (0, flag, flag))
        # clone3 is off the list: ENOSYS, like any call not on it.
        for family in _FAMILIES:
            rule(_ACT_ALLOW, "socket", (0, 0xFFFFFFFF, family))
        rule(_errno(errno.EAFNOSUPPORT), "socket", (0, 0xFFFFFFFF, _AF_VSOCK))
        for request in (_TIOCSTI, _TIOCLINUX):
            rule(_errno(errno.EPERM), "ioctl", (1, 0xFFFFFFFF, request))
        for cmp in _all_but(_TIOCSTI, _TIOCLINUX):
            rule(_ACT_ALLOW, "ioctl", (1, *cmp))
        fd = os.memfd_create("tora-seccomp", os.MFD_CLOEXEC)
        try:
            _check(lib.seccomp_export_bpf(ctx, fd), "seccomp_export_bpf")
            size = os.lseek(fd, 0, os.SEEK_END)
            bpf = os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    if not bpf or len(bpf) % 8:
        raise OSError(errno.EINVAL, "libseccomp exported an empty or malformed filter")
    return Filter(
        bpf,
        f"{len(bpf) // 8} BPF instructions for {_FLAGS_FIRST[arch]}: an allow-list of {len(ALLOWED)} calls, "
        "any other ENOSYS; mount, namespaces, keyrings, bpf, perf, io_uring, ptrace, modules, kexec EPERM; "
        "other architectures killed",
    )


def _all_but(a: int, b: int) -> list[tuple[int, int]]:
    """(mask, value) pairs whose matches, together, are every 32-bit number but ``a`` and ``b``.

    A filter can compare an argument only for (masked) equality, and ioctl's
    request is the low 32 bits of its argument (a test of the whole 64 bits
    for inequality would let ``a | 1 << 32`` through): every number that
    differs from both in one of the bits where they agree, plus the few that
    agree there and are neither.
    """
    same = ~(a ^ b) & 0xFFFFFFFF
    prefix = a & same
    out = [(1 << bit, ~prefix & (1 << bit)) for bit in range(32) if same >> bit & 1]
    differ = [1 << bit for bit in range(32) if not same >> bit & 1]
    for n in range(1 << len(differ)):
        value = prefix | sum(d for i, d in enumerate(differ) if n >> i & 1)
        if value not in (a, b):
            out.append((0xFFFFFFFF, value))
    return out


def _check(ret: int, what: str) -> None:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
