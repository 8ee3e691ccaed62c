"""The benchmark grid: a YAML file expanded into one resolved config per run.

A benchmark file has four parts (see ``benchmarks/quick.yaml``)::

    name: quick
    seeds: [0, 1, 2]
    shared:            # every run starts from these settings (identical splits,
      train: {...}     # prompts, batch sizes, step budget, early stopping)
      data: {...}
    grid:              # which tasks run on which model
      - model: minilm-l6
        tasks: [sst2-cls, rte-cls]
    methods:           # one entry per table row; ``method`` is the adapter method
      - {name: lora, adapter: {r: 8}}
      - {name: hybrid-fixed-0.5, method: hybrid, role: ablation,
         adapter: {schedule: fixed, lam_fixed: 0.5}}
    overrides:         # per-cell changes, applied in order, matched on any of
      - where: {method: full}          # method/adapter_method/task/model/seed
        set: {train.lr: 2.0e-5}
    exclude:           # cells left out of the grid, same matching rules
      - {model: smollm2-135m, method: full}

The grid is ``methods × (model, task) pairs × seeds``; each cell is resolved by
deep-merging ``shared``, then the method's ``train``/``adapter`` entries, then the
matching ``overrides``. Keys in ``set`` may be dotted (``train.lr``).

Every run is identified by a *run key*: a readable prefix
``model/task/method/seed<k>`` and a hash of the resolved config, so a changed
setting makes a new run while an unchanged one is recognised as already done.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..checks import check
from ..train.job_config import read_yaml, set_dotted

ROLES = ("main", "ablation", "extra")
DEFAULT_JOB = "hybridpeft.bench.job:run_training_job"
_MATCH_FIELDS = ("method", "adapter_method", "task", "model", "seed")


@dataclass(frozen=True)
class MethodSpec:
    """One row of the result tables.

    Args:
        name: the label shown in tables and figures (unique in a benchmark).
        method: the adapter method (``hybridpeft.adapters.config.known_methods()``);
            defaults to ``name``.
        adapter: adapter config fields for this row (e.g. ``{"r": 8}``).
        train: training settings that differ for this row (e.g. full FT's lr);
            keep these to what the method needs, not tuning one method more.
        role: ``"main"`` rows form the main table; ``"ablation"`` rows appear only
            in the λ-ablation table; ``"extra"`` rows are baselines the paper does not
            report (e.g. DoRA, IA³): in the main table, labelled so, and in none of the
            paper's claims.
    """

    name: str
    method: str
    adapter: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    role: Literal["main", "ablation", "extra"] = "main"


@dataclass(frozen=True)
class LrSearch:
    """Choose each (model, task, method) cell's learning rate on a held-out loss, then run it.

    For every main-role method with candidates there is one run per candidate lr and selection
    seed, labelled ``<name>@<lr>`` with role ``"lr-search"``. The cell's lr is the candidate with the
    lowest mean ``metric`` over the selection seeds (NaN or a missing value counts as +inf; a tie goes
    to the earlier candidate). The final runs (label ``<name>``, role as configured) then use it for
    every seed; a final run whose resolved settings equal a finished search run's is not trained
    again, its record is reused (``reused_from``). Ablation rows are not searched.

    Args:
        candidates: method name or adapter method -> learning rates; ``default`` for the rest.
        seeds: the seeds whose runs select.
        metric: a metric of the runs, lower is better. ``heldout_loss`` (default): the last
            validation loss on the examples held out of the training split — the adapter that is
            scored when early stopping is off. ``best_heldout_loss`` suits early stopping. Never a
            score on the evaluation split.
    """

    candidates: dict[str, list[float]]
    seeds: list[int]
    metric: str = "heldout_loss"

    def for_method(self, method: "MethodSpec") -> list[float] | None:
        if method.role != "main":
            return None
        for key in (method.name, method.method, "default"):
            if key in self.candidates:
                return list(self.candidates[key])
        return None


def lr_label(lr: float) -> str:
    """``5e-4`` style: the shortest mantissa, no exponent padding (``2.5e-3``, ``1e-4``)."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def search_label(method: str, lr: float) -> str:
    return f"{method}@{lr_label(lr)}"


def _parse_lr_search(data: Any, errors: list[str]) -> LrSearch | None:
    if data is None:
        return None
    if not isinstance(data, dict) or not set(data) <= {"candidates", "seeds", "metric"} or "candidates" not in data:
        errors.append(f"lr_search={data!r} is invalid: expected a mapping with 'candidates' (and optional 'seeds', 'metric')")
        return None
    candidates = data["candidates"]
    if not isinstance(candidates, dict) or not candidates or not all(
            isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v)
            for v in candidates.values()):
        errors.append(f"lr_search.candidates={candidates!r} is invalid: expected method name -> non-empty list of positive learning rates")
        return None
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) for x in seeds):
        errors.append(f"lr_search.seeds={seeds!r} is invalid: expected a non-empty list of integers")
        return None
    metric = data.get("metric", "heldout_loss")
    if not isinstance(metric, str) or not metric:
        errors.append(f"lr_search.metric={metric!r} is invalid: expected a metric name such as 'heldout_loss'")
        return None
    return LrSearch({str(k): [float(x) for x in v] for k, v in candidates.items()}, list(seeds), metric)


@dataclass(frozen=True)
class Override:
    """Settings ``set`` (dotted keys allowed) applied to every cell matching ``where``."""

    where: dict[str, Any]
    set: dict[str, Any]


@dataclass
class BenchConfig:
    """A parsed benchmark file; ``expand_grid`` turns it into runs.

    Args:
        name: a short name for the benchmark (used in the report title).
        seeds: the seeds every cell runs with.
        grid: ``[(model, [task, ...]), ...]``.
        methods: the rows.
        shared: settings common to every run (``train``, ``data``, ... sections).
        overrides: per-cell changes, applied in order.
        exclude: ``where`` dicts; matching cells are dropped.
        output: the results directory (a relative path is taken from the
            current directory, like any command-line path).
        max_attempts: how often a failing run is tried before it is given up
            (counted over all invocations; finished runs are never re-run).
        isolation: ``"subprocess"`` runs each job in a fresh Python process (a
            crash, OOM kill or leaked state cannot touch the grid);
            ``"inprocess"`` calls the job directly inside ``try/except``.
        timeout_s: wall-clock limit per run (subprocess isolation only).
        workers: how many runs go at once (subprocess isolation only). Each worker
            gets ``OMP_NUM_THREADS = cpu_count // workers`` unless the environment
            already sets it, so side-by-side runs do not oversubscribe the cores.
            Step times of side-by-side runs share the machine; the record says so.
        job: ``"module:function"`` that trains and evaluates one run.
        description: free text copied into the report.
        footprint_comparable: ``false`` marks every run's step time and memory as not comparable
            (e.g. the machine is known to be shared with other work); the report then prints no
            speed or memory verdict. Runs are also marked when the machine's load average during
            the run exceeded its core count (see ``runner``).
        lr_search: choose each cell's learning rate on a held-out loss before the final runs;
            see ``LrSearch``. ``None``: every run uses its configured ``train.lr``.
        reuse_from: other results stores (``results.jsonl`` paths, relative to the benchmark
            file) whose finished runs stand in for a run of this grid with identical resolved
            settings (any label): the record is copied into this store with ``reused_from``
            naming it, instead of training again. Runs of this store are always reusable.
        base_dir: the benchmark file's directory (for resolving relative data paths).
    """

    name: str
    seeds: list[int]
    grid: list[tuple[str, list[str]]]
    methods: list[MethodSpec]
    shared: dict[str, Any] = field(default_factory=dict)
    overrides: list[Override] = field(default_factory=list)
    exclude: list[dict[str, Any]] = field(default_factory=list)
    output: str = "bench-results"
    max_attempts: int = 2
    isolation: Literal["subprocess", "inprocess"] = "subprocess"
    timeout_s: float | None = None
    workers: int = 1
    job: str = DEFAULT_JOB
    description: str = ""
    footprint_comparable: bool = True
    lr_search: "LrSearch | None" = None
    reuse_from: list[str] = field(default_factory=list)
    base_dir: str = "."

    def __post_init__(self) -> None:
        errors = _collect(self._checks)
        if errors:
            raise ValueError("invalid benchmark config:\n  " + "\n  ".join(errors))

    def _checks(self) -> list[tuple[bool, str, Any, str]]:
        names = [m.name for m in self.methods]
        out: list[tuple[bool, str, Any, str]] = [
            (isinstance(self.name, str) and self.name != "", "name", self.name, "a non-empty string"),
            (len(self.seeds) > 0 and all(isinstance(s, int) for s in self.seeds), "seeds", self.seeds, "a non-empty list of integers"),
            (len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds, "no repeated seed"),
            (len(self.grid) > 0, "grid", self.grid, "at least one {model, tasks} entry"),
            (len(self.methods) > 0, "methods", names, "at least one method"),
            (len(set(names)) == len(names), "methods", names, "unique method names"),
            (isinstance(self.max_attempts, int) and self.max_attempts >= 1, "max_attempts", self.max_attempts, "an integer >= 1"),
            (self.isolation in ("subprocess", "inprocess"), "isolation", self.isolation, "'subprocess' or 'inprocess'"),
            (self.timeout_s is None or self.timeout_s > 0, "timeout_s", self.timeout_s, "None or a positive number of seconds"),
            (isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers >= 1,
             "workers", self.workers, "an integer >= 1"),
            (self.workers == 1 or self.isolation == "subprocess", "workers", self.workers,
             "1 with isolation='inprocess' (parallel runs need their own processes)"),
            (isinstance(self.job, str) and ":" in self.job, "job", self.job, "'module:function'"),
            ("run" not in self.shared, "shared.run", self.shared.get("run"), "absent (the grid fills in the run section)"),
            (isinstance(self.footprint_comparable, bool), "footprint_comparable", self.footprint_comparable, "true or false"),
            (isinstance(self.reuse_from, list) and all(isinstance(x, str) for x in self.reuse_from), "reuse_from",
             self.reuse_from, "a list of results.jsonl paths"),
        ]
        for i, (model, tasks) in enumerate(self.grid):
            out.append((isinstance(model, str) and model != "", f"grid[{i}].model", model, "a model name"))
            out.append((len(tasks) > 0 and all(isinstance(t, str) for t in tasks), f"grid[{i}].tasks", tasks, "a non-empty list of task names"))
        for m in self.methods:
            out.append((m.role in ROLES, f"methods[{m.name}].role", m.role, "'main', 'ablation' or 'extra'"))
        for i, o in enumerate(self.overrides):
            out.append((set(o.where) <= set(_MATCH_FIELDS), f"overrides[{i}].where", o.where, f"keys among {_MATCH_FIELDS}"))
        for i, w in enumerate(self.exclude):
            out.append((set(w) <= set(_MATCH_FIELDS), f"exclude[{i}]", w, f"keys among {_MATCH_FIELDS}"))
        return out

    @property
    def output_dir(self) -> Path:
        return Path(os.path.expanduser(self.output))

    def reuse_paths(self) -> list[Path]:
        """``reuse_from`` resolved against the benchmark file's directory."""
        return [Path(self.base_dir) / os.path.expanduser(p) for p in self.reuse_from]


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: a cell (model, task, method) and a seed, fully resolved."""

    model: str
    task: str
    method: str
    adapter_method: str
    seed: int
    role: str
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)  # copied into the run's records; not part of its key

    @property
    def key(self) -> str:
        return run_key(self.config)

    @property
    def cell(self) -> tuple[str, str, str]:
        return (self.model, self.task, self.method)


def _collect(checks: Any) -> list[str]:
    """All failed checks as ``field=value is invalid: expected ...`` lines (not just the first)."""
    return [f"{name}={value!r} is invalid: expected {expected}" for ok, name, value, expected in checks() if not ok]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_key(config: dict[str, Any]) -> str:
    """``model/task/method/seed<k>#<hash>`` for a resolved config (with its ``run`` section):
    readable, and stable while the resolved config is unchanged."""
    digest = hashlib.sha256(canonical_json(config).encode()).hexdigest()[:12]
    run = config["run"]
    return f"{run['model']}/{run['task']}/{run['method']}/seed{run['seed']}#{digest}"


def deep_update(target: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Merge ``changes`` into ``target`` in place: dicts merge recursively, anything else
    replaces; dotted keys address nested sections."""
    for key, value in changes.items():
        if "." in key:
            set_dotted(target, key, copy.deepcopy(value))
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_update(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def _matches(where: dict[str, Any], fields: dict[str, Any]) -> bool:
    def one(want: Any, have: Any) -> bool:
        return have in want if isinstance(want, list) else have == want

    return all(one(want, fields[k]) for k, want in where.items())


def _cell_config(bench: BenchConfig, m: MethodSpec, fields: dict[str, Any]) -> dict[str, Any]:
    """A cell's resolved settings without its ``run`` section: shared, then the method's, then overrides."""
    config = copy.deepcopy(bench.shared)
    deep_update(config, {"train": m.train} if m.train else {})
    config["adapter"] = deep_update(deep_update(config.get("adapter", {}), {"method": m.method}), m.adapter)
    for o in bench.overrides:
        if _matches(o.where, fields):
            deep_update(config, o.set)
    return config


def grid_cells(bench: BenchConfig, seeds: list[int]) -> list[tuple[str, str, MethodSpec, int, dict[str, Any]]]:
    """(model, task, method, seed, match fields) in the stable grid order, excluded cells left out."""
    out = []
    for model, tasks in bench.grid:
        for task in tasks:
            for m in bench.methods:
                for seed in seeds:
                    fields = {"method": m.name, "adapter_method": m.method, "task": task, "model": model, "seed": seed}
                    if not any(_matches(w, fields) for w in bench.exclude):
                        out.append((model, task, m, seed, fields))
    return out


def expand_grid(bench: BenchConfig, selected_lrs: dict[tuple[str, str, str], dict[str, Any]] | None = None) -> list[RunSpec]:
    """Every final run of the benchmark, in a stable order (model, task, method, seed).

    The resolved ``config`` of a run is the shared sections after the method's
    own settings and the matching overrides, plus ``adapter: {"method": ..., **fields}``
    and ``run: {"model", "task", "method", "seed"}`` (the cell and seed; the job
    maps them onto its own settings).

    With ``bench.lr_search``, a searched cell appears only once ``selected_lrs`` holds its
    selection (``{"lr": ..., ...}`` from ``hybridpeft.bench.selection.select_lrs``), with
    ``train.lr`` set to it and the selection in the run's ``meta``.
    """
    runs: list[RunSpec] = []
    for model, task, m, seed, fields in grid_cells(bench, bench.seeds):
        config = _cell_config(bench, m, fields)
        meta: dict[str, Any] = {}
        if bench.lr_search is not None and bench.lr_search.for_method(m) is not None:
            chosen = (selected_lrs or {}).get((model, task, m.name))
            if chosen is None:
                continue  # not selected yet
            set_dotted(config, "train.lr", chosen["lr"])
            meta = {"lr_selected": chosen}
        config["run"] = {"model": model, "task": task, "method": m.name, "seed": seed}
        runs.append(RunSpec(model, task, m.name, m.method, seed, m.role, config, meta))
    return runs


def expand_search(bench: BenchConfig) -> list[RunSpec]:
    """The learning-rate search runs of ``bench.lr_search`` (none without it): per searched cell,
    candidate lr and selection seed, labelled ``<method>@<lr>`` with role ``"lr-search"``."""
    search = bench.lr_search
    if search is None:
        return []
    runs: list[RunSpec] = []
    for model, task, m, seed, fields in grid_cells(bench, search.seeds):
        candidates = search.for_method(m)
        for lr in candidates or []:
            config = _cell_config(bench, m, fields)
            set_dotted(config, "train.lr", lr)
            label = search_label(m.name, lr)
            config["run"] = {"model": model, "task": task, "method": label, "seed": seed}
            meta = {"lr_search": {"method": m.name, "lr": lr, "candidates": candidates, "seeds": search.seeds,
                                  "metric": search.metric}}
            runs.append(RunSpec(model, task, label, m.method, seed, "lr-search", config, meta))
    return runs


def same_settings(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two resolved run configs that train the same thing: equal but for the run's label."""
    def strip(config: dict[str, Any]) -> dict[str, Any]:
        return {**config, "run": {k: v for k, v in config.get("run", {}).items() if k != "method"}}

    return canonical_json(strip(a)) == canonical_json(strip(b))


def parse_bench(data: dict[str, Any], base_dir: str | os.PathLike = ".") -> BenchConfig:
    """Build a ``BenchConfig`` from a parsed YAML/JSON mapping.

    Raises:
        ValueError: unknown top-level keys or malformed sections, all listed at once.
    """
    known = {"name", "seeds", "grid", "methods", "shared", "overrides", "exclude", "output",
             "max_attempts", "isolation", "timeout_s", "workers", "job", "description", "footprint_comparable",
             "lr_search", "reuse_from"}
    errors = [f"{k}: unknown benchmark key (known: {sorted(known)})" for k in sorted(set(data) - known)]
    grid, methods, overrides = [], [], []
    for i, entry in enumerate(data.get("grid") or []):
        if not isinstance(entry, dict) or "model" not in entry or "tasks" not in entry:
            errors.append(f"grid[{i}]={entry!r} is invalid: expected a mapping with 'model' and 'tasks'")
            continue
        tasks = entry["tasks"]
        grid.append((entry["model"], [tasks] if isinstance(tasks, str) else list(tasks)))
    for i, entry in enumerate(data.get("methods") or []):
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "name" not in entry:
            errors.append(f"methods[{i}]={entry!r} is invalid: expected a name or a mapping with 'name'")
            continue
        extra = set(entry) - {"name", "method", "adapter", "train", "role"}
        if extra:
            errors.append(f"methods[{i}] has unknown keys {sorted(extra)}")
        methods.append(MethodSpec(
            name=str(entry["name"]), method=str(entry.get("method", entry["name"])),
            adapter=dict(entry.get("adapter") or {}), train=dict(entry.get("train") or {}),
            role=entry.get("role", "main"),
        ))
    for i, entry in enumerate(data.get("overrides") or []):
        if not isinstance(entry, dict) or set(entry) != {"where", "set"}:
            errors.append(f"overrides[{i}]={entry!r} is invalid: expected a mapping with exactly 'where' and 'set'")
            continue
        overrides.append(Override(dict(entry["where"]), dict(entry["set"])))
    lr_search = _parse_lr_search(data.get("lr_search"), errors)
    if errors:
        raise ValueError("invalid benchmark config:\n  " + "\n  ".join(errors))
    seeds = data.get("seeds", [0])
    return BenchConfig(
        name=data.get("name", "bench"),
        seeds=list(seeds) if isinstance(seeds, (list, tuple)) else list(range(int(seeds))),
        grid=grid, methods=methods, shared=dict(data.get("shared") or {}), overrides=overrides,
        exclude=list(data.get("exclude") or []), output=data.get("output", "bench-results"),
        max_attempts=data.get("max_attempts", 2), isolation=data.get("isolation", "subprocess"),
        timeout_s=data.get("timeout_s"), workers=data.get("workers", 1), job=data.get("job", DEFAULT_JOB),
        description=data.get("description", ""), footprint_comparable=data.get("footprint_comparable", True),
        lr_search=lr_search, reuse_from=list(data.get("reuse_from") or []), base_dir=str(base_dir),
    )


def load_bench(path: str | os.PathLike, overrides: list[str] | None = None) -> BenchConfig:
    """Read a benchmark YAML file; ``overrides`` are ``"dotted.key=value"`` strings applied
    to the file's mapping before parsing (values parsed as YAML, e.g. ``seeds=[0]``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark config {path} does not exist")
    data = read_yaml(path) or {}
    check(isinstance(data, dict), str(path), type(data).__name__, "a YAML mapping at the top level")
    for item in overrides or []:
        check("=" in item, "--set", item, "'dotted.key=value'")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"--set {key.strip()}={raw!r} is invalid: not a YAML value "
                             f"({getattr(err, 'problem', None) or err})") from None
        set_dotted(data, key.strip(), value)
    return parse_bench(data, base_dir=path.resolve().parent)
