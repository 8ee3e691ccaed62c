"""How close LoRA-GA's sketched start is to the exact one, on SmolLM2-135M with real batches.

For each task (SST-2 as a verbalizer, GSM8K), on the offline SmolLM2-135M-Instruct (float32),
LoRA-GA r = 8 on all seven projections of the 30 blocks (210 layers):

1. The exact estimate ``G`` of every layer (``estimator="exact"``, the library's default
   ``num_batches = 8`` batches) and its start ``(A0, B0)``.
2. For each sketch size ``k`` and number of passes: the sketch of the same ``G`` (the sketch
   is linear, so sketching the mean equals streaming the batches up to float rounding — step
   4 checks it) and its start. Per layer: the largest principal angle between the sketch's
   and the exact start's subspaces — the row space of ``A0`` (r = 8 right singular vectors)
   and the column space of ``B0`` (singular vectors r+1 … 2r) — and the gradient energy the
   sketched start captures relative to the exact one (``‖G P_A‖²``, ``‖P_B G‖²``).
3. First-step alignment of each start: one plain SGD step of the adapter on 4 further
   batches, then per layer ``cos(ΔW_eff, −∇W)`` with ``ΔW_eff = s(BA − B0A0)`` and ``∇W`` the
   full-weight gradient on those batches (the LoRA-GA paper's motivation: the first LoRA
   step should point along the full gradient). Plain LoRA (B = 0) is the reference row.
4. The real code path at the default settings: ``lora_ga_init(estimator="sketch")`` streamed
   from the batches on the unchanged model, against step 2's sketch of the dense ``G``.

    python benchmarks/lora_ga_sketch_accuracy.py [--tasks sst2 gsm8k] [--ks 24 32 64] [--out docs/perf]

Writes ``<out>/lora-ga-sketch-accuracy.{json,md}``. Roughly 10 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
try:  # a fresh checkout without `pip install -e .` still runs
    import hybridpeft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

import hybridpeft as hp  # noqa: E402
from hybridpeft.gradient_sketch import GradientSketch, SubspaceSketch  # noqa: E402
from hybridpeft.gradient_init import estimate_gradients, lora_ga_targets, start_factors  # noqa: E402
from hybridpeft.models import load_causal_lm  # noqa: E402
from hybridpeft.tasks import get_task  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R = 8


def max_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle in degrees between the column spans of a and b (any bases)."""
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    cos = torch.linalg.svdvals(qa.t() @ qb).min().clamp(max=1.0).item()
    return math.degrees(math.acos(cos))


def batches_for(task_name: str, tokenizer, n: int, batch_size: int, max_length: int, offset: int) -> list[dict]:
    task = get_task(task_name)
    examples = task.load(task.train_split if hasattr(task, "train_split") else "train", None,
                         (offset + n) * batch_size, 0)
    rows = examples[offset * batch_size:(offset + n) * batch_size]
    return [task.encode(tokenizer, rows[i * batch_size:(i + 1) * batch_size], max_length) for i in range(n)]


def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p90": ordered[int(0.9 * (len(ordered) - 1))], "max": ordered[-1],
            "mean": statistics.fmean(ordered)}


def first_step_alignment(model, step_batches: list[dict], full_grads: dict[str, torch.Tensor], lr: float) -> dict[str, float]:
    """One SGD step of the adapter parameters on ``step_batches``; per layer cos(ΔW_eff, −∇W)."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = {n: layer.adapter.delta_weight().detach().clone() if hasattr(layer.adapter, "delta_weight")
              else None for n, layer in hp.adapted_layers(model)}
    model.zero_grad(set_to_none=True)
    for batch in step_batches:
        (model(**batch).loss / len(step_batches)).backward()
    with torch.no_grad():
        for p in params:
            p.add_(p.grad, alpha=-lr)
    model.zero_grad(set_to_none=True)
    out = {}
    for name, layer in hp.adapted_layers(model):
        delta = (layer.adapter.delta_weight().detach() - before[name]).double().reshape(-1)
        g = full_grads[name].double().reshape(-1)
        out[name] = (-(delta @ g) / (delta.norm() * g.norm()).clamp_min(1e-300)).item()
    return out


def energy(g: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    """‖G P‖_F² (right side: P projects onto the span of basis's columns in d_in) or ‖P G‖_F² (left)."""
    q, _ = torch.linalg.qr(basis.double())
    g = g.double()
    return float((g @ q).square().sum() if side == "right" else (q.t() @ g).square().sum())


def variant_start(g: torch.Tensor, part, name: str, k: int, passes: int):
    d_out, d_in = g.shape
    kk = min(k, d_out, d_in)
    sketch = (GradientSketch(d_out, d_in, kk, seed=part.ga_config.sketch_seed, name=name) if passes == 1 else
              SubspaceSketch(d_out, d_in, kk, seed=part.ga_config.sketch_seed, name=name, passes=passes))
    for _ in range(passes):
        sketch.add_matrix(g)
        sketch.end_pass()
    return start_factors(sketch.low_rank(2 * R), part.ga_config, scaling=part.scaling)


def run_task(task_name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm()
    model.train()
    n_init = hp.LoraGAConfig().num_batches
    init_batches = batches_for(task_name, tokenizer, n_init, args.batch_size, args.max_length, offset=0)
    step_batches = batches_for(task_name, tokenizer, 4, args.batch_size, args.max_length, offset=n_init)
    hp.inject(model, hp.LoraGAConfig(target_modules=TARGETS, r=R, estimator="exact"))
    targets = lora_ga_targets(model)
    weights = {n: layer.base_layer.weight for n, (layer, _) in targets.items()}
    t0 = time.perf_counter()
    grads = hp.lora_ga_init(model, init_batches)  # exact G and the exact start
    exact_s = time.perf_counter() - t0
    exact_start = {n: (part.lora_A0.clone(), part.lora_B0.clone()) for n, (_, part) in targets.items()}
    step_grads = estimate_gradients(model, weights, step_batches, num_batches=len(step_batches))

    def set_starts(starts: dict) -> None:
        for name, (_, part) in targets.items():
            part.set_start(*starts[name])

    result: dict[str, Any] = {"task": task_name, "layers": len(targets), "exact_estimate_s": exact_s, "variants": {}}
    exact_energy = {n: (energy(grads[n], exact_start[n][0].t(), "right"), energy(grads[n], exact_start[n][1], "left"))
                    for n in targets}
    for passes in args.passes:
        for k in args.ks:
            rows: dict[str, list[float]] = {"A0": [], "B0": [], "energy_A0": [], "energy_B0": []}
            starts = {}
            for name, (_, part) in targets.items():
                a0, b0 = variant_start(grads[name], part, name, k, passes)
                starts[name] = (a0, b0)
                ea0, eb0 = exact_start[name]
                rows["A0"].append(max_angle(a0.t(), ea0.t()))
                rows["B0"].append(max_angle(b0, eb0))
                rows["energy_A0"].append(energy(grads[name], a0.t(), "right") / exact_energy[name][0])
                rows["energy_B0"].append(energy(grads[name], b0, "left") / exact_energy[name][1])
            set_starts(starts)
            row = {key: summarize(v) for key, v in rows.items()}
            row["alignment"] = summarize(list(first_step_alignment(model, step_batches, step_grads, args.lr).values()))
            result["variants"][f"k={k} passes={passes}"] = {"k": k, "passes": passes, **row}
            print(f"{task_name} k={k} passes={passes}: A0 median {row['A0']['median']:.2f}° B0 median "
                  f"{row['B0']['median']:.2f}° energy A0 {row['energy_A0']['median']:.3f} B0 {row['energy_B0']['median']:.3f} "
                  f"alignment {row['alignment']['median']:.3f}", flush=True)

    # the exact start against the full SVD (svd_lowrank, q = 4r, 4 power iterations)
    ref = {"A0": [], "B0": []}
    for name, g in grads.items():
        u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
        ea0, eb0 = exact_start[name]
        ref["A0"].append(max_angle(ea0.t(), vh[:R].t()))
        ref["B0"].append(max_angle(eb0, u[:, R:2 * R]))
    result["exact_start_vs_full_svd"] = {key: summarize(v) for key, v in ref.items()}
    set_starts(exact_start)
    result["alignment_exact"] = summarize(list(first_step_alignment(model, step_batches, step_grads, args.lr).values()))

    # the real code path at the default size: streamed from the batches, on the unchanged model (ΔW = 0)
    set_starts(exact_start)
    config = next(iter(targets.values()))[1].ga_config
    t0 = time.perf_counter()
    hp.lora_ga_init(model, init_batches, estimator="sketch")
    result["sketch_estimate_s"] = time.perf_counter() - t0
    default_k = config.sketch_size_for(10**9, 10**9)
    streamed = {"A0": [], "B0": []}
    for name, (_, part) in targets.items():
        oa0, ob0 = variant_start(grads[name], part, name, default_k, config.sketch_passes)
        streamed["A0"].append(max_angle(part.lora_A0.t(), oa0.t()))
        streamed["B0"].append(max_angle(part.lora_B0, ob0))
    result["streamed_vs_offline_default"] = {"k": default_k, "passes": config.sketch_passes,
                                             **{key: summarize(v) for key, v in streamed.items()}}

    # plain LoRA (B = 0) as the reference row: its first step changes only B
    plain, _ = load_causal_lm()
    plain.train()
    hp.inject(plain, hp.LoraConfig(target_modules=TARGETS, r=R))
    result["alignment_lora"] = summarize(list(first_step_alignment(plain, step_batches, step_grads, args.lr).values()))
    return result


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    f = lambda s: f"{s['median']:.1f}° / {s['p90']:.1f}° / {s['max']:.1f}°"  # noqa: E731
    e = lambda s: f"{s['median']:.3f} / {s['p90']:.3f}"  # noqa: E731
    h = lambda s: f"{s['median']:.3f} / {s['mean']:.3f}"  # noqa: E731
    lines = [
        "| task | k | passes | A0 rows vs exact: median / p90 / max angle | B0 columns vs exact | "
        "gradient energy captured vs exact, A0: median / p90 | B0 | first-step cos(ΔW_eff, −∇W): median / mean |",
        "|---|---:|---:|---|---|---|---|---|",
    ]
    for res in results:
        lines.append(f"| {res['task']} | exact | — | 0 | 0 | 1 | 1 | {h(res['alignment_exact'])} |")
        for row in res["variants"].values():
            lines.append(f"| {res['task']} | {row['k']} | {row['passes']} | {f(row['A0'])} | {f(row['B0'])} | "
                         f"{e(row['energy_A0'])} | {e(row['energy_B0'])} | {h(row['alignment'])} |")
        lines.append(f"| {res['task']} | plain LoRA (B = 0) | — | | | | | {h(res['alignment_lora'])} |")
    lines += ["", "| task | exact start (svd_lowrank, 4 power iterations) vs full SVD: A0 median / max | B0 median / max "
              "| streamed sketch vs the same sketch of the dense G (default k, passes): A0 max | B0 max | exact estimate s "
              "| sketch estimate s |", "|---|---|---|---|---|---:|---:|"]
    g = lambda s: f"{s['median']:.2f}° / {s['max']:.2f}°"  # noqa: E731
    for res in results:
        ex, st = res["exact_start_vs_full_svd"], res["streamed_vs_offline_default"]
        lines.append(f"| {res['task']} | {g(ex['A0'])} | {g(ex['B0'])} | {st['A0']['max']:.3f}° | {st['B0']['max']:.3f}° | "
                     f"{res['exact_estimate_s']:.0f} | {res['sketch_estimate_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["sst2", "gsm8k"])
    p.add_argument("--ks", nargs="+", type=int, default=[2 * R + 8, 4 * R, 8 * R])
    p.add_argument("--passes", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="the SGD step of the alignment check")
    p.add_argument("--out", help="write lora-ga-sketch-accuracy.{json,md} here")
    args = p.parse_args(argv)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "r": R,
            "batch": args.batch_size, "max_length": args.max_length, "ks": args.ks, "passes": args.passes,
            "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start"}
    results = []
    for task in args.tasks:  # the files are rewritten after each task: a stopped run keeps the finished ones
        results.append(run_task(task, args))
        text = markdown(meta, results)
        print(text, flush=True)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "lora-ga-sketch-accuracy.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
            (out / "lora-ga-sketch-accuracy.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
