"""The paper's multilingual layouts (Tables III–VI) from finished cells.

- ``language_tables``: XNLI accuracy per language with the macro average (Tables III/IV); a
  language the run asked for but had no data for shows "no data", and the macro is shown only
  when every asked language has data (a macro over English alone is not the paper's macro).
- ``direction_tables``: BLEU per translation direction with their average (Tables V/VI).
- ``direction_average_cells``: per (model, method) a cell whose value per seed is the mean BLEU
  over the directions, so the paper's "average BLEU" claims get a verdict like any other cell.
"""
from __future__ import annotations

import re
from typing import Any

from .stats import summarize
from .tables import Cell, Table, mean_sd

LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "hi": "Hindi", "es": "Spanish", "fr": "French", "de": "German",
                  "ar": "Arabic", "bg": "Bulgarian", "el": "Greek", "ru": "Russian", "sw": "Swahili", "th": "Thai",
                  "tr": "Turkish", "ur": "Urdu", "vi": "Vietnamese"}
_DIRECTION = re.compile(r"^translate-en-([a-z]{2,3})$")


def _main(cells: dict[tuple[str, str, str], Cell]) -> list[Cell]:
    return [c for c in cells.values() if c.role == "main"]


def asked_languages(cell: Cell) -> list[str]:
    """The languages a cell's runs asked for (``task_args.languages``), else those they reported."""
    config = cell.records[0].get("config", {})
    asked = (config.get("data", {}).get("task_args") or {}).get("languages")
    if isinstance(asked, str):
        asked = [x.strip() for x in asked.split(",") if x.strip()]
    if asked:
        return list(asked)
    found = {k[len("accuracy_"):] for r in cell.records for k in r["metrics"] if k.startswith("accuracy_")}
    return sorted(found & set(LANGUAGE_NAMES))


def language_tables(cells: dict[tuple[str, str, str], Cell]) -> list[Table]:
    """One table per task whose runs report per-language accuracy (``accuracy_<lang>``)."""
    tables = []
    for task in dict.fromkeys(c.task for c in _main(cells)):
        group = [c for c in _main(cells) if c.task == task]
        if not any(k.startswith("accuracy_") and k[len("accuracy_"):] in LANGUAGE_NAMES
                   for c in group for r in c.records for k in r["metrics"]):
            continue
        languages = list(dict.fromkeys(lang for c in group for lang in asked_languages(c)))
        header = ["Method"] + [f"{LANGUAGE_NAMES.get(x, x)} ({x})" for x in languages] + ["Macro"]
        rows = []
        for model in dict.fromkeys(c.model for c in group):
            for cell in (c for c in group if c.model == model):
                rows.append([f"{cell.method}" + (f" ({model})" if len({c.model for c in group}) > 1 else "")]
                            + _language_row(cell.records, languages, lambda r: r["metrics"]))
            base = [r for c in group if c.model == model for r in c.records if r.get("before")]
            if base:
                first_per_seed = list({r["seed"]: r for r in reversed(base)}.values())
                rows.append(["base model, before training"] + _language_row(first_per_seed, languages, lambda r: r["before"]))
        missing = [x for x in languages if all(r[1 + languages.index(x)] == "no data" for r in rows)]
        note = ("Accuracy in %, mean ± s.d. over seeds. Macro is the unweighted mean over the languages in the "
                "header, per seed, shown only when every one of them has data.")
        if missing:
            note += (f" No data for {', '.join(LANGUAGE_NAMES.get(x, x) for x in missing)}: the runs asked for it, but "
                     "neither a local file nor the hub could provide it, so it was left out of training and scoring.")
        tables.append(Table(f"{task}: accuracy per language (Table III/IV layout)", header, rows, note))
    return tables


def _language_row(records: list[dict[str, Any]], languages: list[str], source: Any) -> list[str]:
    out, per_seed_macro = [], []
    for lang in languages:
        values = [100.0 * float(source(r)[f"accuracy_{lang}"]) for r in records if f"accuracy_{lang}" in source(r)]
        out.append(mean_sd(summarize(values)) if values else "no data")
    for r in records:
        scores = source(r)
        if all(f"accuracy_{x}" in scores for x in languages):
            per_seed_macro.append(100.0 * sum(float(scores[f"accuracy_{x}"]) for x in languages) / len(languages))
    complete = len(per_seed_macro) == len(records) and bool(records)
    out.append(mean_sd(summarize(per_seed_macro)) if complete else "no data")
    return out


def directions(cells: dict[tuple[str, str, str], Cell], model: str) -> list[tuple[str, str]]:
    """(task, target code) of the ``translate-en-xx`` tasks run on ``model``."""
    found = []
    for task in dict.fromkeys(c.task for c in _main(cells) if c.model == model):
        m = _DIRECTION.match(task)
        if m:
            found.append((task, m.group(1)))
    return found


def _per_seed(cell: Cell | None, before: bool = False) -> dict[int, float]:
    """seed -> the cell's primary score after training (or the base model's, before)."""
    if cell is None:
        return {}
    if before:
        return {r["seed"]: float(r["before"][cell.metric]) for r in cell.records
                if (r.get("before") or {}).get(cell.metric) is not None}
    return {r["seed"]: float(r["metrics"][cell.metric]) for r in cell.records if cell.metric in r["metrics"]}


def direction_tables(cells: dict[tuple[str, str, str], Cell]) -> list[Table]:
    """BLEU per translation direction and their average, per model with at least one direction."""
    tables = []
    for model in dict.fromkeys(c.model for c in _main(cells)):
        dirs = directions(cells, model)
        if not dirs:
            continue
        methods = list(dict.fromkeys(c.method for c in _main(cells) if c.model == model and c.task in dict(dirs)))
        header = ["Method"] + [f"en→{code}" for _, code in dirs] + (["Average"] if len(dirs) > 1 else [])
        rows = []
        for method in methods:
            per_dir = [_per_seed(cells.get((model, task, method))) for task, _ in dirs]
            rows.append([method] + _direction_row(per_dir))
        befores = []
        for task, _ in dirs:
            found: dict[int, float] = {}
            for method in methods:
                for seed, value in _per_seed(cells.get((model, task, method)), before=True).items():
                    found.setdefault(seed, value)
            befores.append(found)
        if any(befores):
            rows.append(["base model, before training"] + _direction_row(befores))
        metric = next(c.metric for c in _main(cells) if c.model == model and c.task == dirs[0][0])
        tables.append(Table(
            f"{model}: translation, {metric} per direction (Table V/VI layout)", header, rows,
            f"{metric} (sacreBLEU, 0–100; case-sensitive, on the detokenized first line of each generation; "
            "the zh tokenizer for Chinese), mean ± s.d. over seeds. Average: the mean over the directions, per seed "
            "(seeds present in every direction)."))
    return tables


def _direction_row(per_dir: list[dict[int, float]]) -> list[str]:
    out = [mean_sd(summarize(list(d.values()))) if d else "no data" for d in per_dir]
    if len(per_dir) > 1:
        seeds = sorted(set.intersection(*(set(d) for d in per_dir))) if all(per_dir) else []
        means = [sum(d[s] for d in per_dir) / len(per_dir) for s in seeds]
        out.append(mean_sd(summarize(means)) if means else "no data")
    return out


def direction_average_cells(cells: dict[tuple[str, str, str], Cell]) -> dict[tuple[str, str, str], Cell]:
    """Per model with two or more directions, a pseudo-task ``translation (mean over en→zh, en→es)``
    whose records carry, per seed, the mean of the directions' primary metric (and of the base
    model's scores before training, when every direction recorded one)."""
    out: dict[tuple[str, str, str], Cell] = {}
    for model in dict.fromkeys(c.model for c in _main(cells)):
        dirs = directions(cells, model)
        if len(dirs) < 2:
            continue
        task = "translation (mean over " + ", ".join(f"en→{code}" for _, code in dirs) + ")"
        for method in dict.fromkeys(c.method for c in _main(cells) if c.model == model and c.task == dirs[0][0]):
            parts = [cells.get((model, t, method)) for t, _ in dirs]
            if any(p is None for p in parts):
                continue
            metric = parts[0].metric
            values = [_per_seed(p) for p in parts]
            befores = [_per_seed(p, before=True) for p in parts]
            seeds = sorted(set.intersection(*(set(v) for v in values)))
            records = []
            for seed in seeds:
                record: dict[str, Any] = {"seed": seed, "primary_metric": metric, "footprint": {}, "config": {},
                                          "metrics": {metric: sum(v[seed] for v in values) / len(values)}}
                if all(seed in b for b in befores):
                    record["before"] = {metric: sum(b[seed] for b in befores) / len(befores)}
                records.append(record)
            if records:
                out[(model, task, method)] = Cell(model, task, method, parts[0].adapter_method, parts[0].role, records)
    return out

