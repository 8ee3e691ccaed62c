"""Running untrusted generated code (HumanEval completions) without trusting it.

Each program runs in its own process: a fresh ``python -I`` (isolated: no
``PYTHON*`` variables, no user site, script directory not on ``sys.path``)
started in a new session, inside a new temporary directory, with a stripped
environment (``HOME`` and ``TMPDIR`` point at that directory), stdin closed and
stdout/stderr going to files. The child (``_sandbox_runner.py``) then

1. leaves the network namespace where the kernel allows (best effort),
2. sets ``resource`` limits: address space (RLIMIT_AS), CPU seconds
   (RLIMIT_CPU), written file size (RLIMIT_FSIZE), no core dumps and no new
   processes (RLIMIT_NPROC = 0),
3. when started as root, drops to the unprivileged ``nobody`` uid, so files
   outside its directory are out of its reach,
4. replaces destructive or escaping functions (``os.system``, ``os.fork``,
   ``os.remove``, ``shutil.rmtree``, ``subprocess``, ``socket``, ``ctypes`` …)
   with stubs that raise, and refuses to open files for writing outside its
   directory — a second layer, not the main one,

and only then executes the program. The parent enforces a wall-clock timeout
and kills the whole process group when it expires and after every run. A
program passes only if it runs to its end (exit status 0); an exception,
``sys.exit``, a signal, a limit or the timeout all count as failure, never as an
error of the caller.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from ..checks import check

RUNNER = Path(__file__).with_name("_sandbox_runner.py")
NOBODY = 65534


@dataclass(frozen=True)
class SandboxLimits:
    """Args:
        timeout_s: wall-clock seconds before the process group is killed.
        cpu_s: CPU seconds (RLIMIT_CPU).
        memory_mb: address space (RLIMIT_AS); the interpreter itself needs ~50 MB.
        file_size_mb: the largest file the program may write, stdout included (RLIMIT_FSIZE).
        drop_privileges: when running as root, run the program as ``nobody``.
        output_chars: how much of stdout/stderr to keep in the result.
    """

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    file_size_mb: int = 16
    drop_privileges: bool = True
    output_chars: int = 2000

    def __post_init__(self) -> None:
        check(self.timeout_s > 0, "timeout_s", self.timeout_s, "a positive number of seconds")
        check(isinstance(self.cpu_s, int) and self.cpu_s > 0, "cpu_s", self.cpu_s, "a positive integer")
        check(isinstance(self.memory_mb, int) and self.memory_mb >= 64, "memory_mb", self.memory_mb, "an integer >= 64")
        check(isinstance(self.file_size_mb, int) and self.file_size_mb > 0, "file_size_mb", self.file_size_mb, "a positive integer")


@dataclass(frozen=True)
class ExecutionResult:
    """``status``: ``passed``, ``failed`` (nonzero exit, e.g. an exception),
    ``timeout`` (wall clock or CPU limit) or ``killed`` (another signal, e.g. the
    file-size limit)."""

    passed: bool
    status: str
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""


def _clean_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _tail(path: Path, chars: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * chars))
            return f.read().decode("utf-8", "replace")[-chars:]
    except OSError:
        return ""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run one Python program in the sandbox; see the module docstring.

    Raises:
        OSError: only if the sandbox itself cannot be set up (no temp dir, no interpreter).
    """
    workdir = tempfile.mkdtemp(prefix="hybridpeft-sandbox-")
    uid = NOBODY if limits.drop_privileges and hasattr(os, "geteuid") and os.geteuid() == 0 else -1
    start = time.monotonic()
    try:
        Path(workdir, "program.py").write_text(source, encoding="utf-8")
        if uid >= 0:
            os.chown(workdir, uid, uid)  # the program's own scratch space
        out, err = Path(workdir, ".stdout"), Path(workdir, ".stderr")
        command = [
            sys.executable, "-I", str(RUNNER), workdir, str(limits.memory_mb * 2**20), str(limits.cpu_s),
            str(limits.file_size_mb * 2**20), str(uid),
        ]
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                command, cwd=workdir, env=_clean_env(workdir), stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                start_new_session=True, close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                proc.wait()
            finally:
                _kill_group(proc.pid)  # anything the program left behind in its group
        rc = proc.returncode
        if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
            status = "timeout"
        elif rc == 0:
            status = "passed"
        else:
            status = "killed" if rc < 0 else "failed"
        return ExecutionResult(
            passed=status == "passed", status=status, returncode=rc, seconds=time.monotonic() - start,
            stdout=_tail(out, limits.output_chars), stderr=_tail(err, limits.output_chars),
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(
    sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None, progress: bool = False,
) -> list[ExecutionResult]:
    """``run_program`` over many programs, ``workers`` at a time (default: CPU count, at most 8), in input order."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(lambda s: run_program(s, limits), sources), total=len(sources), desc="execute", disable=not progress))
