"""Child side of the sandbox: confine this process, then run the program.

Started by ``sandbox.run_program`` as
``python -I _sandbox_runner.py WORKDIR PROGRAM MEMORY CPU FSIZE UID UNSAFE``
with a stripped environment, stdin closed and stdout/stderr going to files —
inside bubblewrap's namespaces normally (see ``_bwrap``), or, only when the
user opted in to unsafe execution, directly on the host in a new session.
Standard library only; it must not import the package.

Order matters: everything that needs privileges or file access (reading the
program, pre-importing its standard-library modules; in the unsafe mode also
leaving the network namespace) happens first; then resource limits, then
dropping to an unprivileged uid (``UID`` >= 0: the caller is root), then
disabling destructive functions, and only then the untrusted code runs.
Exit status 0 means the program ran to its end; anything else is a failure.

The in-process guards are a last layer that the program can undo (for instance
by re-importing a module); nothing relies on them. The kernel-enforced parts
here are the resource limits and the uid drop.
"""
import ast
import builtins
import importlib
import io
import os
import posix
import resource
import shutil
import sys
import traceback

# Imported before the uid drop in the unsafe mode, so that programs can use them
# even when the interpreter's files are unreadable to the unprivileged user.
PRELOAD = (
    "typing", "math", "cmath", "re", "string", "collections", "collections.abc", "itertools", "functools",
    "operator", "heapq", "bisect", "hashlib", "fractions", "decimal", "statistics", "random", "copy",
    "datetime", "json", "array", "numbers", "textwrap", "unicodedata", "dataclasses", "enum",
    "encodings.ascii", "encodings.latin_1", "encodings.utf_16", "encodings.utf_32", "linecache", "tokenize",
)
# Standard-library modules the program may not use at all.
BLOCKED_MODULES = (
    "ctypes", "_ctypes", "socket", "_socket", "ssl", "_ssl", "subprocess", "_posixsubprocess", "multiprocessing",
    "_multiprocessing", "pty", "resource", "webbrowser", "antigravity", "tkinter", "turtle", "idlelib", "ensurepip",
    "venv", "pydoc",
)
# Destructive or escaping functions replaced by a stub that raises PermissionError.
# (os.register_at_fork stays: ``random`` calls it on import, and RLIMIT_NPROC = 0 forbids forks anyway.)
BLOCKED_OS = (
    "system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "setsid", "setpgid", "setpgrp", "setuid",
    "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "putenv",
    "unsetenv", "removedirs", "renames", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "fchdir",
    "link", "symlink", "mkfifo", "mknod",
    "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve",
    "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp",
    "_exit", "plock", "sched_setaffinity", "setpriority", "nice",
)
BLOCKED_SHUTIL = ("rmtree", "move", "chown", "disk_usage")
# Functions allowed only on paths inside the sandbox directory (tempfile and
# friends need them there), with the number of leading path arguments.
CONFINED_OS = {"remove": 1, "unlink": 1, "rmdir": 1, "rename": 2, "replace": 2, "truncate": 1, "chmod": 1}

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
MAX_OPEN_FILES = 256


def _blocked(name):
    def stub(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return stub


def leave_network():
    """Best effort: a fresh network namespace has no interfaces but a down loopback."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
        libc.unshare(flags)
    except Exception:
        pass  # the module block below still keeps `socket` out of reach
    for name in ("ctypes", "_ctypes"):
        sys.modules.pop(name, None)


def preload(source, common):
    """Import the program's standard-library modules (and, with ``common``, the PRELOAD list)."""
    names = list(PRELOAD) if common else []
    try:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.append(node.module)
    except (SyntaxError, ValueError):
        pass  # compile() reports it when the program runs
    for name in names:
        top = name.split(".")[0]
        if top in sys.stdlib_module_names and top not in BLOCKED_MODULES:
            try:
                importlib.import_module(name)
            except Exception:
                pass


def limit(resource_id, soft, hard=None):
    """Lower a limit; never above the current hard limit (only root could raise it)."""
    hard = soft if hard is None else hard
    current = resource.getrlimit(resource_id)[1]
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(resource_id, (soft, hard))


def confine(memory, cpu, fsize, uid):
    limit(resource.RLIMIT_AS, memory)
    limit(resource.RLIMIT_NOFILE, MAX_OPEN_FILES)
    limit(resource.RLIMIT_CPU, max(1, cpu), max(1, cpu) + 1)  # SIGXCPU, then SIGKILL a second later
    limit(resource.RLIMIT_FSIZE, fsize)
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_NPROC, 0)  # no fork/clone: every user already has >= 1 process
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise RuntimeError("could not drop privileges")


def confine_paths(workdir):
    """Refuse writes, deletions and renames outside ``workdir``.

    Open file descriptors pass ``open``; ``dir_fd`` forms of the path functions
    are refused, since their target cannot be checked by name.
    """
    real_open, real_os_open = builtins.open, os.open
    root = os.path.realpath(workdir)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path):
        if isinstance(path, int):
            return False
        real = os.path.realpath(os.fspath(path))
        return real == root or real.startswith(root + os.sep)

    def refuse(what, path):
        raise PermissionError(f"{what} outside the sandbox directory is disabled: {path!r}")

    def open_(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and set(str(mode)) & set("wax+") and not inside(file):
            refuse("writing", file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & write_flags and (kwargs.get("dir_fd") is not None or not inside(path)):
            refuse("writing", path)
        return real_os_open(path, flags, *args, **kwargs)

    def confined(name, func, n_paths):
        def wrapper(*args, **kwargs):
            if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                refuse(f"os.{name} with dir_fd", args[:n_paths])
            for path in args[:n_paths]:
                if not inside(path):
                    refuse(f"os.{name}", path)
            return func(*args, **kwargs)
        return wrapper

    real = {name: getattr(posix, name) for name in CONFINED_OS}
    builtins.open = io.open = open_
    for module in (os, posix):
        module.open = os_open
        for name, n_paths in CONFINED_OS.items():
            setattr(module, name, confined(name, real[name], n_paths))


def guard(workdir):
    """Defence in depth after the kernel limits: stub out what deletes, spawns or escapes."""
    for module in (os, posix):
        for name in BLOCKED_OS:
            if hasattr(module, name):
                setattr(module, name, _blocked(f"os.{name}"))
    for name in BLOCKED_SHUTIL:
        setattr(shutil, name, _blocked(f"shutil.{name}"))
    for name in BLOCKED_MODULES:
        sys.modules[name] = None  # `import name` now raises ImportError
    confine_paths(workdir)


def main():
    workdir, program = sys.argv[1], sys.argv[2]
    memory, cpu, fsize, uid, unsafe = (int(a) for a in sys.argv[3:8])
    os.chdir(workdir)
    with open(program, encoding="utf-8") as f:
        source = f.read()
    if unsafe:  # no OS sandbox around us: do what little a process can do for itself
        leave_network()
    # Before the guards stub functions that a module might call on import; in the unsafe mode also the
    # common modules, whose files the uid drop may make unreadable (~45 ms).
    preload(source, common=bool(unsafe))
    confine(memory, cpu, fsize, uid)
    exit_now, flush = os._exit, sys.stdout.flush
    guard(workdir)
    try:
        code = compile(source, "program.py", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
        flush()
    except BaseException:  # SystemExit too: leaving early is not passing
        try:
            try:
                flush()  # what the program printed before failing helps to see why
            except BaseException:
                pass
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            exit_now(1)
    exit_now(0)


if __name__ == "__main__":
    main()
