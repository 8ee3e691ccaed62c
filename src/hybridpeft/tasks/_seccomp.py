"""A seccomp filter for the sandbox, compiled by the system's libseccomp.

bubblewrap loads a filter given as a compiled classic-BPF program (``--seccomp
FD``). We build it with the system library ``libseccomp.so.2`` through
``ctypes`` — the same library flatpak uses for this — so the syscall numbers
and the architecture check are the library's, not a table of ours. The filter
allows everything except the calls below, which fail with ``EPERM``; calls from
another architecture's ABI (e.g. 32-bit ``int 0x80`` on x86-64) kill the process
(libseccomp's default for a foreign architecture).

Denied, and why (a HumanEval program needs none of them):

* sockets (``socket``, ``socketpair``): no network and no AF_UNIX connections,
  even where a namespace would leave a path open;
* namespaces and mounts (``unshare``, ``setns``, ``mount``, ``umount2``,
  ``pivot_root``, ``chroot``, the new mount API): a nested namespace could
  mount an unbounded tmpfs or rearrange what the sandbox sees;
* other processes' memory (``ptrace``, ``process_vm_readv/writev``,
  ``pidfd_getfd``);
* large kernel attack surface rarely needed by user code (``bpf``,
  ``perf_event_open``, ``userfaultfd``, ``io_uring_*``, ``keyctl``,
  ``add_key``, ``request_key``, ``open_by_handle_at``, …) and
  administration (modules, ``kexec``, ``reboot``, ``swapon``, ``acct``,
  ``quotactl``, ``syslog``).

Unknown names (an older kernel or architecture) are skipped. Without
libseccomp the sandbox still runs, and says that this layer is missing.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os

DENIED = (
    "socket", "socketpair",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "open_by_handle_at", "name_to_handle_at", "lookup_dcookie",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon",
    "swapoff", "acct", "quotactl", "syslog", "vhangup",
)
SCMP_ACT_ALLOW = 0x7FFF0000


def scmp_act_errno(err: int) -> int:
    """libseccomp's ``SCMP_ACT_ERRNO(err)``: fail the call with ``err``."""
    return 0x00050000 | (err & 0xFFFF)


@functools.cache
def compiled_filter() -> tuple[bytes | None, str]:
    """(the BPF program, a description) or (None, why there is none); built once per process."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None, "not used: libseccomp.so.2 not found (Debian package libseccomp2)"
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        return None, "not used: seccomp_init failed"
    fd = os.memfd_create("hybridpeft-seccomp")
    try:
        denied = []
        for name in DENIED:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                continue  # not a syscall on this architecture or libseccomp version
            if lib.seccomp_rule_add_array(ctx, scmp_act_errno(errno.EPERM), number, 0, None) != 0:
                return None, f"not used: libseccomp rejected a rule for {name}"
            denied.append(name)
        if lib.seccomp_export_bpf(ctx, fd) != 0:
            return None, "not used: seccomp_export_bpf failed"
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks), f"{len(denied)} syscalls denied (sockets, namespaces, mounts, ptrace, bpf, io_uring, keyrings, …)"
    finally:
        os.close(fd)
        lib.seccomp_release(ctx)


def filter_fd() -> int | None:
    """A fresh memfd holding the compiled filter at offset 0 (bwrap reads and closes it), or None."""
    program, _ = compiled_filter()
    if program is None:
        return None
    fd = os.memfd_create("hybridpeft-seccomp")
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
