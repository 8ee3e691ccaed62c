"""How a training run ends when something outside it goes wrong: one line that says what
happened, what was kept and how to go on.

- ``ResumeError``: ``--resume`` found nothing it can resume from; nothing was changed.
- ``DiskFull``: no space left (or quota exceeded) while writing; the unfinished checkpoint
  is removed and the message names the newest complete one, which ``--resume`` continues from.
- ``RunDirNotWritable``: ``output.run_dir`` (or something in it) cannot be written.
- ``TrainingInterrupted``: Ctrl-C or SIGTERM (the CLI turns SIGTERM into Ctrl-C); the
  message names the newest complete checkpoint. It is a ``KeyboardInterrupt``, so code
  that stops on Ctrl-C still does.

``explain_failures`` wraps a run and turns the raw errors into these. A full disk is
recognised by ``errno`` (``ENOSPC``, ``EDQUOT``) and by the text other libraries put in
their own error types (safetensors: "No space left on device (os error 28)").
"""
from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path
from typing import Iterator

from . import checkpoint as ckpt


class ResumeError(ValueError):
    """A resume that cannot resume; raised before anything in the run dir is touched."""


class DiskFull(OSError):
    """The disk (or quota) filled up while the run was writing."""


class RunDirNotWritable(OSError):
    """The run dir, or a file in it, cannot be written."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run; ``checkpoint`` is the newest complete one (or None)."""

    def __init__(self, message: str, run_dir: Path, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.run_dir = run_dir
        self.checkpoint = checkpoint


_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(err: BaseException) -> bool:
    """True when ``err`` (or what caused it) says the disk or the quota is full."""
    for link in _chain(err):
        if isinstance(link, OSError) and link.errno in _FULL_ERRNOS:
            return True
        if any(text in str(link).lower() for text in _FULL_TEXTS):
            return True
    return False


def _about(filename: object, root: Path) -> bool:
    """Whether an error's file is ``root``, inside it, or one of the folders it is created in."""
    if not filename:
        return False
    try:
        path, root = Path(str(filename)).resolve(), root.resolve()
        return path.is_relative_to(root) or root.is_relative_to(path)
    except (OSError, ValueError):
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _kept(run_dir: Path) -> tuple[Path | None, str]:
    newest = ckpt.newest_sealed(run_dir / "checkpoints")
    if newest is None:
        return None, "no checkpoint had been written yet"
    return newest, f"checkpoints are kept; the newest complete one is {newest}"


def _remove_unfinished(run_dir: Path) -> list[str]:
    """Delete half-written checkpoint staging dirs (they are useless and hold the space we need)."""
    removed = []
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        for staging in sorted(checkpoints.glob(".tmp-*")):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging.name)
    return removed


@contextlib.contextmanager
def explain_failures(run_dir: Path, is_main: bool) -> Iterator[None]:
    """Re-raise interruptions, a full disk and an unwritable run dir as the errors above."""
    try:
        yield
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt as err:
        newest, kept = _kept(run_dir)
        reason = str(err) or "Ctrl-C"
        raise TrainingInterrupted(f"training in {run_dir} interrupted ({reason}); {kept}", run_dir, newest) from err
    except Exception as err:
        if is_disk_full(err):
            removed = _remove_unfinished(run_dir) if is_main else []
            newest, kept = _kept(run_dir)
            cleanup = f"removed the unfinished checkpoint {', '.join(removed)}; " if removed else ""
            go_on = "free some space, then continue with --resume" if newest else "free some space, then start again"
            raise DiskFull(f"disk full: no space left on the device while writing to {run_dir} ({_first_line(err)}); "
                           f"{cleanup}{kept}; {go_on}") from err
        if isinstance(err, OSError) and err.errno in _DENIED_ERRNOS and _about(err.filename, run_dir):
            raise RunDirNotWritable(f"output.run_dir={str(run_dir)!r} is not writable: {_first_line(err)}") from err
        raise
