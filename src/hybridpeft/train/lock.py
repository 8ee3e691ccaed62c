"""An exclusive lock on a run directory: two training processes can never share one.

``RunDirLock(run_dir).acquire()`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on
``<run_dir>/train.lock`` and writes who holds it into the file (pid, host, start
time, command). A second process is refused at once with ``RunDirBusy``, whose
message names the holder. The kernel drops a ``flock`` when its process ends,
however it ends (an exception, SIGKILL, the OOM killer), so a crashed run never
leaves a stale lock behind and ``--resume`` works right after a crash.

The file itself stays (deleting a lock file while others may open it is a race);
its content is cleared before the lock is released, so it names a holder only
while one exists. A run dir that the lock created and that holds nothing else
when the lock is released (e.g. a resume that found nothing to resume) is removed
again: a refused command leaves no trace.

Under multi-process training only the main process holds the lock (the other
ranks write only under its coordination); ``flock`` is advisory and per host, so
on a network filesystem it protects against a second job on the same machine.
On platforms without ``fcntl`` (Windows) no lock is taken.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "train.lock"


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock."""


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)}


def describe_holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "a process that is just starting (it has not written its details yet)"
    return (f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}, "
            f"command: {info.get('command')}")


class RunDirLock:
    """See the module docstring. Use as ``with RunDirLock(run_dir): ...`` or acquire()/release()."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> "RunDirLock":
        """Take the lock, creating the run dir if needed.

        Raises:
            RunDirBusy: another process holds it (the message names it).
            OSError: the run dir cannot be created or written (read-only, full disk, ...).
        """
        self._created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunDirBusy(
                f"output.run_dir={str(self.run_dir)!r} is in use by another training process ({describe_holder(holder)}); "
                f"wait for it to finish or stop it, or choose another output.run_dir (lock: {self.path})"
            ) from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
            probe, name = tempfile.mkstemp(prefix=".write-probe-", dir=self.run_dir)  # can we add files here?
            os.close(probe)
            os.unlink(name)
        except OSError:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._created_dir and {p.name for p in self.run_dir.iterdir()} == {LOCK_FILE}:
                self.path.unlink()
                self.run_dir.rmdir()
            else:
                os.ftruncate(fd, 0)
        except OSError:
            pass  # releasing must not mask the error that ended the run
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any] | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
        info = json.loads(text) if text else None
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def read_holder(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds the run dir's lock right now, or None (not locked, or no lock file)."""
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
