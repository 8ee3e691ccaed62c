"""The default benchmark job: one run of ``hybridpeft.train`` turned into a result record.

A run's resolved benchmark config carries the training job's own sections
(``model``, ``data``, ``adapter``, ``train``, ``fsdp``, ``eval``, ``output``, ``debug``; see
``hybridpeft.train.job_config``) plus ``run: {model, task, method, seed}``. The job
fills ``model.name``, ``data.task`` and ``train.seed`` from ``run``, trains in
``<run_dir>/train`` (fresh each attempt: a retry must not inherit a half-run),
and reads back what the loop logged:

- metrics: the task's scores after training (``results.json["after"]``, with its
  loss on the scored examples), and the last and best loss on the held-out
  training split (``heldout_loss``, ``best_heldout_loss``);
- curves: per-step loss and gradient norm (``train_log.jsonl``) and per-validation
  loss (``eval_log.jsonl``), each validation point also carrying the mean gradient
  norm of the steps since the previous one;
- λ history (Hybrid): per-layer λ from the step log's ``mixing`` entries,
  subsampled to at most ``MAX_LAMBDA_POINTS`` steps;
- footprint: mean step time (the first step is left out: it pays one-off
  allocation), the loop's peak memory, tunable and total parameter counts, and
  the training wall time.
"""
from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from typing import Any

MAX_LAMBDA_POINTS = 100
TRAIN_SECTIONS = ("model", "data", "adapter", "train", "fsdp", "eval", "output", "debug")


def job_mapping(config: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """The training job mapping for a resolved benchmark config."""
    run = config["run"]
    unknown = sorted(set(config) - set(TRAIN_SECTIONS) - {"run"})
    if unknown:
        raise ValueError(f"benchmark sections {unknown} are invalid: expected only the training sections {list(TRAIN_SECTIONS)}")
    mapping = {k: copy.deepcopy(v) for k, v in config.items() if k in TRAIN_SECTIONS}
    mapping.setdefault("model", {})["name"] = run["model"]
    mapping.setdefault("data", {})["task"] = run["task"]
    train = mapping.setdefault("train", {})
    train["seed"] = run["seed"]
    train.setdefault("progress", False)  # the grid has its own progress bar; step bars would flood worker.log
    output = mapping.setdefault("output", {})
    output["run_dir"] = str((run_dir or Path("runs/bench-validate")) / "train")
    output["overwrite"] = True
    return mapping


def validate(config: dict[str, Any]) -> None:
    """Check a run's training settings before the grid starts (no model is loaded).

    Raises:
        ValueError: every invalid field (the training config's ``ConfigError``).
    """
    from ..train import load_config

    load_config(data=job_mapping(config))


def run_training_job(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train and evaluate one benchmark run; see the module docstring for what is returned."""
    from ..tasks import get_task
    from ..train import load_config, train

    job = load_config(data=job_mapping(config, run_dir))
    started = time.perf_counter()
    result = train(job)
    train_time = time.perf_counter() - started
    out_dir = Path(result.run_dir)
    steps = _read_jsonl(out_dir / "train_log.jsonl")
    evals = _read_jsonl(out_dir / "eval_log.jsonl")
    task = get_task(job.data.task, **job.data.task_args)

    metrics = final_metrics(result.after, evals, result.best_val_loss, result.step)
    primary = task.metric if task.metric in metrics else next(iter(metrics))

    tunable, total = _parameter_counts(out_dir, job)
    step_times = [float(s["step_time_s"]) for s in steps if _is_number(s.get("step_time_s"))]
    timed = step_times[1:] if len(step_times) > 1 else step_times
    peaks = [float(s["peak_mem_mb"]) for s in steps if _is_number(s.get("peak_mem_mb"))]
    footprint = {
        "step_time_s": sum(timed) / len(timed) if timed else None,
        "peak_memory_mb": max(peaks) if peaks else None,
        "peak_memory_kind": next((s.get("peak_mem_kind") for s in steps if s.get("peak_mem_kind")), None),
        "tunable_params": tunable, "total_params": total, "train_time_s": train_time,
    }
    return {
        "metrics": metrics, "primary_metric": primary,
        "curves": {"train": [{k: s.get(k) for k in ("step", "loss", "grad_norm", "lr")} for s in steps],
                   "eval": _eval_curve(evals, steps)},
        "lambda_history": lambda_history(steps),
        "footprint": footprint,
        "stop_reason": result.stop_reason, "skipped_steps": result.skipped_steps,
        "before": result.before,
        "data": _read_results(out_dir).get("data"),  # where the training, validation and scored examples came from
        "job_config": job.to_dict(),  # every setting as the loop saw it, defaults included
    }


def final_metrics(after: dict[str, Any] | None, evals: list[dict[str, Any]], best_heldout: float | None,
                  steps: int) -> dict[str, float]:
    """A run's metrics: the task's scores after training, as the task reported them (``val_loss`` /
    ``val_ppl`` there are the loss on the scored evaluation examples), plus the loop's periodic
    validation on the held-out training split as ``heldout_loss`` (last) and ``best_heldout_loss``.
    The two losses are kept apart: they are measured on different examples."""
    metrics: dict[str, float] = {k: float(v) for k, v in (after or {}).items() if _is_number(v)}
    if evals:
        metrics["heldout_loss"] = float(evals[-1]["val_loss"])
    if best_heldout is not None:
        metrics["best_heldout_loss"] = float(best_heldout)
    metrics["steps"] = float(steps)
    return metrics


run_training_job.validate = validate  # type: ignore[attr-defined]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _eval_curve(evals: list[dict[str, Any]], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation points, each with the mean gradient norm of the steps since the previous point."""
    out, previous = [], 0
    for point in evals:
        norms = [float(s["grad_norm"]) for s in steps
                 if previous < s["step"] <= point["step"] and _is_number(s.get("grad_norm"))]
        out.append({"step": point["step"], "val_loss": point.get("val_loss"),
                    "grad_norm": sum(norms) / len(norms) if norms else None})
        previous = point["step"]
    return out


def _natural_key(name: str) -> list[Any]:
    """``layers.10`` after ``layers.2``: digits compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def lambda_history(steps: list[dict[str, Any]], max_points: int = MAX_LAMBDA_POINTS) -> dict[str, Any] | None:
    """``{"layers", "steps", "values"}`` from the step log's ``mixing`` entries; None if there are none."""
    rows = [s for s in steps if s.get("mixing")]
    if not rows:
        return None
    layers = sorted({name for s in rows for name, v in s["mixing"].items() if "lambda" in v}, key=_natural_key)
    if not layers:
        return None
    stride = max(1, -(-len(rows) // max_points))
    picked = rows[::stride]
    if picked[-1] is not rows[-1]:
        picked.append(rows[-1])
    return {"layers": layers, "steps": [s["step"] for s in picked],
            "values": [[s["mixing"].get(n, {}).get("lambda") for n in layers] for s in picked]}


def _read_results(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _parameter_counts(out_dir: Path, job: Any) -> tuple[int | None, int | None]:
    """(tunable, total) parameters: from the run's results if the loop recorded them,
    else by rebuilding the adapted model (injection only, no training)."""
    results = _read_results(out_dir)
    if _is_number(results.get("trainable_params")) and _is_number(results.get("total_params")):
        return int(results["trainable_params"]), int(results["total_params"])
    from ..api import count_trainable
    from ..train.setup import build_task, load_job_model, prepare_model

    task = build_task(job)
    model, _ = load_job_model(job, job.model_name(task.kind), task)
    model = prepare_model(model, job, task)
    return count_trainable(model), sum(p.numel() for p in model.parameters())
