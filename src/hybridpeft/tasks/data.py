"""Reading task data: local files (strictly validated), a thin hub branch, split slices and sampling.

Where data comes from (``locate``):

1. ``data_dir`` argument, else ``$HYBRIDPEFT_DATA``: local files only; a missing
   file is an error that names it.
2. Otherwise ``<repo>/../shared/data`` when it exists beside the source checkout:
   local files when the task's folder is there, else the hub.
3. Otherwise (or with ``data_dir="hub"``) the Hugging Face hub through
   ``datasets.load_dataset``.

Every malformed row raises ``DataFormatError`` naming the file, the line and what
was expected; no row is silently skipped.

Split names: ``train``, ``dev`` (alias ``validation``), ``test`` and task-specific
ones, optionally followed by an HF-style slice: ``"dev[:50%]"``, ``"train[100:200]"``.
Slices are taken in file order, so ``"dev[:50%]"`` and ``"dev[50%:]"`` are disjoint
and together cover ``dev`` (the way to train and evaluate on a set that ships only
one split).
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

from .base import Example

HUB = "hub"
ENV_VAR = "HYBRIDPEFT_DATA"

T = TypeVar("T")


class DataFormatError(ValueError):
    """A data file is missing or a row does not have the expected form."""


def where(path: Path | str, line: int | None = None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


# --------------------------------------------------------------------------- locating files


def default_data_dir() -> Path | None:
    """``$HYBRIDPEFT_DATA`` or ``<repo>/../shared/data`` next to a source checkout, if present."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    # src/hybridpeft/tasks/data.py -> parents[3] is the repository root.
    candidate = Path(__file__).resolve().parents[4] / "shared" / "data"
    return candidate if candidate.is_dir() else None


@dataclass(frozen=True)
class Source:
    """Where to read a split from: a local ``path`` or the hub (``path is None``)."""

    path: Path | None

    @property
    def is_hub(self) -> bool:
        return self.path is None


def locate(data_dir: str | os.PathLike | None, folder: str, filename: str, hub_available: bool = True) -> Source:
    """Resolve ``<data_dir>/<folder>/<filename>`` by the rules in the module docstring.

    Raises:
        DataFormatError: an explicit (or default, when the task folder exists) local
            location lacks the file; the message names it and lists what is there.
    """
    if data_dir is not None and str(data_dir) == HUB:
        return Source(None)
    explicit = data_dir is not None or bool(os.environ.get(ENV_VAR))
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if root is None:
        if hub_available:
            return Source(None)
        raise DataFormatError(f"no data directory: pass data_dir or set ${ENV_VAR}; expected {folder}/{filename} in it")
    task_dir = root / folder
    path = task_dir / filename
    if path.is_file():
        return Source(path)
    if not explicit and not task_dir.is_dir() and hub_available:
        return Source(None)
    present = sorted(p.name for p in task_dir.iterdir()) if task_dir.is_dir() else []
    hint = f"; {task_dir} holds: {', '.join(present)}" if present else f"; {task_dir} does not exist"
    raise DataFormatError(f"missing data file {path}{hint} (a slice of a split that exists, e.g. 'dev[:50%]', can stand in for a missing one)")


# --------------------------------------------------------------------------- split names and slices

_SPLIT = re.compile(r"^(?P<base>[A-Za-z0-9_\-]+)(?:\[(?P<start>-?\d+%?)?:(?P<end>-?\d+%?)?\])?$")
_ALIASES = {"validation": "dev", "valid": "dev", "val": "dev"}


@dataclass(frozen=True)
class Split:
    base: str  # canonical local name: train, dev, test, ...
    start: str | None = None
    end: str | None = None

    @property
    def sliced(self) -> bool:
        return self.start is not None or self.end is not None

    def hub_name(self, names: dict[str, str] | None = None) -> str:
        """The hub split string, slice included (``datasets`` parses the same syntax)."""
        base = (names or {}).get(self.base, "validation" if self.base == "dev" else self.base)
        if not self.sliced:
            return base
        return f"{base}[{self.start or ''}:{self.end or ''}]"

    def apply(self, rows: list[T]) -> list[T]:
        """Slice ``rows`` in order; percentages round to the nearest row."""
        n = len(rows)

        def bound(text: str | None, default: int) -> int:
            if text is None:
                return default
            value = round(n * float(text[:-1]) / 100) if text.endswith("%") else int(text)
            return value + n if value < 0 else value

        return rows[bound(self.start, 0): bound(self.end, n)]


def parse_split(split: str) -> Split:
    """``"dev[:50%]"`` -> ``Split("dev", None, "50%")``.

    Raises:
        ValueError: the string is not ``name`` or ``name[start:end]``.
    """
    m = _SPLIT.match(split.strip()) if isinstance(split, str) else None
    if m is None:
        raise ValueError(f"split={split!r} is invalid: expected a name like 'train' or 'dev', optionally sliced as 'dev[:50%]' or 'train[0:1000]'")
    base = _ALIASES.get(m["base"], m["base"])
    return Split(base, m["start"], m["end"])


# --------------------------------------------------------------------------- file readers


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without the newline) for a UTF-8 (optionally gzipped) file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{where(path, number)}: expected UTF-8 text; byte {e.start} is {raw[e.start:e.start + 1]!r}") from None
            yield number, text.rstrip("\n").rstrip("\r")


def read_delimited(
    path: Path, columns: Sequence[str] | None = None, delimiter: str = "\t", quoted: bool = False,
) -> list[tuple[int, dict[str, str]]]:
    """Rows of a TSV/CSV file as ``(line, {column: value})``.

    Args:
        columns: the column names for a file without a header; ``None`` means the
            first line is the header.
        quoted: CSV-style ``"..."`` quoting with ``""`` escapes (a record may then
            span lines; its first line is reported). Without it every line is one
            record split on the delimiter and quotes are literal.

    Raises:
        DataFormatError: a blank line, or a record with the wrong number of fields.
    """
    kind = "comma" if delimiter == "," else "tab"
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE, strict=True)
        rows: list[tuple[int, dict[str, str]]] = []
        header = list(columns) if columns is not None else None
        line = 1
        try:
            for record in reader:
                if header is None:
                    header = record
                    if not header or any(not c for c in header):
                        raise DataFormatError(f"{where(path, line)}: expected a header of {kind}-separated column names, got {record!r}")
                elif not record:
                    raise DataFormatError(f"{where(path, line)}: blank line; expected {len(header)} {kind}-separated fields ({', '.join(header)})")
                elif len(record) != len(header):
                    raise DataFormatError(
                        f"{where(path, line)}: expected {len(header)} {kind}-separated fields ({', '.join(header)}), got {len(record)}: {record!r}"[:500]
                    )
                else:
                    rows.append((line, dict(zip(header, record))))
                line = reader.line_num + 1
        except csv.Error as e:
            raise DataFormatError(f"{where(path, line)}: malformed CSV quoting ({e})") from None
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{path}: expected UTF-8 text ({e.reason} near line {line})") from None
    if header is None:
        raise DataFormatError(f"{path}: empty file; expected a header line")
    return rows


def require_columns(path: Path, rows: list[tuple[int, dict[str, str]]], needed: Sequence[str]) -> None:
    if rows:
        missing = [c for c in needed if c not in rows[0][1]]
        if missing:
            raise DataFormatError(f"{where(path, 1)}: expected columns {list(needed)} in the header, missing {missing}; header is {list(rows[0][1])}")


def read_jsonl(path: Path, required: dict[str, type] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """Objects of a JSON Lines file (``.gz`` allowed) as ``(line, object)``.

    Whitespace-only lines hold no record and are passed over; every other line
    must be a JSON object with the ``required`` keys of the given types.

    Raises:
        DataFormatError: invalid JSON, not an object, or a missing/mistyped key.
    """
    rows = []
    for number, text in _lines(path):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where(path, number)}: expected a JSON object, got invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataFormatError(f"{where(path, number)}: expected a JSON object, got {type(obj).__name__}")
        for key, typ in (required or {}).items():
            if key not in obj:
                raise DataFormatError(f"{where(path, number)}: expected key {key!r}; keys are {sorted(obj)}")
            if not isinstance(obj[key], typ):
                raise DataFormatError(f"{where(path, number)}: expected {key!r} to be {typ.__name__}, got {type(obj[key]).__name__}")
        rows.append((number, obj))
    return rows


def parse_label(value: str, mapping: dict[str, int], path: Path | str, line: int | None, column: str = "label") -> int:
    """Map a raw label (``"1"``, ``"entailment"``) to its class index.

    Raises:
        DataFormatError: the value is not one of ``mapping``'s keys.
    """
    key = value.strip()
    if key not in mapping:
        raise DataFormatError(f"{where(path, line)}: expected {column} in {sorted(mapping)}, got {value!r}")
    return mapping[key]


def require_text(value: Any, path: Path | str, line: int | None, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{where(path, line)}: expected non-empty text in {column!r}, got {value!r}")
    return value


# --------------------------------------------------------------------------- hub


def load_hub_rows(path: str, name: str | None, split: Split, split_names: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of a hub dataset via ``datasets.load_dataset`` (needs network or a warm HF cache).

    Raises:
        ImportError: ``datasets`` is not installed.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"reading {path!r} from the Hugging Face hub needs the 'datasets' package (pip install datasets); "
            "or pass data_dir with local files (see docs/tasks.md)"
        ) from None
    return list(datasets.load_dataset(path, name, split=split.hub_name(split_names)))


# --------------------------------------------------------------------------- sampling


def _group_key(ex: Example, per_language: bool) -> str:
    return str(ex.meta.get("language", "")) if per_language else ""


def _allocate(total: int, sizes: dict[Any, int], rng: random.Random, exact: bool) -> dict[Any, int]:
    """Split ``total`` over groups: equal shares (``exact``) or proportional to ``sizes``.

    Leftover units go to groups in a seeded random order, so no group is favoured
    by its name.
    """
    keys = sorted(sizes, key=str)
    if exact:
        quota = {k: total // len(keys) for k in keys}
    else:
        n = sum(sizes.values())
        quota = {k: total * sizes[k] // n for k in keys}
    order = keys[:]
    rng.shuffle(order)
    left = total - sum(quota.values())
    for k in order:
        if left == 0:
            break
        if quota[k] < sizes[k]:
            quota[k] += 1
            left -= 1
    return quota


def k_shot(examples: Sequence[Example], k: int, seed: int = 0, per: str = "label") -> list[Example]:
    """A deterministic, stratified few-shot sample, returned in the input order.

    Args:
        k: the number of examples per group.
        per: ``"label"``: k of every class (k · C in all; k in all when the
            examples carry no labels). ``"language"``: k per ``meta["language"]``,
            each language's k spread over its classes as evenly as possible (the
            paper's 32 examples per language).
        seed: the same seed and input give the same sample.

    Raises:
        ValueError: ``k`` is not positive, ``per`` is unknown, or a group has fewer
            than the examples asked of it.
    """
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k={k!r} is invalid: expected a positive integer")
    if per not in ("label", "language"):
        raise ValueError(f"per={per!r} is invalid: expected 'label' or 'language'")
    rng = random.Random(f"k_shot:{seed}")
    buckets: dict[tuple[str, Any], list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        buckets[(_group_key(ex, per == "language"), ex.label)].append(i)
    chosen: list[int] = []
    groups = sorted({g for g, _ in buckets})
    for g in groups:
        labels = {lab: len(idx) for (gg, lab), idx in buckets.items() if gg == g}
        if per == "label":
            quota = {lab: k for lab in labels}
        else:
            quota = _allocate(k, labels, rng, exact=True)
        for lab in sorted(labels, key=str):
            pool = buckets[(g, lab)]
            if quota[lab] > len(pool):
                where_ = f"language {g!r}, " if g else ""
                raise ValueError(f"k={k} asks for {quota[lab]} examples of {where_}label {lab!r}, but only {len(pool)} exist")
            chosen.extend(rng.sample(pool, quota[lab]))
    return [examples[i] for i in sorted(chosen)]


def subsample(examples: Sequence[Example], n: int, seed: int = 0) -> list[Example]:
    """``n`` examples drawn without replacement, stratified by (language, label)
    in proportion to their counts, returned in the input order. ``n >= len`` keeps all.

    Raises:
        ValueError: ``n`` is negative.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"limit={n!r} is invalid: expected a non-negative integer or None")
    if n >= len(examples):
        return list(examples)
    rng = random.Random(f"subsample:{seed}")
    buckets: dict[tuple[str, Any], list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        buckets[(str(ex.meta.get("language", "")), ex.label)].append(i)
    quota = _allocate(n, {key: len(v) for key, v in buckets.items()}, rng, exact=False)
    chosen = [i for key in sorted(buckets, key=str) for i in rng.sample(buckets[key], quota[key])]
    return [examples[i] for i in sorted(chosen)]


def finalize(examples: list[Example], limit: int | None, seed: int, shots: int | None = None, per: str = "label") -> list[Example]:
    """Apply the optional ``k_shot`` and then ``limit`` to loaded examples."""
    if shots is not None:
        examples = k_shot(examples, shots, seed, per)
    if limit is not None:
        examples = subsample(examples, limit, seed)
    return examples

