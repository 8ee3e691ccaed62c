"""Per-cell learning-rate selection for a benchmark with ``lr_search`` (see ``spec.LrSearch``).

For a cell ``c`` (model, task, method) with candidates ``η_1 … η_K`` and selection seeds ``S``:

    score(η) = mean_{s ∈ S} metric(run(c, η, s))          (NaN / missing → +∞)
    η*(c)    = argmin_η score(η)                         (ties: the earlier candidate)

``metric`` is a loss the training loop measures on examples held out of the training split
(``heldout_loss`` by default), so the scored evaluation split never influences the choice.
A cell is selected only when every candidate's runs for every selection seed have finished.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .spec import BenchConfig, RunSpec, expand_search
from .store import RunState


@dataclass
class Pending:
    """A cell whose selection cannot be made yet, and why."""

    cell: tuple[str, str, str]
    missing: list[str]  # run keys (model/task/label/seed) not finished


def _value(record: dict[str, Any] | None, metric: str) -> float:
    value = (record or {}).get("metrics", {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def select_lrs(bench: BenchConfig, states: dict[str, RunState]) -> tuple[dict[tuple[str, str, str], dict[str, Any]], list[Pending]]:
    """``({cell: {"lr", "metric", "scores", "seeds"}}, [cells still waiting])`` from the store's states.

    ``scores`` maps each candidate (as a string label) to its mean metric, so the report can show
    the whole choice.
    """
    if bench.lr_search is None:
        return {}, []
    by_cell: dict[tuple[str, str, str], list[RunSpec]] = {}
    for run in expand_search(bench):
        by_cell.setdefault((run.model, run.task, run.meta["lr_search"]["method"]), []).append(run)
    chosen: dict[tuple[str, str, str], dict[str, Any]] = {}
    waiting: list[Pending] = []
    metric = bench.lr_search.metric
    for cell, runs in by_cell.items():
        missing = [r.key.split("#")[0] for r in runs if states.get(r.key) is None or states[r.key].status != "ok"]
        if missing:
            waiting.append(Pending(cell, missing))
            continue
        candidates = runs[0].meta["lr_search"]["candidates"]
        scores: dict[float, float] = {}
        for lr in candidates:
            values = [_value(states[r.key].record, metric) for r in runs if r.meta["lr_search"]["lr"] == lr]
            scores[lr] = sum(values) / len(values) if all(math.isfinite(v) for v in values) else math.inf
        best = min(candidates, key=lambda lr: (scores[lr], candidates.index(lr)))
        chosen[cell] = {"lr": best, "metric": metric, "seeds": list(bench.lr_search.seeds),
                        "scores": {repr(lr): (None if math.isinf(v) else v) for lr, v in scores.items()}}
        if math.isinf(scores[best]):
            chosen[cell]["note"] = f"no candidate gave a finite {metric}; the first was taken"
    return chosen, waiting
