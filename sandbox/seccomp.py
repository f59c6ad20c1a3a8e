"""The kernels' seccomp filter: compiled here with libseccomp, loaded by sandbox/inside/seccomp.py.

The runtime resolves syscall names for its own architecture with libseccomp
(a small ctypes binding: nothing to build, and numbers are never written down
by hand) and exports the filter as classic BPF bytes; sandbox/inside, which must
stay stdlib-only, loads them with ``prctl(PR_SET_SECCOMP)`` in the kernel
process once its namespaces and mounts are in place (the zygote itself needs
clone with namespace flags and mount, so the filter cannot go on bwrap).

Everything not listed is allowed: the list is what a process without
capabilities could still use against the host kernel or to leave its
namespaces. Denied calls fail with EPERM, so Python raises an ordinary
``PermissionError``; ``clone3`` fails with ENOSYS, whose flags live in memory a
filter cannot read, so glibc falls back to ``clone``, whose flags it can.
System calls of any other architecture (i386 ``int 0x80``, x32) kill the
process.
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
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        _check(lib.seccomp_attr_set(ctx, _ATTR_ACT_BADARCH, _ACT_KILL_PROCESS), "seccomp_attr_set")
        # Every system call of the kernel runs the filter; most are allowed.
        lib.seccomp_attr_set(ctx, _ATTR_CTL_OPTIMIZE, 2)  # libseccomp >= 2.5; linear before

        def nr(syscall: str) -> int:
            return int(lib.seccomp_syscall_resolve_name(syscall.encode()))

        def rule(action: int, syscall: str, *cmps: tuple[int, int, int]) -> None:
            number = nr(syscall)
            if number < 0:  # not a system call on this architecture
                return
            args = (_ArgCmp * max(1, len(cmps)))(*(_ArgCmp(a, _CMP_MASKED_EQ, m, v) for a, m, v in cmps))
            _check(lib.seccomp_rule_add_array(ctx, action, number, len(cmps), args), f"rule for {syscall}")

        for syscall in DENIED:
            rule(_errno(errno.EPERM), syscall)
        for flag in NAMESPACE_FLAGS:
            rule(_errno(errno.EPERM), "clone", (0, flag, flag))
        rule(_errno(errno.ENOSYS), "clone3")
        rule(_errno(errno.EAFNOSUPPORT), "socket", (0, 0xFFFFFFFF, _AF_VSOCK))
        for request in (_TIOCSTI, _TIOCLINUX):
            rule(_errno(errno.EPERM), "ioctl", (1, 0xFFFFFFFF, request))
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
        f"{len(bpf) // 8} BPF instructions for {_FLAGS_FIRST[arch]}: mount, namespaces, keyrings, bpf, "
        "perf, io_uring, userfaultfd, ptrace, modules and kexec denied; other architectures killed",
    )


def _check(ret: int, what: str) -> None:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
