"""How close LoRA-GA's sketched start is to the exact one, on SmolLM2-135M with real batches.

For each task (SST-2 as a verbalizer, GSM8K), on the offline SmolLM2-135M-Instruct (float32),
LoRA-GA r = 8 on all seven projections of the 30 blocks (210 layers):

1. The exact estimate ``G`` of every layer (``estimator="exact"``, the library's default
   ``num_batches = 8`` batches) and its start ``(A0, B0)``.
2. For each sketch size ``k``: the sketch of the same ``G`` (``Y = G Ω``, ``Z = Ψ G``; the
   sketch is linear, so sketching the mean equals streaming the batches up to float
   rounding) and its start. Per layer: the largest principal angle between the sketch's and
   the exact start's subspaces — the row space of ``A0`` (r = 8 right singular vectors) and
   the column space of ``B0`` (singular vectors r+1 … 2r) — and between the sketch's top-2r
   subspace and ``G``'s true one (full SVD).
3. A streaming check at the default ``k``: ``lora_ga_init(estimator="sketch")`` on the same
   batches, whose start must match step 2's (same maths, another summation order).
4. First-step alignment: one plain SGD step of the adapter on 4 further batches, then per
   layer ``cos(ΔW_eff, −∇W)`` with ``ΔW_eff = s(BA − B0A0)`` the change of the effective
   weight and ``∇W`` the full-weight gradient on those batches — exact start vs sketched start
   (the LoRA-GA paper's motivation: the first LoRA step should point along the full gradient).
   Plain LoRA (B = 0 start) is the reference row.

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
from hybridpeft.gradient_sketch import GradientSketch  # noqa: E402
from hybridpeft.lora_ga import estimate_gradients, lora_ga_targets, start_factors  # noqa: E402
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

    result: dict[str, Any] = {"task": task_name, "layers": len(targets), "exact_estimate_s": exact_s, "sizes": {}}
    config = next(iter(targets.values()))[1].ga_config
    for k in args.ks:
        rows: dict[str, list[float]] = {"A0": [], "B0": [], "top2r_u": [], "top2r_v": []}
        for name, (layer, part) in targets.items():
            g = grads[name]
            d_out, d_in = g.shape
            kk = min(k, d_out, d_in)
            sketch = GradientSketch(d_out, d_in, kk, seed=config.sketch_seed, name=name)
            sketch.add_matrix(g)
            low = sketch.low_rank(2 * R)
            a0, b0 = start_factors(low, part.ga_config, scaling=part.scaling)
            ea0, eb0 = exact_start[name]
            rows["A0"].append(max_angle(a0.t(), ea0.t()))
            rows["B0"].append(max_angle(b0, eb0))
            u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
            rows["top2r_u"].append(max_angle(low.u, u[:, :2 * R]))
            rows["top2r_v"].append(max_angle(low.v, vh[:2 * R].t()))
        result["sizes"][str(k)] = {key: summarize(v) for key, v in rows.items()}
        print(f"{task_name} k={k}: A0 median {result['sizes'][str(k)]['A0']['median']:.2f}° "
              f"max {result['sizes'][str(k)]['A0']['max']:.2f}°, B0 median {result['sizes'][str(k)]['B0']['median']:.2f}° "
              f"max {result['sizes'][str(k)]['B0']['max']:.2f}°", flush=True)

    # exact SVD reference for the exact start itself (svd_lowrank, q = 4r, 4 power iterations)
    ref = {"A0": [], "B0": []}
    for name, g in grads.items():
        u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
        ea0, eb0 = exact_start[name]
        ref["A0"].append(max_angle(ea0.t(), vh[:R].t()))
        ref["B0"].append(max_angle(eb0, u[:, R:2 * R]))
    result["exact_start_vs_full_svd"] = {key: summarize(v) for key, v in ref.items()}

    # first-step alignment: exact start
    lr = args.lr
    result["alignment"] = {"exact": summarize(list(first_step_alignment(model, step_batches, step_grads, lr).values()))}
    # streamed sketch at the default size: the real code path (it sets A, B, A0, B0 afresh), then its first step
    t0 = time.perf_counter()
    hp.lora_ga_init(model, init_batches, estimator="sketch")
    result["sketch_estimate_s"] = time.perf_counter() - t0
    default_k = config.sketch_size_for(10**9, 10**9)
    streamed = {"A0": [], "B0": []}
    for name, (_, part) in targets.items():
        ea0, eb0 = exact_start[name]
        streamed["A0"].append(max_angle(part.lora_A0.t(), ea0.t()))
        streamed["B0"].append(max_angle(part.lora_B0, eb0))
    result["streamed_default"] = {"k": default_k, **{key: summarize(v) for key, v in streamed.items()}}
    result["alignment"]["sketch"] = summarize(list(first_step_alignment(model, step_batches, step_grads, lr).values()))

    # plain LoRA (B = 0) as the reference row: its first step changes only B
    plain, _ = load_causal_lm()
    plain.train()
    hp.inject(plain, hp.LoraConfig(target_modules=TARGETS, r=R))
    result["alignment"]["lora"] = summarize(list(first_step_alignment(plain, step_batches, step_grads, lr).values()))
    return result


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    lines = [
        "| task | k | A0 rows: median / p90 / max angle | B0 columns: median / p90 / max | top-2r U vs full SVD: median / max | top-2r V: median / max |",
        "|---|---:|---|---|---|---|",
    ]
    f = lambda s: f"{s['median']:.2f}° / {s['p90']:.2f}° / {s['max']:.2f}°"  # noqa: E731
    g = lambda s: f"{s['median']:.2f}° / {s['max']:.2f}°"  # noqa: E731
    for res in results:
        for k, row in res["sizes"].items():
            lines.append(f"| {res['task']} | {k} | {f(row['A0'])} | {f(row['B0'])} | {g(row['top2r_u'])} | {g(row['top2r_v'])} |")
    lines += ["", "| task | exact start (svd_lowrank) vs full SVD: A0 median / max | B0 median / max | streamed sketch (k = "
              f"{results[0]['streamed_default']['k']}) vs exact: A0 median / max | B0 median / max |", "|---|---|---|---|---|"]
    for res in results:
        e, s = res["exact_start_vs_full_svd"], res["streamed_default"]
        lines.append(f"| {res['task']} | {g(e['A0'])} | {g(e['B0'])} | {g(s['A0'])} | {g(s['B0'])} |")
    lines += ["", "| task | first-step cos(ΔW_eff, −∇W): exact start, median / mean | sketched start | plain LoRA (B = 0) |",
              "|---|---|---|---|"]
    for res in results:
        a = res["alignment"]
        h = lambda s: f"{s['median']:.3f} / {s['mean']:.3f}"  # noqa: E731
        lines.append(f"| {res['task']} | {h(a['exact'])} | {h(a['sketch'])} | {h(a['lora'])} |")
    lines += ["", "| task | exact estimate s | sketch estimate s |", "|---|---:|---:|"]
    for res in results:
        lines.append(f"| {res['task']} | {res['exact_estimate_s']:.1f} | {res['sketch_estimate_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["sst2", "gsm8k"])
    p.add_argument("--ks", nargs="+", type=int, default=[2 * R + 8, 4 * R, 8 * R])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="the SGD step of the alignment check")
    p.add_argument("--out", help="write lora-ga-sketch-accuracy.{json,md} here")
    args = p.parse_args(argv)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "r": R,
            "batch": args.batch_size, "max_length": args.max_length, "ks": args.ks,
            "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start"}
    results = [run_task(task, args) for task in args.tasks]
    text = markdown(meta, results)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lora-ga-sketch-accuracy.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        (out / "lora-ga-sketch-accuracy.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
