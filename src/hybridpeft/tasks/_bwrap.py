"""The bubblewrap (``bwrap``) command line of the sandbox, one layer per group of options.

The program sees a new root: an empty tmpfs, remounted read-only, holding

* ``/usr`` (and ``/bin``, ``/lib``… as the host has them: symlinks into
  ``/usr`` on merged-/usr systems, read-only binds otherwise) and
  ``/etc/ld.so.cache``, read-only;
* the running Python's installation and environment (``sys.prefix``,
  ``sys.base_prefix``, the directory of the real interpreter binary), read-only,
  at the same paths — nothing else of the host's files, so no home directory,
  no ``/run`` (no host AF_UNIX sockets), no ``/work``;
* ``/sandbox/runner.py`` and ``/sandbox/program.py``, read-only copies (so
  neither the source tree nor the user's umask matters);
* a fresh ``/proc`` of its own pid namespace, a minimal ``/dev`` (read-only:
  in a user namespace its tmpfs would belong to the program, uncapped);
* ``/tmp`` (its working directory, ``HOME`` and ``TMPDIR``) and ``/dev/shm``:
  private tmpfs mounts capped in size, the only writable places, gone when the
  namespace ends.

Namespaces: mount, pid, network (only a loopback that is down), ipc, uts and
cgroup. An unprivileged caller also gets a user namespace in which the program
is uid 65534 and cannot create further user namespaces (``--disable-userns``).
A root caller gets no user namespace — inside one, uid 65534 would still be root
on the host, exempt from RLIMIT_NPROC — and the runner instead drops to the host's
``nobody`` (65534) itself, using the only two capabilities it keeps
(CAP_SETUID, CAP_SETGID); after the drop it has none. bwrap always sets
``no_new_privs``, starts a new session (no terminal to inject into, no process
group shared with the caller) and kills the sandbox when its parent dies.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

NOBODY = 65534
SANDBOX_DIR = "/sandbox"
WORKDIR = "/tmp"
SHM_BYTES = 1 << 20
SYSTEM_TOP = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d")
ENV = {"HOME": WORKDIR, "TMPDIR": WORKDIR, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def python_roots() -> list[str]:
    """Directories the interpreter needs, outermost only: its environment, its installation
    and the directory tree of the real binary behind ``sys.executable``."""
    real_binary = os.path.realpath(sys.executable)
    candidates = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.dirname(real_binary))}
    roots: list[str] = []
    for path in sorted({os.path.abspath(p) for p in candidates}, key=len):
        if path == "/" or any(path == r or path.startswith(r.rstrip("/") + "/") for r in ["/usr", *roots]):
            continue  # covered by /usr or by an outer root already
        roots.append(path)
    return roots


def _system_layer() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in SYSTEM_TOP:
        host = Path("/", name)
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            args += ["--ro-bind", str(host), str(host)]
    for path in SYSTEM_FILES:
        args += ["--ro-bind-try", path, path]
    return args


def _python_layer() -> list[str]:
    """Read-only binds of the Python roots, at their own paths.

    bwrap would create missing parent directories with the host's modes (e.g.
    ``/root`` as 0700, which the unprivileged program could not traverse), so
    each parent is created first as 0755.
    """
    args, made = [], set()
    for root in python_roots():
        parent = Path(root).parent
        for ancestor in reversed([parent, *parent.parents]):
            if str(ancestor) != "/" and str(ancestor) not in made:
                args += ["--perms", "0755", "--dir", str(ancestor)]
                made.add(str(ancestor))
        args += ["--ro-bind", os.path.realpath(root), root]
    return args


def command(bwrap: str, *, as_root: bool, runner_fd: int, program_fd: int, seccomp_fd: int | None,
            disk_bytes: int, status_fd: int, disable_userns: bool = True) -> list[str]:
    """The bwrap arguments up to (not including) the interpreter command inside.

    ``disable_userns`` needs bwrap >= 0.8; without it, seccomp's ban on
    ``unshare``/``setns`` and RLIMIT_NPROC = 0 (no ``clone``) keep nested
    namespaces out.
    """
    if as_root:
        identity = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                    "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        identity = ["--unshare-all", "--unshare-user", *(["--disable-userns"] if disable_userns else []),
                    "--uid", str(NOBODY), "--gid", str(NOBODY), "--cap-drop", "ALL"]
    args = [bwrap, *identity, "--die-with-parent", "--new-session", "--hostname", "sandbox",
            "--json-status-fd", str(status_fd)]
    args += _system_layer() + _python_layer()
    args += ["--perms", "0755", "--dir", SANDBOX_DIR,
             "--perms", "0444", "--ro-bind-data", str(runner_fd), f"{SANDBOX_DIR}/runner.py",
             "--perms", "0444", "--ro-bind-data", str(program_fd), f"{SANDBOX_DIR}/program.py"]
    args += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(disk_bytes), "--tmpfs", WORKDIR,
             "--perms", "1777", "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm",
             "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", WORKDIR, "--clearenv"]
    for key, value in ENV.items():
        args += ["--setenv", key, value]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args
