"""Running untrusted generated code (HumanEval completions) without trusting it.

The protection comes from the operating system. Each program runs in its own
bubblewrap (``bwrap``) sandbox (see ``_bwrap`` for the exact layers):

* **namespaces**: mount, pid, network, ipc, uts, cgroup — and, for an
  unprivileged caller, a user namespace with the program as uid 65534;
* **files**: a read-only root holding only ``/usr`` and the Python
  installation; the working directory ``/tmp`` (also ``HOME`` and ``TMPDIR``)
  and ``/dev/shm`` are private tmpfs mounts capped at ``disk_mb`` and 1 MiB,
  discarded with the namespace — nothing the program writes reaches the host;
* **processes**: its own pid namespace and session, so no process outside
  can be seen, signalled or traced, and ``/proc`` shows only the sandbox; a root
  caller's program runs as the host's ``nobody`` with no capabilities;
* **network**: none (a loopback that is down; host AF_UNIX sockets are not
  in its file system);
* **seccomp** (where libseccomp is installed, see ``_seccomp``): sockets,
  namespaces, mounts, ptrace, bpf, io_uring and other calls fail with EPERM;
* **resource limits** set by the child before the program starts: address space
  (RLIMIT_AS), CPU seconds, file size (also bounds stdout/stderr), open files,
  no core dumps, and RLIMIT_NPROC = 0 (no new processes or threads);
* **in-process guards** (``_sandbox_runner``): stubs for destructive functions
  — a last layer that the program can undo and nothing relies on.

``isolation()`` probes once per process which of this is available and says
which layers are active. Where no OS sandbox can be set up (no ``bwrap``, or a
kernel without unprivileged user namespaces for a non-root caller),
``run_program`` refuses with ``SandboxUnavailable`` unless the caller opted in
with ``SandboxLimits(allow_unsafe_exec=True)`` (CLI ``--allow-unsafe-exec``,
environment ``HYBRIDPEFT_ALLOW_UNSAFE_EXEC=1``); then it warns and runs the
program on the host with the resource limits, the uid drop when root and the
in-process guards only.

The parent enforces a wall-clock timeout and kills the sandbox when it expires;
when the program's process ends, the kernel ends everything else in its pid
namespace. A program passes only if it runs to its end (exit status 0); an
exception, ``sys.exit``, a signal, a limit or the timeout all count as failure,
never as an error of the caller. The sandbox protects the machine, not the
metric: code that undoes the in-process guards can exit with status 0 early.
"""
from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

from tqdm.auto import tqdm

from ..checks import check
from . import _bwrap, _seccomp

RUNNER = Path(__file__).with_name("_sandbox_runner.py")
NOBODY = _bwrap.NOBODY
UNSAFE_ENV = "HYBRIDPEFT_ALLOW_UNSAFE_EXEC"
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap)"
MIN_BWRAP = (0, 7)


class SandboxUnavailable(RuntimeError):
    """No OS isolation for generated code, and the caller did not opt in to running it without."""


@dataclass(frozen=True)
class SandboxLimits:
    """Args:
        timeout_s: wall-clock seconds before the sandbox is killed.
        cpu_s: CPU seconds (RLIMIT_CPU).
        memory_mb: address space (RLIMIT_AS); the interpreter itself needs ~50 MB.
        file_size_mb: the largest file the program may write, stdout included (RLIMIT_FSIZE).
        disk_mb: size of the private tmpfs that is the program's working directory
            (its memory comes out of the host's RAM while the program runs).
        drop_privileges: unsafe mode only: when running as root, run the program
            as ``nobody`` (the OS sandbox always does).
        output_chars: how much of stdout/stderr to keep in the result.
        allow_unsafe_exec: where no OS sandbox is available, run generated code
            anyway, with resource limits and in-process guards only (a warning is
            issued). Also switched on by ``HYBRIDPEFT_ALLOW_UNSAFE_EXEC=1``.
    """

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    file_size_mb: int = 16
    disk_mb: int = 64
    drop_privileges: bool = True
    output_chars: int = 2000
    allow_unsafe_exec: bool = False

    def __post_init__(self) -> None:
        check(self.timeout_s > 0, "timeout_s", self.timeout_s, "a positive number of seconds")
        check(isinstance(self.cpu_s, int) and self.cpu_s > 0, "cpu_s", self.cpu_s, "a positive integer")
        check(isinstance(self.memory_mb, int) and self.memory_mb >= 64, "memory_mb", self.memory_mb, "an integer >= 64")
        check(isinstance(self.file_size_mb, int) and self.file_size_mb > 0, "file_size_mb", self.file_size_mb, "a positive integer")
        check(isinstance(self.disk_mb, int) and self.disk_mb > 0, "disk_mb", self.disk_mb, "a positive integer")

    @property
    def unsafe_allowed(self) -> bool:
        return self.allow_unsafe_exec or os.environ.get(UNSAFE_ENV, "") == "1"


@dataclass(frozen=True)
class ExecutionResult:
    """``status``: ``passed``, ``failed`` (nonzero exit, e.g. an exception),
    ``timeout`` (wall clock or CPU limit) or ``killed`` (another signal).
    ``returncode`` is the exit status, or minus the signal number."""

    passed: bool
    status: str
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""


@dataclass(frozen=True)
class Isolation:
    """What protects the host: ``kind`` is ``"bwrap"`` or ``"none"``; ``reason`` says why none."""

    kind: str
    layers: tuple[str, ...] = ()
    reason: str = ""
    bwrap: str | None = None
    as_root: bool = False
    bwrap_version: tuple[int, ...] = ()

    def describe(self) -> str:
        if self.kind == "none":
            return f"no OS sandbox ({self.reason})"
        return f"bubblewrap sandbox: {'; '.join(self.layers)}"


def _layers(as_root: bool, version: tuple[int, ...]) -> tuple[str, ...]:
    _, seccomp = _seccomp.compiled_filter()
    nested = "may not create user namespaces" if version >= (0, 8) else "nested user namespaces left to seccomp"
    identity = ("no user namespace (caller is root); program runs as host uid 65534 with no capabilities" if as_root
                else f"user namespace: program is uid 65534, {nested}")
    return (
        identity,
        "mount namespace: read-only root with only /usr and the Python installation",
        "private size-capped tmpfs for /tmp (work dir, HOME) and /dev/shm",
        "pid namespace and new session: nothing outside can be seen or signalled",
        "network namespace: no network",
        "ipc, uts, cgroup namespaces",
        "no_new_privs",
        f"seccomp: {seccomp}",
        "rlimits: AS, CPU, FSIZE, NOFILE, CORE=0, NPROC=0",
        "in-process guards (last layer)",
    )


def _bwrap_binary() -> str | None:
    found = shutil.which("bwrap")
    if found:
        return found
    return next((p for p in ("/usr/bin/bwrap", "/bin/bwrap", "/usr/local/bin/bwrap") if os.access(p, os.X_OK)), None)


def _bwrap_version(bwrap: str) -> tuple[int, ...]:
    """``bwrap --version`` ("bubblewrap 0.8.0") as a tuple; () when it cannot be read."""
    try:
        text = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30).stdout
        return tuple(int(x) for x in text.split()[-1].split("."))
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return ()


PROBE = "import os\nassert os.getuid() == 65534, os.getuid()\nprint('sandbox-ok')\n"


def detect_isolation() -> Isolation:
    """Probe whether the OS sandbox works here by running a tiny program in it (~0.1 s)."""
    if not sys.platform.startswith("linux"):
        return Isolation("none", reason=f"the OS sandbox needs Linux, not {sys.platform}")
    bwrap = _bwrap_binary()
    if bwrap is None:
        return Isolation("none", reason="bwrap is not installed")
    version = _bwrap_version(bwrap)
    if version < MIN_BWRAP:  # --size (a capped tmpfs) arrived in 0.7.0
        found = ".".join(map(str, version)) or "of unknown version"
        return Isolation("none", reason=f"bwrap {found} is too old: need >= 0.7 for size-capped tmpfs mounts")
    as_root = os.geteuid() == 0
    candidate = Isolation("bwrap", _layers(as_root, version), bwrap=bwrap, as_root=as_root, bwrap_version=version)
    try:
        result = _run_isolated(PROBE, SandboxLimits(timeout_s=30.0), candidate)
    except OSError as err:
        return Isolation("none", reason=f"bwrap cannot set up a sandbox here: {err}")
    if not result.passed or "sandbox-ok" not in result.stdout:
        detail = (result.stderr.strip().splitlines() or [result.status])[-1]
        return Isolation("none", reason=f"the sandbox probe failed: {detail}")
    return candidate


_isolation_lock = threading.Lock()


@functools.cache
def _cached_isolation() -> Isolation:
    return detect_isolation()


def isolation() -> Isolation:
    """The isolation this process uses, probed once (``_cached_isolation.cache_clear()`` re-probes)."""
    with _isolation_lock:
        return _cached_isolation()


def refusal_message(iso: Isolation) -> str:
    return (f"refusing to run generated code: no OS sandbox is available ({iso.reason}); {INSTALL_HINT} "
            f"and, as a non-root user, allow unprivileged user namespaces — or accept the risk with "
            f"--allow-unsafe-exec (allow_unsafe_exec=True, or {UNSAFE_ENV}=1)")


_warned_unsafe = False


def ensure_available(limits: SandboxLimits = SandboxLimits()) -> Isolation:
    """The isolation to use; raises ``SandboxUnavailable`` where there is none and no opt-in, warns with one.

    Callers that produce programs expensively (generation) call this first to fail before the work.
    """
    global _warned_unsafe
    iso = isolation()
    if iso.kind == "none":
        if not limits.unsafe_allowed:
            raise SandboxUnavailable(refusal_message(iso))
        if not _warned_unsafe:
            _warned_unsafe = True
            warnings.warn(f"running generated code WITHOUT an OS sandbox ({iso.reason}): only resource limits and "
                          f"in-process guards protect this machine; {INSTALL_HINT} to isolate it", RuntimeWarning, stacklevel=3)
    return iso


def _tail(f: IO[bytes], chars: int) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 4 * chars))
    return f.read().decode("utf-8", "replace")[-chars:]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _status(rc: int, timed_out: bool) -> tuple[str, int]:
    """(status, returncode with signals as negative numbers) for a process or bwrap's ``128 + signal``."""
    code = -(rc - 128) if rc > 128 else rc
    if timed_out or code in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout", code
    if code == 0:
        return "passed", code
    return ("killed" if code < 0 else "failed"), code


def _exited_within(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Whether the process exits within ``timeout_s``; woken at the exit through a pidfd where the
    kernel has them (``Popen.wait(timeout)`` polls with sleeps of up to 50 ms, a third of a
    program's whole run here)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is None:
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()  # not select(): a busy process may hold fds numbered above FD_SETSIZE
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout_s * 1000))
    finally:
        os.close(pidfd)


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for the process; on timeout kill its process group. Returns whether it timed out."""
    try:
        timed_out = not _exited_within(proc, timeout_s)
        if timed_out:
            _kill_group(proc.pid)
        proc.wait()
        return timed_out
    finally:
        _kill_group(proc.pid)


def _runner_args(workdir: str, program: str, limits: SandboxLimits, uid: int, unsafe: bool) -> list[str]:
    return [workdir, program, str(limits.memory_mb * 2**20), str(limits.cpu_s), str(limits.file_size_mb * 2**20),
            str(uid), str(int(unsafe))]


@functools.cache
def _runner_source() -> bytes:
    return RUNNER.read_bytes()


def _read_events(fd: int) -> list[dict]:
    """bwrap's ``--json-status-fd`` stream: one JSON object per line (``child-pid``, then ``exit-code``)."""
    with os.fdopen(fd, "rb") as f:
        lines = f.read().decode("utf-8", "replace").splitlines()
    return [json.loads(line) for line in lines if line.strip().startswith("{")]


def _run_isolated(source: str, limits: SandboxLimits, iso: Isolation) -> ExecutionResult:
    status_read, status_write = os.pipe()
    child_fds = [status_write, _memfd("hybridpeft-program", source.encode("utf-8")), _memfd("hybridpeft-runner", _runner_source())]
    seccomp_fd = _seccomp.filter_fd()
    if seccomp_fd is not None:
        child_fds.append(seccomp_fd)
    uid = NOBODY if iso.as_root else -1  # as root, the runner drops to nobody itself (see _bwrap)
    command = _bwrap.command(iso.bwrap, as_root=iso.as_root, runner_fd=child_fds[2], program_fd=child_fds[1],
                             seccomp_fd=seccomp_fd, disk_bytes=limits.disk_mb * 2**20, status_fd=status_write,
                             disable_userns=iso.bwrap_version >= (0, 8))
    command += [os.path.abspath(sys.executable), "-I", "-B", f"{_bwrap.SANDBOX_DIR}/runner.py",
                *_runner_args(_bwrap.WORKDIR, f"{_bwrap.SANDBOX_DIR}/program.py", limits, uid, unsafe=False)]
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=child_fds,
                                    env={"PATH": "/usr/bin:/bin"}, start_new_session=True, close_fds=True)
        except BaseException:
            os.close(status_read)
            raise
        finally:
            for fd in child_fds:  # bwrap holds its own copies now
                os.close(fd)
        timed_out = _wait(proc, limits.timeout_s)
        events = _read_events(status_read)
        if not timed_out and not any("child-pid" in e for e in events):
            raise OSError(f"bwrap did not start the program: {_tail(err, 500).strip() or f'exit status {proc.returncode}'}")
        status, code = _status(proc.returncode, timed_out)
        return ExecutionResult(passed=status == "passed", status=status, returncode=code,
                               seconds=time.monotonic() - start, stdout=_tail(out, limits.output_chars),
                               stderr=_tail(err, limits.output_chars))


def _clean_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _run_unsafe(source: str, limits: SandboxLimits) -> ExecutionResult:
    """The opted-in fallback without OS isolation: a new session in a temporary directory,
    resource limits, the uid drop when root and the in-process guards."""
    workdir = tempfile.mkdtemp(prefix="hybridpeft-sandbox-")
    uid = NOBODY if limits.drop_privileges and os.geteuid() == 0 else -1
    start = time.monotonic()
    try:
        Path(workdir, "program.py").write_text(source, encoding="utf-8")
        if uid >= 0:
            os.chown(workdir, uid, uid)  # the program's own scratch space
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(RUNNER), *_runner_args(workdir, "program.py", limits, uid, unsafe=True)],
                cwd=workdir, env=_clean_env(workdir), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True,
            )
            timed_out = _wait(proc, limits.timeout_s)
            status, code = _status(proc.returncode, timed_out)
            return ExecutionResult(passed=status == "passed", status=status, returncode=code,
                                   seconds=time.monotonic() - start, stdout=_tail(out, limits.output_chars),
                                   stderr=_tail(err, limits.output_chars))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run one Python program in the sandbox; see the module docstring.

    Raises:
        SandboxUnavailable: no OS sandbox here and ``limits`` does not allow unsafe execution.
        OSError: the sandbox itself could not be set up (no temp file, bwrap failed to start).
    """
    iso = ensure_available(limits)
    if iso.kind == "none":
        return _run_unsafe(source, limits)
    return _run_isolated(source, limits, iso)


def run_programs(
    sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None, progress: bool = False,
) -> list[ExecutionResult]:
    """``run_program`` over many programs, ``workers`` at a time (default: CPU count, at most 8), in input order.

    Refuses (``SandboxUnavailable``) before running any program where ``run_program`` would.
    """
    iso = ensure_available(limits)
    if progress:
        unsafe = "; running generated code UNSAFELY with resource limits only (opted in)" if iso.kind == "none" else ""
        tqdm.write(f"[sandbox] {iso.describe()}{unsafe}", file=sys.stderr)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(lambda s: run_program(s, limits), sources), total=len(sources), desc="execute", disable=not progress))
