"""The results store: one JSON record per line in ``results.jsonl``, append-only.

Each attempt at a run appends a ``"running"`` record when it starts and an
``"ok"`` or ``"failed"`` record when it ends, so the file is a log that survives
a crash of the whole grid: a run whose last record is ``"running"`` was
interrupted and counts as one failed attempt.

An ``"ok"`` record holds::

    key, status, attempt, model, task, method, adapter_method, seed, role,
    config            the resolved run config (what ``run_key`` hashes)
    metrics           {"accuracy": 0.84, "val_loss": 0.41, ...}
    primary_metric    the metric the tables compare ("accuracy", "bleu", ...)
    curves            {"train": [{"step", "loss", "grad_norm", ...}],
                       "eval":  [{"step", "val_loss", <metric>, ...}]}
    lambda_history    Hybrid only: {"layers": [names], "steps": [...],
                                    "values": [[λ per layer] per step]}
    footprint         {"step_time_s", "peak_memory_mb", "tunable_params",
                       "total_params", "train_time_s"}
    versions          python, torch, transformers, hybridpeft, platform
    started_at, finished_at (UTC ISO), wall_s

A ``"failed"`` record carries ``error`` (the exception or the tail of the
worker's stderr) instead of results. Paths of this machine in any record (the data
directory, the source checkout, the Python environment, the store, the home
directory; in the error, a skipped language's reason, ...; not in the run's
settings, which keys hash) are written as ``<data>``, ``<repo>``, ``<python>``, ``<store>`` and
``~``, so a store can be published as it is.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

RESULTS_FILE = "results.jsonl"
STATUSES = ("running", "ok", "failed")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Library versions and platform, recorded with every run."""
    from .._version import __version__

    out = {"python": platform.python_version(), "platform": platform.platform(), "hybridpeft": __version__}
    for name in ("torch", "transformers", "accelerate", "numpy"):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except ImportError:
                continue
        out[name] = getattr(module, "__version__", "?")
    return out


def results_path(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file (or ends in .jsonl), else ``path/results.jsonl``."""
    p = Path(path)
    return p if p.suffix == ".jsonl" or p.is_file() else p / RESULTS_FILE


@dataclass(frozen=True)
class SkippedLine:
    """A line of a results file that could not be used, and why."""

    file: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}, line {self.line}: {self.reason}"


_OK_FIELDS = {"model": str, "task": str, "method": str, "seed": int, "metrics": dict, "primary_metric": str}


def _record_problem(record: Any, complete: bool) -> str | None:
    """Why a parsed line is not a usable record (None if it is); ``complete`` also asks a
    finished run for every field a report reads."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a record object"
    if not isinstance(record.get("key"), str):
        return "missing field 'key'"
    if record.get("status") not in STATUSES:
        return f"status={record.get('status')!r} is not one of {list(STATUSES)}"
    if record["status"] != "ok" or not complete:
        return None
    missing = [name for name, kind in _OK_FIELDS.items()
               if not isinstance(record.get(name), kind) or (kind is int and isinstance(record.get(name), bool))]
    if missing:
        return f"finished record {record['key']!r} is missing field(s) or has the wrong type: {missing}"
    return None


def read_store(path: str | os.PathLike, complete: bool = False) -> tuple[list[dict[str, Any]], list[SkippedLine]]:
    """Every usable record in the file, in order, and the lines that were not usable.

    A line is skipped (with its file, line number and reason) when it is not JSON (a torn
    last line, from a process killed mid-write, is the expected case), not an object, or
    a record without ``key`` and a valid ``status``; with ``complete`` (what a report needs)
    also a finished run without ``model``, ``task``, ``method``, ``seed``, ``metrics`` and
    ``primary_metric`` of the right types.

    Raises:
        FileNotFoundError: the results file does not exist.
    """
    file = results_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no results file at {file}")
    records, skipped = [], []
    with file.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                skipped.append(SkippedLine(file, lineno, f"not valid JSON ({err.msg}, column {err.colno})"))
                continue
            problem = _record_problem(record, complete)
            if problem is not None:
                skipped.append(SkippedLine(file, lineno, problem))
                continue
            records.append(_upgrade(record))
    return records, skipped


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every usable record in the file, in order; skipped lines are reported in one warning
    naming the file and each line (``read_store`` returns them instead).

    Raises:
        FileNotFoundError: the results file does not exist.
    """
    records, skipped = read_store(path)
    if skipped:
        warnings.warn(f"{results_path(path)}: skipped {len(skipped)} unreadable line(s): "
                      + "; ".join(f"line {s.line}: {s.reason}" for s in skipped[:10]), stacklevel=2)
    return records


def _upgrade(record: dict[str, Any]) -> dict[str, Any]:
    """Read a record written before the two validation losses were kept apart.

    Those records stored the loop's held-out-split loss as ``val_loss`` (over the
    task's own) next to ``best_val_loss``. Renamed here to ``heldout_loss`` /
    ``best_heldout_loss``; the task's ``val_loss`` is recovered as ``log(val_ppl)``
    where the task reported a perplexity, and is absent otherwise.
    """
    metrics = record.get("metrics")
    if not isinstance(metrics, dict) or "best_val_loss" not in metrics:
        return record
    metrics = dict(metrics)
    metrics["best_heldout_loss"] = metrics.pop("best_val_loss")
    if "val_loss" in metrics:
        metrics["heldout_loss"] = metrics.pop("val_loss")
    if isinstance(metrics.get("val_ppl"), (int, float)) and metrics["val_ppl"] > 0:
        metrics["val_loss"] = math.log(metrics["val_ppl"])
    return {**record, "metrics": metrics}


@dataclass
class RunState:
    """What the store knows about one run key."""

    status: str | None  # status of the last record, None if never started
    attempts: int       # number of attempts started
    record: dict[str, Any] | None  # the last "ok" record, if any


def run_states(records: Iterable[dict[str, Any]]) -> dict[str, RunState]:
    """Run key → state, from a store's records in log order."""
    out: dict[str, RunState] = {}
    for record in records:
        state = out.setdefault(record["key"], RunState(None, 0, None))
        state.status = record["status"]
        if record["status"] == "running":
            state.attempts += 1
        elif record["status"] == "failed" and record.get("interrupted"):
            state.attempts -= 1  # the user stopped it; not the run's fault
        elif record["status"] == "ok":
            state.record = record
    return out


def _path_forms(path: Path | str | None) -> list[str]:
    if not path:
        return []
    forms = {str(path), os.path.abspath(path), os.path.realpath(path)}
    return [form.rstrip(os.sep) for form in forms if len(form.rstrip(os.sep)) > 1]


def neutral_paths(text: str, store_root: str | os.PathLike | None = None) -> str:
    """``text`` with this machine's directories replaced by placeholders (longest path first, so
    a data directory inside the checkout stays ``<data>``): what a published store may hold."""
    from ..tasks.data import default_data_dir

    repo = Path(__file__).resolve().parents[3]
    placeholders = [("<store>", store_root), ("<data>", default_data_dir()), ("<python>", sys.prefix),
                    ("<repo>", repo), ("~", Path.home())]
    pairs = [(form, name) for name, path in placeholders for form in _path_forms(path)]
    for form, name in sorted(pairs, key=lambda pair: -len(pair[0])):
        text = text.replace(form, name)
    return text


_SETTINGS_KEYS = ("key", "config", "job_config", "reused_from")  # hashed or compared as written: kept


def _map_leaves(value: Any, leaf: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, scalars) with ``leaf`` applied to every scalar."""
    if isinstance(value, dict):
        return {k: _map_leaves(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_leaves(v, leaf) for v in value]
    return leaf(value)


def neutral_record(record: dict[str, Any], store_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """``record`` with ``neutral_paths`` applied to every string (an error, a skipped language's
    reason, a data description), except the run's settings, which run keys and reuse compare as
    written."""
    def leaf(value: Any) -> Any:
        return neutral_paths(value, store_root) if isinstance(value, str) else value

    return {k: (v if k in _SETTINGS_KEYS else _map_leaves(v, leaf)) for k, v in record.items()}


SERIES_KEYS = ("curves", "lambda_history")  # per-step series, for figures
SERIES_DIGITS = 7  # significant digits kept in them: float32's precision


def compact_series(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the floats of its per-step series (``SERIES_KEYS``) rounded to
    ``SERIES_DIGITS`` significant digits. The series come from float32 training and feed
    figures; printed at float64's 17 digits they made up most of a store's bytes (a 123-run
    store passed 2 MiB). Metrics, footprints and settings keep every digit."""
    def leaf(value: Any) -> Any:
        if isinstance(value, float) and math.isfinite(value):
            return float(f"{value:.{SERIES_DIGITS}g}")
        return value

    return {k: (_map_leaves(v, leaf) if k in SERIES_KEYS else v) for k, v in record.items()}


class ResultStore:
    """Append-only JSONL store in directory ``root`` (created on first write)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.file = self.root / RESULTS_FILE

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.file) if self.file.is_file() else []

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, flushed and fsynced so a crash loses at most this line."""
        if record.get("status") not in STATUSES or "key" not in record:
            raise ValueError(f"record needs a 'key' and a status in {STATUSES}; got status={record.get('status')!r}")
        record = compact_series(neutral_record(record, self.root))
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, default=_jsonable) + "\n"
        with self.file.open("a+b") as fh:
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = "\n" + line  # a torn last line must not swallow this record
            fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())

    def states(self) -> dict[str, RunState]:
        """Run key → state, from the whole log."""
        return run_states(self.records())


def _jsonable(value: Any) -> Any:
    """JSON fallback for numpy/torch scalars and paths (NaN/inf stay as JSON's NaN/Infinity)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


ANNOTATIONS_FILE = "annotations.json"


def read_annotations(path: str | os.PathLike) -> dict[str, Any]:
    """Facts about a store learned after its runs, from ``annotations.json`` beside ``results.jsonl``
    (the store itself stays append-only). Known key: ``footprint_not_comparable`` — the reason
    every record's step time and memory must not be compared (e.g. other work shared the machine).

    Raises:
        ValueError: the file is not a JSON object or has an unknown key.
    """
    file = results_path(path).parent / ANNOTATIONS_FILE
    if not file.is_file():
        return {}
    data = json.loads(file.read_text())
    known = {"footprint_not_comparable"}
    if not isinstance(data, dict) or set(data) - known:
        raise ValueError(f"{file}: expected a JSON object with keys among {sorted(known)}, got {data!r}")
    return data


def apply_annotations(records: list[dict[str, Any]], annotations: dict[str, Any]) -> list[dict[str, Any]]:
    """``records`` with the annotations applied (copies; the store is not touched)."""
    why = annotations.get("footprint_not_comparable")
    if not why:
        return records
    return [{**r, "footprint": {**(r.get("footprint") or {}), "comparable": False, "not_comparable_reason": why}}
            if r.get("status") == "ok" else r for r in records]


def finished(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``"ok"`` records the report uses: for each (model, task, method, seed), the
    latest one (a rerun after a config change supersedes the older result)."""
    latest: dict[tuple, dict[str, Any]] = {}
    for record in records:
        if record.get("status") == "ok":
            latest[(record["model"], record["task"], record["method"], record["seed"])] = record
    return list(latest.values())


def iter_cells(records: Iterable[dict[str, Any]]) -> Iterator[tuple[tuple[str, str, str], list[dict[str, Any]]]]:
    """Group records by cell (model, task, method), seeds sorted, cells in first-seen order."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for record in records:
        cells.setdefault((record["model"], record["task"], record["method"]), []).append(record)
    for cell, rows in cells.items():
        yield cell, sorted(rows, key=lambda r: r["seed"])
