"""Tables that explain a report's numbers rather than rank methods.

- ``clipping_table``: per cell, the share of optimizer steps whose gradient norm exceeded
  ``train.max_grad_norm`` (and so were rescaled to it), and the median norm. A clip that cuts
  most of one method's steps and few of another's is not a neutral setting.
- ``lambda_table``: the adaptive Hybrid's final λ per projection kind (q/v/…), min–max over
  layers and seeds, per (model, task).
- ``lr_selection_table``: for a benchmark with ``lr_search``, each candidate's mean selection
  loss (with the scored metric beside it, for reading only) and the lr chosen.
"""
from __future__ import annotations

import statistics
from typing import Any

from .spec import lr_label
from .stats import summarize
from .tables import Cell, Table, fmt, scale


def _clip_threshold(record: dict[str, Any]) -> float | None:
    for source in (record.get("job_config"), record.get("config")):
        train = (source or {}).get("train") or {}
        if "max_grad_norm" in train:
            return train["max_grad_norm"]
    return 1.0  # TrainSection's default


def clipping_table(cells: dict[tuple[str, str, str], Cell]) -> Table | None:
    """None when no record carries per-step gradient norms."""
    rows = []
    for cell in cells.values():
        if cell.role == "lr-search":
            continue
        shares, norms, threshold = [], [], None
        for record in cell.records:
            steps = [float(p["grad_norm"]) for p in (record.get("curves") or {}).get("train", [])
                     if isinstance(p.get("grad_norm"), (int, float))]
            if not steps:
                continue
            threshold = _clip_threshold(record)
            norms += steps
            shares.append(0.0 if threshold is None else sum(n > threshold for n in steps) / len(steps))
        if not shares:
            continue
        shown = [100.0 * x for x in shares]
        rows.append([cell.model, cell.task, cell.method, "none" if threshold is None else fmt(threshold),
                     f"{summarize(shown).mean:.0f}" + (f" ({min(shown):.0f}–{max(shown):.0f})" if len(shown) > 1 else ""),
                     f"{statistics.median(norms):.2f}"])
    if not rows:
        return None
    return Table("Gradient clipping", ["Model", "Task", "Method", "Clip at", "Steps clipped (%, mean (min–max) over seeds)",
                                       "Median gradient norm"], rows,
                 "A step is clipped when its global gradient norm (before clipping) exceeds the threshold; "
                 "AdamW then sees the gradient rescaled to the threshold.")


def _projection(layer: str) -> str:
    return layer.rsplit(".", 1)[-1]


def lambda_table(cells: dict[tuple[str, str, str], Cell]) -> Table | None:
    """Final λ of every Hybrid cell with a λ history, by projection kind. None when there is none."""
    rows = []
    for cell in cells.values():
        if cell.adapter_method != "hybrid" or cell.role == "lr-search":
            continue
        finals: dict[str, list[float]] = {}
        for record in cell.records:
            history = record.get("lambda_history") or {}
            if not history.get("values"):
                continue
            for layer, value in zip(history["layers"], history["values"][-1]):
                if value is not None:
                    finals.setdefault(_projection(layer), []).append(float(value))
        for kind, values in finals.items():
            rows.append([cell.model, cell.task, cell.method, kind, f"{min(values):.2f}–{max(values):.2f}",
                         f"{summarize(values).mean:.2f}", str(len(values))])
    if not rows:
        return None
    return Table("Final λ by projection", ["Model", "Task", "Method", "Projection", "Final λ (min–max)", "Mean",
                                          "Layers × seeds"], rows,
                 "λ weights the LoRA-GA branch (1 − λ the BOFT branch) at the last logged step; a fixed schedule's λ "
                 "does not move.")


def lr_selection_table(cells: dict[tuple[str, str, str], Cell]) -> Table | None:
    """None when no run of the store came from an lr search."""
    searched = [c for c in cells.values() if c.role == "lr-search"]
    if not searched:
        return None
    rows = []
    groups: dict[tuple[str, str, str], list[Cell]] = {}
    for cell in searched:
        info = cell.records[0].get("lr_search") or {}
        groups.setdefault((cell.model, cell.task, info.get("method", cell.method.split("@")[0])), []).append(cell)
    for (model, task, method), group in groups.items():
        info = group[0].records[0].get("lr_search") or {}
        metric = info.get("metric", "heldout_loss")
        final = cells.get((model, task, method))
        chosen = next((r.get("lr_selected") for r in (final.records if final else []) if r.get("lr_selected")), None)
        parts = []
        for cell in sorted(group, key=lambda c: float((c.records[0].get("lr_search") or {}).get("lr", 0.0))):
            lr = (cell.records[0].get("lr_search") or {}).get("lr")
            losses = cell.values(metric)
            scored, _ = scale(cell.metric, cell.values())
            mark = "**" if chosen and lr == chosen["lr"] else ""
            loss_text = f"{summarize(losses).mean:.3f}" if losses else "—"
            score_text = f"{summarize(scored).mean:.1f}" if scored else "—"
            parts.append(f"{mark}{cell.method.split('@', 1)[1]}{mark}: {loss_text} ({score_text})")
        rows.append([model, task, method, " · ".join(parts),
                     "waiting" if chosen is None else (lr_label(chosen["lr"]) + (f" ({chosen['note']})" if chosen.get("note") else ""))])
    seeds = sorted({s for c in searched for s in c.seeds})
    return Table("Learning-rate selection", ["Model", "Task", "Method",
                                             f"Candidates: mean {metric} over seeds {seeds} (scored metric, for reading only)",
                                             "Chosen lr"], rows,
                 f"Each cell's lr is the candidate with the lowest mean {metric}, a loss on examples held out of the "
                 "training split; the scored evaluation split plays no part in the choice. The final runs (the tables "
                 "above) use the chosen lr for every seed; a final run identical to a search run reuses its record.")
