"""Report figures (PNG, matplotlib's Agg backend, so no display is needed).

- ``footprint_figure``: step time and peak memory per method (the paper's Fig. 1),
  bars grouped by (model, task), error bars one s.d. over seeds.
- ``curves_figure``: gradient norm and validation loss over training per method
  (Fig. 2) for one (model, task); lines are the mean over seeds, bands ± one s.d.
- ``lambda_figure``: the Hybrid's per-layer λ over training as a heatmap.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .tables import Cell

_MAX_POINTS = 60  # training curves are averaged into at most this many bins per run


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def footprint_figure(cells: list[Cell], path: Path, memory_key: str = "peak_memory_mb") -> Path:
    """Two panels (step time in s, peak memory in MiB); x = method, one bar per (model, task)."""
    plt = _pyplot()
    methods = list(dict.fromkeys(c.method for c in cells))
    settings = list(dict.fromkeys((c.model, c.task) for c in cells))
    by_key = {(c.model, c.task, c.method): c for c in cells}
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.9 * len(methods) + 2.0), 8.0))  # stacked: stays legible with many methods
    width = 0.8 / max(1, len(settings))
    x = np.arange(len(methods))
    panels = [("step_time_s", "Step time (s)", 1.0), (memory_key, "Peak memory (MiB)", 1.0)]
    for ax, (key, label, factor) in zip(axes, panels):
        for i, (model, task) in enumerate(settings):
            means, sds = [], []
            for method in methods:
                cell = by_key.get((model, task, method))
                vals = np.array(cell.footprint(key) if cell else [], dtype=float) * factor
                means.append(vals.mean() if vals.size else np.nan)
                sds.append(vals.std(ddof=1) if vals.size > 1 else 0.0)
            ax.bar(x + (i - (len(settings) - 1) / 2) * width, means, width, yerr=sds, capsize=3, label=f"{model} · {task}")
        ax.set_xticks(x, methods, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.set_xlabel("Method")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("Time per optimizer step")
    axes[1].set_title("Peak memory during training")
    axes[0].legend(fontsize=8, title="model · task", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a bar
    fig.suptitle("Training footprint per method (bars: mean over seeds, whiskers: ± 1 s.d.)")
    fig.tight_layout()
    return _save(fig, path)


def _series(records: list[dict[str, Any]], section: str, field: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per record, (steps, values) for ``curves[section][*][field]``, binned to at most _MAX_POINTS."""
    out = []
    for r in records:
        rows = [p for p in (r.get("curves") or {}).get(section, []) if p.get(field) is not None and p.get("step") is not None]
        if not rows:
            continue
        steps = np.array([p["step"] for p in rows], dtype=float)
        vals = np.array([p[field] for p in rows], dtype=float)
        if len(steps) > _MAX_POINTS:
            bins = np.array_split(np.arange(len(steps)), _MAX_POINTS)
            steps = np.array([steps[b].mean() for b in bins])
            vals = np.array([np.nanmean(vals[b]) for b in bins])
        out.append((steps, vals))
    return out


def _mean_band(series: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and s.d. across seeds on the steps all seeds share (early stopping may cut some short)."""
    n = min(len(s) for s, _ in series)
    steps = series[0][0][:n]
    stack = np.stack([v[:n] for _, v in series])
    sd = stack.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(n)
    return steps, stack.mean(axis=0), sd


def curves_figure(cells: list[Cell], path: Path, title: str) -> Path:
    """Left: training gradient norm; right: validation loss; x = optimizer step."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for cell in cells:
        for ax, section, field in ((left, "train", "grad_norm"), (right, "eval", "val_loss")):
            series = _series(cell.records, section, field)
            if not series:
                continue
            steps, mean, sd = _mean_band(series)
            (line,) = ax.plot(steps, mean, marker="o" if len(steps) <= 12 else None, ms=3, label=cell.method)
            ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
    left.set_xlabel("Optimizer step")
    left.set_ylabel("Gradient norm ‖∇θ L‖₂ before clipping")
    left.set_title("Gradient norm during training")
    right.set_xlabel("Optimizer step")
    right.set_ylabel("Validation loss (cross-entropy, nats)")
    right.set_title("Validation loss")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, title="method")
    fig.suptitle(f"{title} (lines: mean over seeds, bands: ± 1 s.d.)")
    fig.tight_layout()
    return _save(fig, path)


def lambda_matrix(records: list[dict[str, Any]]) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(layer names, steps, λ of shape (layers, steps)) averaged over the seeds that share a shape."""
    histories = [r["lambda_history"] for r in records if r.get("lambda_history") and r["lambda_history"].get("values")]
    if not histories:
        return None
    first = histories[0]
    shape = np.asarray(first["values"], dtype=float).shape
    same = [np.asarray(h["values"], dtype=float) for h in histories if np.asarray(h["values"], dtype=float).shape == shape]
    values = np.mean(same, axis=0)  # (steps, layers)
    return list(first["layers"]), np.asarray(first["steps"], dtype=float), values.T


def lambda_figure(cell: Cell, path: Path, title: str) -> Path | None:
    """Heatmap of λ per adapted layer (rows) over training steps (columns)."""
    data = lambda_matrix(cell.records)
    if data is None:
        return None
    layers, steps, values = data
    plt = _pyplot()
    height = min(14.0, 3.5 + 0.12 * len(layers))
    fig, ax = plt.subplots(figsize=(9, height))
    # Colour range from the data: λ often moves in a narrow band, which a fixed [0, 1] scale would hide.
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if high - low < 1e-6:
        low, high = low - 0.05, high + 0.05
    image = ax.imshow(values, aspect="auto", origin="upper", cmap="viridis", vmin=low, vmax=high,
                      extent=(steps[0], steps[-1], len(layers) - 0.5, -0.5), interpolation="nearest")
    ax.set_xlabel("Optimizer step")
    ax.set_ylabel("Adapted layer")
    stride = max(1, len(layers) // 40)
    ax.set_yticks(range(0, len(layers), stride), [_short(n) for n in layers[::stride]], fontsize=6)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("λ (LoRA-GA branch weight)")
    seeds = len([r for r in cell.records if r.get("lambda_history")])
    ax.set_title(f"{title}: per-layer λ of {cell.method} (mean over {seeds} seed{'s' if seeds != 1 else ''})")
    fig.tight_layout()
    return _save(fig, path)


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``3.self_attn.q_proj`` (the common prefix says nothing)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i:])
    return name
