"""Checkpoints that survive a crash: atomic directories with a completion marker.

Layout of ``<run_dir>/checkpoints/step-000120/``::

    adapter/               hybridpeft.save_adapter output (safetensors + JSON)
    trainer_state.pt       optimizer, scheduler, step, data position, counters
    rng-rank0.pt ...       each rank's RNG states
    COMPLETE               JSON: step and the size + sha256 of every file, written last

Every ``.pt`` file holds only tensors and plain python values, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs on load).

Writing: everything goes into ``.tmp-step-000120`` first; each file is fsynced,
the marker is written and fsynced last, then the directory is renamed into
place and the parent fsynced. A crash at any point leaves either no
``step-*`` directory or a complete one. Reading checks the marker, the sizes and
the hashes; a directory that fails is skipped with a warning naming it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
ADAPTER_DIR = "adapter"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems cannot open directories; nothing more to do there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MARKER)


def temp_dir(checkpoints: Path, step: int) -> Path:
    """The staging directory for ``step`` (same name on every rank; stale ones are cleared by the writer)."""
    return checkpoints / f".tmp-{step_dir_name(step)}"


def prepare_temp(checkpoints: Path, step: int) -> Path:
    tmp = temp_dir(checkpoints, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_tensors(obj: dict[str, Any], path: Path) -> None:
    torch.save(obj, path)
    fsync_file(path)


def finalize(checkpoints: Path, step: int, extra: dict[str, Any] | None = None) -> Path:
    """Seal the staging directory of ``step``: fsync files, write the marker last, rename.

    Returns the final ``step-NNNNNN`` directory.
    """
    tmp = temp_dir(checkpoints, step)
    manifest = {}
    for path in _files(tmp):
        fsync_file(path)
        manifest[str(path.relative_to(tmp))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    for sub in sorted({p.parent for p in _files(tmp)}, key=lambda p: -len(p.parts)):
        fsync_dir(sub)
    marker = tmp / MARKER
    marker.write_text(json.dumps({"step": step, "files": manifest, **(extra or {})}, indent=1, sort_keys=True))
    fsync_file(marker)
    fsync_dir(tmp)
    final = checkpoints / step_dir_name(step)
    if final.exists():  # a rerun of the same step (e.g. after a resume) replaces the old one
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(checkpoints)
    return final


def verify(path: Path) -> str | None:
    """None if the checkpoint at ``path`` is complete and intact, else the reason it is not."""
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (partial write)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable {MARKER} marker ({err})"
    if TRAINER_STATE not in files:
        return f"{TRAINER_STATE} missing from the manifest"
    for rel, meta in files.items():
        file = path / rel
        if not file.is_file():
            return f"missing file {rel}"
        if file.stat().st_size != meta["size"]:
            return f"{rel} has {file.stat().st_size} bytes, expected {meta['size']}"
        if _sha256(file) != meta["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def list_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every ``step-*`` directory, newest first (not verified)."""
    if not checkpoints.is_dir():
        return []
    found = []
    for child in checkpoints.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found, reverse=True)


def latest_valid(checkpoints: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint that verifies; broken ones are skipped with a warning naming them.

    Leftover staging directories (``.tmp-*``, from a crash mid-write) are reported too.
    """
    if warn and checkpoints.is_dir():
        for child in sorted(checkpoints.glob(".tmp-*")):
            warnings.warn(f"skipping partial checkpoint {child} (a write was interrupted)", stacklevel=2)
    for _, path in list_checkpoints(checkpoints):
        reason = verify(path)
        if reason is None:
            return path
        if warn:
            warnings.warn(f"skipping corrupt or partial checkpoint {path}: {reason}", stacklevel=2)
    return None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)


def load_rng(path: Path, rank: int) -> dict[str, Any] | None:
    file = path / f"rng-rank{rank}.pt"
    return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None


def prune(checkpoints: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (incomplete ones are left for inspection)."""
    complete = [p for _, p in list_checkpoints(checkpoints) if (p / MARKER).is_file()]
    for old in complete[keep:]:
        shutil.rmtree(old, ignore_errors=True)
