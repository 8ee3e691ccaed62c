"""The report's tables, built from finished run records.

- ``main_tables``: the paper's Table I layout — one table per task, a row per
  method, per model the per-seed values, mean ± s.d., and Welch's p against the
  reference method (LoRA); † marks p < 0.05.
- ``ablation_table``: Table II — LoRA-only, BOFT-only and every Hybrid variant
  (fixed λ, anneal, adaptive), mean ± s.d.; ‡ marks p < 0.05 against the
  adaptive Hybrid.
- ``footprint_table``: Table VII — step time, peak memory, tunable parameters,
  with ratios to LoRA.
- ``metrics_table``: every metric a task reported (validation loss included).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from .stats import Summary, Welch, summarize, welch

METHOD_ORDER = ("full", "lora", "lora_ga", "boft", "unitary", "hybrid")  # the paper's row order
PERCENT_METRICS = ("accuracy", "exact_match", "macro_accuracy", "f1", "pass@1", "pass@10")
DAGGER, DDAGGER = "†", "‡"
EXTRA_LABEL = " (extra: not in the paper's tables)"  # rows of role "extra"


@dataclass
class Table:
    """A rendered table: strings only, so Markdown and HTML print the same thing."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Cell:
    """All finished seeds of one (model, task, method)."""

    model: str
    task: str
    method: str
    adapter_method: str
    role: str
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.records[0]["primary_metric"]

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.records]

    def values(self, metric: str | None = None) -> list[float]:
        """The finite values of ``metric`` (default: the primary one) over the seeds that have one."""
        name = metric or self.metric
        return [v for v in (_number(r["metrics"].get(name)) for r in self.records) if v is not None]

    def footprint(self, name: str) -> list[float]:
        return [v for v in (_number((r.get("footprint") or {}).get(name)) for r in self.records) if v is not None]

    @property
    def label(self) -> str:
        """The row label: the method name, marked when the paper does not report this baseline."""
        return self.method + (EXTRA_LABEL if self.role == "extra" else "")

    def schedule(self) -> str | None:
        """The Hybrid's λ schedule as configured (``None`` for other methods)."""
        if self.adapter_method != "hybrid":
            return None
        return str(self.records[0]["config"].get("adapter", {}).get("schedule", "adaptive"))


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (absent, not a number, NaN or ±inf: left out of statistics)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def build_cells(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], Cell]:
    """Group finished records by (model, task, method), seeds sorted.

    Order: models and tasks as first seen; within them the paper's method order
    (``METHOD_ORDER``), main rows before ablation rows, then first seen — so tables
    do not depend on which run happened to finish first.
    """
    cells: dict[tuple[str, str, str], Cell] = {}
    for r in records:
        key = (r["model"], r["task"], r["method"])
        if key not in cells:
            cells[key] = Cell(r["model"], r["task"], r["method"], r.get("adapter_method", r["method"]), r.get("role", "main"))
        cells[key].records.append(r)
    for cell in cells.values():
        cell.records.sort(key=lambda r: r["seed"])
    models = list(dict.fromkeys(k[0] for k in cells))
    tasks = list(dict.fromkeys(k[1] for k in cells))
    seen = list(cells)

    def rank(key: tuple[str, str, str]) -> tuple[int, int, int, int, int]:
        cell = cells[key]
        method = METHOD_ORDER.index(cell.adapter_method) if cell.adapter_method in METHOD_ORDER else len(METHOD_ORDER)
        return (models.index(cell.model), tasks.index(cell.task), int(cell.role != "main"), method, seen.index(key))

    return {key: cells[key] for key in sorted(cells, key=rank)}


def is_percent(metric: str, values: Iterable[float]) -> bool:
    """Fraction-valued metrics (accuracy in [0, 1]) are shown in percent."""
    return metric in PERCENT_METRICS and all(0.0 <= v <= 1.0 for v in values)


def scale(metric: str, values: list[float]) -> tuple[list[float], str]:
    """Values in display units, and the unit suffix for headers."""
    if is_percent(metric, values):
        return [100.0 * v for v in values], " (%)"
    return list(values), ""


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def mean_sd(summary: Summary, digits: int = 2) -> str:
    return f"{summary.mean:.{digits}f} ± {summary.sd:.{digits}f}" if summary.n > 1 else f"{summary.mean:.{digits}f}"


def find_reference(cells: dict[tuple[str, str, str], Cell], model: str, task: str, reference: str) -> Cell | None:
    return cells.get((model, task, reference))


def adaptive_hybrid(cells: dict[tuple[str, str, str], Cell], model: str, task: str) -> Cell | None:
    """The main-role Hybrid with the adaptive schedule for a (model, task), if run: the row named
    ``hybrid`` when there is one (others may be the same schedule at other settings)."""
    found = [cell for (m, t, _), cell in cells.items()
             if (m, t) == (model, task) and cell.role == "main" and cell.schedule() == "adaptive"]
    return next((c for c in found if c.method == "hybrid"), found[0] if found else None)


def compare(cell: Cell, other: Cell | None) -> Welch | None:
    if other is None or other is cell:
        return None
    return welch(cell.values(), other.values(cell.metric))


def tasks_in(cells: dict[tuple[str, str, str], Cell]) -> list[str]:
    return list(dict.fromkeys(c.task for c in cells.values()))


def models_for(cells: dict[tuple[str, str, str], Cell], task: str) -> list[str]:
    return list(dict.fromkeys(c.model for c in cells.values() if c.task == task))


def main_tables(cells: dict[tuple[str, str, str], Cell], reference: str = "lora") -> list[Table]:
    """Table I: one table per task, main-role methods, then extra baselines (labelled as such)."""
    tables = []
    for task in tasks_in(cells):
        models = models_for(cells, task)
        in_table = [c for c in cells.values() if c.task == task and c.role in ("main", "extra")]
        in_table.sort(key=lambda c: c.role == "extra")  # stable: the paper's rows first, in their order
        methods = list(dict.fromkeys(c.method for c in in_table))
        labels = {c.method: c.label for c in in_table}
        if not methods:
            continue
        metric = next(c.metric for c in cells.values() if c.task == task)
        seeds = sorted({s for c in cells.values() if c.task == task for s in c.seeds})
        header = ["Method"]
        for model in models:
            header += [f"{model}: per seed", f"{model}: mean ± s.d.", f"{model}: Δ vs {reference}", f"{model}: p (Welch)"]
        rows = []
        for method in methods:
            row = [labels[method]]
            for model in models:
                cell = cells.get((model, task, method))
                if cell is None:
                    row += ["—"] * 4
                    continue
                ref = find_reference(cells, model, task, reference)
                shown, _ = scale(metric, cell.values())
                by_seed = dict(zip(cell.seeds, shown))
                test = compare(cell, ref)
                mark = DAGGER if test is not None and test.significant else ""
                delta = None
                if ref is not None and ref is not cell:
                    ref_shown, _ = scale(metric, ref.values(metric))
                    delta = summarize(shown).mean - summarize(ref_shown).mean
                row += [" / ".join(fmt(by_seed.get(seed)) for seed in seeds), mean_sd(summarize(shown)) + mark,
                        "—" if delta is None else f"{delta:+.2f}", fmt_p(None if test is None else test.p)]
            rows.append(row)
        for extra in (_before_row(cells, task, models, metric, seeds), _majority_row(cells, task, models, metric)):
            if extra is not None:
                rows.append(extra)
        _, unit = scale(metric, [v for c in cells.values() if c.task == task for v in c.values()])
        tables.append(Table(
            title=f"{task}: {metric}{unit}",
            header=header, rows=rows,
            note=(f"Per-seed values in seed order {seeds} (— = that seed did not finish); s.d. is the sample standard deviation (ddof = 1). "
                  f"{DAGGER}: p < 0.05 in Welch's two-sided t-test against {reference} (scipy.stats.ttest_ind, equal_var=False)."
                  + (" Rows marked extra are baselines the paper's tables do not have; no claim about the paper uses them."
                     if any(c.role == "extra" for c in in_table) else "")),
        ))
    return tables


def _before_row(cells: dict[tuple[str, str, str], Cell], task: str, models: list[str], metric: str,
                seeds: list[int]) -> list[str] | None:
    """The untouched base model's score (runs with ``eval.before``), per seed: every method of a seed
    scores the same base on the same examples, so the first record of each seed stands for all."""
    row, found = ["base model, before training"], False
    for model in models:
        by_seed = before_scores(cells, model, task)
        if not by_seed:
            row += ["—"] * 4
            continue
        found = True
        shown, _ = scale(metric, list(by_seed.values()))
        shown_by_seed = dict(zip(by_seed, shown))
        row += [" / ".join(fmt(shown_by_seed.get(seed)) for seed in seeds), mean_sd(summarize(shown)), "—", "—"]
    return row if found else None


def majority_class(cells: dict[tuple[str, str, str], Cell], model: str, task: str) -> float | None:
    """What always answering the most frequent label scores on (model, task)'s evaluation set,
    as the runs recorded it (``majority_class_accuracy``); None for other kinds of task."""
    for cell in cells.values():
        if (cell.model, cell.task) == (model, task):
            for record in cell.records:
                value = _number(record["metrics"].get("majority_class_accuracy"))
                if value is not None and cell.metric == "accuracy":
                    return value
    return None


def before_scores(cells: dict[tuple[str, str, str], Cell], model: str, task: str) -> dict[int, float]:
    """seed -> the untouched base model's primary score (runs with ``eval.before``, raw units).

    Every method of a seed scores the same base on the same examples, so the first record
    of each seed stands for all of them."""
    by_seed: dict[int, float] = {}
    for cell in cells.values():
        if (cell.model, cell.task) == (model, task):
            for record in cell.records:
                value = _number((record.get("before") or {}).get(cell.metric))
                if value is not None:
                    by_seed.setdefault(record["seed"], value)
    return by_seed


def zero_shot(cells: dict[tuple[str, str, str], Cell], model: str, task: str) -> float | None:
    """The base model's mean primary score before training, over the seeds that recorded it."""
    values = list(before_scores(cells, model, task).values())
    return summarize(values).mean if values else None


def score_floor(cells: dict[tuple[str, str, str], Cell], model: str, task: str) -> tuple[float, str] | None:
    """The score a method must beat to have learned anything: the higher of the majority-class
    accuracy and the untrained base model's score (raw units), with a name for it."""
    candidates = [(v, name) for v, name in ((majority_class(cells, model, task), "majority-class baseline"),
                                           (zero_shot(cells, model, task), "base model's score before training"))
                  if v is not None]
    return max(candidates) if candidates else None


def _majority_row(cells: dict[tuple[str, str, str], Cell], task: str, models: list[str], metric: str) -> list[str] | None:
    """What always predicting the most frequent label scores: the floor for a classifier."""
    row, found = ["majority class (constant prediction)"], False
    for model in models:
        value = majority_class(cells, model, task)
        if value is None:
            row += ["—"] * 4
            continue
        found = True
        shown, _ = scale(metric, [value])
        row += ["—", fmt(shown[0]), "—", "—"]
    return row if found else None


def ablation_table(cells: dict[tuple[str, str, str], Cell], singles: tuple[str, ...] = ("lora", "lora_ga", "boft")) -> Table | None:
    """Table II: single-branch baselines and every Hybrid schedule, per (model, task).

    Returns None when no Hybrid variant besides the adaptive one was run.
    """
    hybrids = [c for c in cells.values() if c.adapter_method == "hybrid" and c.role != "lr-search"]
    if not any(c.schedule() != "adaptive" for c in hybrids):
        return None
    settings = list(dict.fromkeys((c.model, c.task) for c in hybrids))
    methods = [m for m in singles if any(c.method == m for c in cells.values())]
    variants = sorted({c.method: c for c in hybrids if c.schedule() != "adaptive"}.values(), key=_variant_order)
    methods += [c.method for c in variants]
    methods += list(dict.fromkeys(c.method for c in hybrids if c.schedule() == "adaptive"))
    header = ["Method", "λ schedule"] + [f"{task} ({model})" for model, task in settings]
    rows = []
    for method in methods:
        sample = next(c for c in cells.values() if c.method == method)
        row = [method, _schedule_label(sample)]
        for model, task in settings:
            cell = cells.get((model, task, method))
            if cell is None:
                row.append("—")
                continue
            shown, unit = scale(cell.metric, cell.values())
            test = compare(cell, adaptive_hybrid(cells, model, task))
            mark = DDAGGER if test is not None and test.significant else ""
            row.append(f"{mean_sd(summarize(shown))}{mark}")
        rows.append(row)
    metrics = ", ".join(dict.fromkeys(f"{t}: {cells[next(k for k in cells if k[:2] == (m, t))].metric}" for m, t in settings))
    return Table(
        title="λ ablation (mean ± s.d. over seeds)",
        header=header, rows=rows,
        note=(f"Metrics: {metrics} (fractions shown in %). {DDAGGER}: p < 0.05 in Welch's t-test against the adaptive Hybrid "
              "of the same column. λ is the weight of the LoRA-GA branch; 1 − λ weights the BOFT branch."),
    )


def _variant_order(cell: Cell) -> tuple[int, float]:
    """Fixed λ by value, then anneal, then anything else."""
    adapter = cell.records[0]["config"].get("adapter", {})
    schedule = cell.schedule()
    return ({"fixed": 0, "anneal": 1}.get(schedule or "", 2), float(adapter.get("lam_fixed", 0.5)) if schedule == "fixed" else 0.0)


def _schedule_label(cell: Cell) -> str:
    if cell.adapter_method != "hybrid":
        return {"lora": "plain LoRA alone", "lora_ga": "λ = 1 (LoRA-GA branch alone)",
                "boft": "λ = 0 (BOFT branch alone)"}.get(cell.adapter_method, "—")
    adapter = cell.records[0]["config"].get("adapter", {})
    schedule = cell.schedule()
    if schedule == "fixed":
        value = adapter.get("lam_fixed", 0.5)
        return f"fixed λ = {value}" if value is not None else "fixed"
    if schedule == "anneal":
        start, end = adapter.get("anneal_start", 0.75), adapter.get("anneal_end", 0.25)
        return f"anneal {start} → {end}"
    return str(schedule)


def _ratio_text(values: list[float], reference: list[float]) -> str:
    """Mean ÷ reference mean as "1.23×"; "—" when either is missing or the reference reads 0."""
    if not values or not reference or summarize(reference).mean == 0:
        return "—"
    return f"{summarize(values).mean / summarize(reference).mean:.2f}×"


def not_comparable_reasons(cells: Iterable[Cell]) -> dict[str, int]:
    """Why records' footprints are marked not comparable, with how many records give each reason."""
    reasons: dict[str, int] = {}
    for cell in cells:
        for record in cell.records:
            footprint = record.get("footprint") or {}
            if footprint.get("comparable") is False:
                why = footprint.get("not_comparable_reason") or "marked not comparable"
                reasons[why] = reasons.get(why, 0) + 1
    return reasons


def footprint_table(cells: dict[tuple[str, str, str], Cell], reference: str = "lora") -> Table:
    """Table VII: per (model, task, method) the mean step time, peak memory and tunable parameters
    (learning-rate search runs left out)."""
    cells = {k: c for k, c in cells.items() if c.role != "lr-search"}
    mem_key = _memory_key(cells)
    rows = []
    for cell in cells.values():
        ref = cells.get((cell.model, cell.task, reference))
        step, mem = cell.footprint("step_time_s"), cell.footprint(mem_key)
        params, total = cell.footprint("tunable_params"), cell.footprint("total_params")
        ref_step = ref.footprint("step_time_s") if ref else []
        ref_mem = ref.footprint(mem_key) if ref else []
        rows.append([
            cell.model, cell.task, cell.label,
            mean_sd(summarize(step), 3) if step else "—",
            _ratio_text(step, ref_step),
            mean_sd(summarize(mem), 0) if mem else "—",
            _ratio_text(mem, ref_mem),
            f"{params[0] / 1e6:.3f}" if params else "—",
            f"{100.0 * params[0] / total[0]:.2f}" if params and total and total[0] else "—",
            fmt(summarize(cell.footprint("train_time_s")).mean, 1) if cell.footprint("train_time_s") else "—",
        ])
    kinds = {r.get("footprint", {}).get("peak_memory_kind") for c in cells.values() for r in c.records}
    if mem_key == "peak_rss_mb" or kinds <= {"cpu_max_rss"}:
        what = "peak memory (MiB) is the training process's peak resident set size (CPU: model, data, activations, optimizer state and the Python runtime)"
    else:
        what = "peak memory (MiB) is the device allocator's peak (torch.cuda.max_memory_allocated)"
    side = sorted({r["footprint"]["side_by_side_runs"] for c in cells.values() for r in c.records
                   if r.get("footprint", {}).get("side_by_side_runs")})
    threads = sorted({r["footprint"].get("worker_threads") for c in cells.values() for r in c.records
                      if r.get("footprint", {}).get("side_by_side_runs")} - {None})
    shared = (f" Runs went {'/'.join(map(str, side))} side by side ({'/'.join(map(str, threads)) or '?'} thread(s) each), "
              "so step times include contention for memory bandwidth; ratios within one store share that condition."
              if side else "")
    reasons = not_comparable_reasons(cells.values())
    total = sum(len(c.records) for c in cells.values())
    if reasons:
        listed = "; ".join(f"{why} ({n} of {total} runs)" for why, n in reasons.items())
        shared += (f" **Not comparable:** {listed}. Step times and memory here are shown for the record only; "
                   "the report draws no speed or memory verdict from them.")
    return Table(
        title="Training footprint (mean ± s.d. over seeds)",
        header=["Model", "Task", "Method", "Step time (s)", f"vs {reference}", "Peak memory (MiB)", f"vs {reference}",
                "Tunable params (M)", "Tunable (% of model)", "Train time (s)"],
        rows=rows,
        note=f"Step time is the mean wall time of one optimizer step (forward, backward, update); {what}.{shared}",
    )


def memory_key(cells: dict[tuple[str, str, str], Cell]) -> str:
    """Prefer the job's own peak-memory figure; fall back to the worker's peak RSS."""
    has = any(c.footprint("peak_memory_mb") for c in cells.values())
    return "peak_memory_mb" if has else "peak_rss_mb"


_memory_key = memory_key  # the earlier private name


def metrics_table(cells: dict[tuple[str, str, str], Cell]) -> Table:
    """Every metric each cell reported, mean over seeds (raw units)."""
    names = list(dict.fromkeys(name for c in cells.values() for r in c.records for name in r["metrics"]))
    rows = []
    for cell in cells.values():
        row = [cell.model, cell.task, cell.method, str(len(cell.records))]
        for name in names:
            vals = cell.values(name)
            row.append(fmt(summarize(vals).mean, 4) if vals else "—")
        rows.append(row)
    return Table(title="All reported metrics (mean over seeds, raw units)",
                 header=["Model", "Task", "Method", "Seeds"] + names, rows=rows)
