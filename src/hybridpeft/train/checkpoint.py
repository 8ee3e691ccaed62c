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
``step-*`` directory or a complete one. Reading checks the marker (its JSON
shape too), the sizes and the hashes, and before a resume (``deep=True``) that
the trainer state and RNG files load with ``weights_only=True`` and have the
expected structure, and that the adapter config parses; a directory that fails
is skipped with a warning naming it and the reason, so a pickle-bearing or
tampered file is refused like a torn one.

A checkpoint whose weights turned out to produce non-finite losses is renamed
``step-NNNNNN.suspect`` by the loop (``set_aside``): kept for inspection, never
picked by ``--resume`` on the folder (it can still be named explicitly).
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


def step_of(checkpoint: Path) -> int:
    """The step a checkpoint holds: from its ``step-NNNNNN`` name, else from its trainer state."""
    match = _STEP_DIR.match(checkpoint.name)
    if match:
        return int(match.group(1))
    return int(load_trainer_state(checkpoint)["loop"]["step"])  # e.g. a checkpoint --resume named elsewhere


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
    # Through a Python file object: a full disk then raises OSError(ENOSPC) instead of the
    # C++ stream's uninformative RuntimeError that torch.save(obj, path) gives.
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


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


def verify(path: Path, deep: bool = False) -> str | None:
    """None if the checkpoint at ``path`` is complete and intact, else the reason it is not.

    ``deep`` also loads the trainer state and RNG files (``weights_only=True``: a file
    that would need pickled code is refused) and checks their structure and the adapter
    config; that is what a resume needs before it commits to a checkpoint.
    """
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (partial write)"
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        return f"unreadable {MARKER} marker ({err})"
    shape = _marker_shape_problem(info)
    if shape is not None:
        return f"{MARKER} marker has the wrong shape: {shape}"
    files = info["files"]
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
    return _content_problem(path, files) if deep else None


def _marker_shape_problem(info: Any) -> str | None:
    """What is wrong with a parsed marker's structure (None if it is ``{"files": {rel: {size, sha256}}, ...}``)."""
    if not isinstance(info, dict):
        return f"expected a JSON object, found a JSON {type(info).__name__}"
    files = info.get("files")
    if not isinstance(files, dict):
        return f"'files' is {type(files).__name__ if files is not None else 'absent'}, expected an object"
    for rel, meta in files.items():
        if rel.startswith("/") or ".." in Path(rel).parts:
            return f"file name {rel!r} points outside the checkpoint"
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)):
            return f"entry {rel!r} is {meta!r}, expected {{'size': int, 'sha256': str}}"
    return None


_TRAINER_FIELDS = {"optimizer": dict, "scheduler": dict, "data": dict, "loop": dict}


def _content_problem(path: Path, files: dict[str, Any]) -> str | None:
    """Load what a resume will load, safely; the reason it cannot be used, or None."""
    from ..api import ADAPTER_CONFIG, read_adapter_config

    try:
        state = load_trainer_state(path)
    except Exception as err:  # UnpicklingError (code refused by weights_only), a corrupt zip, EOF, ...
        return f"{TRAINER_STATE} cannot be loaded safely: {_first_line(err)}"
    if not isinstance(state, dict):
        return f"{TRAINER_STATE} holds a {type(state).__name__}, expected a dict"
    for key, kind in _TRAINER_FIELDS.items():
        if not isinstance(state.get(key), kind):
            return f"{TRAINER_STATE} has no {key!r} {kind.__name__}"
    if not all(isinstance(state["data"].get(k), int) for k in ("epoch", "index")):
        return f"{TRAINER_STATE}: data position {state['data']!r} is not {{'epoch': int, 'index': int}}"
    if not isinstance(state["loop"].get("step"), int):
        return f"{TRAINER_STATE}: loop state has no integer 'step'"
    for rel in files:
        if re.fullmatch(r"rng-rank\d+\.pt", rel):
            try:
                rng = torch.load(path / rel, map_location="cpu", weights_only=True)
            except Exception as err:
                return f"{rel} cannot be loaded safely: {_first_line(err)}"
            if not isinstance(rng, dict):
                return f"{rel} holds a {type(rng).__name__}, expected a dict of RNG states"
    if f"{ADAPTER_DIR}/{ADAPTER_CONFIG}" in files:
        try:
            read_adapter_config(path / ADAPTER_DIR)
        except (ValueError, OSError) as err:
            return f"adapter config unusable: {_first_line(err)}"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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


def latest_valid(checkpoints: Path, warn: bool = True, deep: bool = False,
                 rejected: list[tuple[Path, str]] | None = None) -> Path | None:
    """The newest checkpoint that verifies; broken ones are skipped with a warning naming them
    (and appended to ``rejected`` as (path, reason)).

    Leftover staging directories (``.tmp-*``, from a crash mid-write) are reported too.
    """
    if warn and checkpoints.is_dir():
        for child in sorted(checkpoints.glob(".tmp-*")):
            warnings.warn(f"skipping partial checkpoint {child} (a write was interrupted)", stacklevel=2)
    for _, path in list_checkpoints(checkpoints):
        reason = verify(path, deep=deep)
        if reason is None:
            return path
        if rejected is not None:
            rejected.append((path, reason))
        if warn:
            warnings.warn(f"skipping corrupt or partial checkpoint {path}: {reason}", stacklevel=2)
    return None


def newest_sealed(checkpoints: Path) -> Path | None:
    """The newest ``step-*`` directory with a marker (not hashed: for messages, not for resuming)."""
    return next((p for _, p in list_checkpoints(checkpoints) if (p / MARKER).is_file()), None)


SUSPECT_SUFFIX = ".suspect"


def set_aside(path: Path) -> Path:
    """Rename checkpoint ``path`` to ``<name>.suspect``: kept, but no longer picked by a resume."""
    target = path.with_name(path.name + SUSPECT_SUFFIX)
    if target.exists():
        shutil.rmtree(target)
    os.replace(path, target)
    fsync_dir(path.parent)
    return target


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)


def load_rng(path: Path, rank: int) -> dict[str, Any] | None:
    file = path / f"rng-rank{rank}.pt"
    return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None


def prune(checkpoints: Path, keep: int, protect: Path | None = None) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (incomplete ones are left for inspection).

    ``protect`` is never deleted: the loop passes the newest checkpoint known to be good
    (a later step ran on its weights with a finite loss), so a run that goes non-finite
    right after a save still has a good checkpoint to name, whatever ``keep`` is.
    """
    complete = [p for _, p in list_checkpoints(checkpoints) if (p / MARKER).is_file()]
    for old in complete[keep:]:
        if protect is None or old.resolve() != Path(protect).resolve():
            shutil.rmtree(old, ignore_errors=True)
