"""Peak memory of LoRA-GA's gradient estimate, exact vs sketch, measured on CPU beside the planner.

For each shape (``cpu-small``; ``llama-3.2-1b``, Llama-3.2-1B's shape at float32, 1.24e9
parameters) and estimator, a fresh process builds a random-init model, injects LoRA-GA
(r = 8, every projection) and runs ``lora_ga_init`` on ``--batches`` random batches. Measured:

* ``allocated``: peak of live tensor storages (``memtrack.StorageTracker``), weights included;
* ``RSS − baseline``: peak RSS over the RSS after imports and a warm-up (reported);
* ``host part``: what the estimate keeps off the device by design — the exact estimate's
  float32 accumulators (``4 ×`` adapted parameters); on a CPU they share the one memory,
  so ``allocated − host part`` is what a GPU would hold.

Predicted: ``hybridpeft plan --method lora_ga --adapter r=8 --dtype float32 --device-kind cpu``'s
estimate rows, device + host (the same memory on a CPU).

    python benchmarks/lora_ga_scale_memory.py [--shapes cpu-small llama-3.2-1b] [--out docs/perf]

Writes ``<out>/lora-ga-scale-memory.{json,md}``. The 1B rows need ~10 GB free (exact) and
~6 GB (sketch): the script checks ``MemAvailable`` first and stops with a message otherwise.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import hybridpeft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "src"))

SHAPES = {"cpu-small": (2, 128), "llama-3.2-1b": (1, 256)}
NEEDS_GIB = {"cpu-small": 1, "llama-3.2-1b": 11}
MiB = 2 ** 20
GiB = 2 ** 30


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GiB
    return float("inf")


def measure(shape: str, estimator: str, n_batches: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import hybridpeft as hp
    from hybridpeft.plan.shapes import resolve_config
    from memtrack import StorageTracker, rss_now, rss_peak, warm_up

    torch.set_num_threads(1)
    warm_up()
    gc.collect()
    baseline = rss_now()
    batch, seq = SHAPES[shape]
    config = resolve_config(shape)
    config.use_cache = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    hp.inject(model, hp.LoraGAConfig(r=8, estimator=estimator))
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": (ids := torch.randint(0, config.vocab_size, (batch, seq), generator=gen)), "labels": ids}
               for _ in range(n_batches)]
    adapted = sum(layer.adapter.d_in * layer.adapter.d_out for _, layer in hp.adapted_layers(model))
    tracker = StorageTracker()
    tracker.track(list(model.parameters()) + list(model.buffers()) + [b["input_ids"] for b in batches])
    started = time.perf_counter()
    with tracker:
        hp.lora_ga_init(model, batches, num_batches=n_batches)
    return {"shape": shape, "estimator": estimator, "batch": batch, "seq": seq, "batches": n_batches,
            "allocated_peak": tracker.peak, "rss_peak_minus_baseline": rss_peak() - baseline, "baseline_rss": baseline,
            "host_part": 4 * adapted if estimator == "exact" else 0, "adapted_params": adapted,
            "seconds": time.perf_counter() - started}


def predict(shape: str, estimator: str) -> dict:
    from hybridpeft.plan import PlanRequest, plan

    batch, seq = SHAPES[shape]
    p = plan(PlanRequest(shape, "lora_ga", {"r": 8}, batch=batch, seq=seq, dtype="float32", device_kind="cpu"))
    row = next(e for e in p.estimate if e.estimator == estimator)
    return {"predicted_device": row.device, "predicted_host": row.host, "predicted_detail": row.detail}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| shape | tokens × batches | estimator | predicted device + host MiB | allocated peak MiB | ÷ | RSS − baseline MiB "
        "| ÷ | host part MiB | allocated − host MiB (a GPU's share) | predicted device MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pred = r["predicted_device"] + r["predicted_host"]
        lines.append(
            f"| {r['shape']} | {r['batch']}×{r['seq']} × {r['batches']} | {r['estimator']} | {pred / MiB:.0f} | "
            f"{r['allocated_peak'] / MiB:.0f} | {pred / r['allocated_peak']:.3f} | {r['rss_peak_minus_baseline'] / MiB:.0f} | "
            f"{pred / r['rss_peak_minus_baseline']:.3f} | {r['host_part'] / MiB:.0f} | "
            f"{(r['allocated_peak'] - r['host_part']) / MiB:.0f} | {r['predicted_device'] / MiB:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--estimators", nargs="+", default=["exact", "sketch"], choices=["exact", "sketch"])
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--out", help="write lora-ga-scale-memory.{json,md} here")
    p.add_argument("--child", nargs=2, metavar=("SHAPE", "ESTIMATOR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.batches)))
        return 0
    from memtrack import run_child, run_meta

    rows = []
    for shape in args.shapes:
        for estimator in args.estimators:
            free = available_gib()
            if free < NEEDS_GIB[shape]:
                print(f"{shape}/{estimator}: only {free:.1f} GiB available, {NEEDS_GIB[shape]} needed; "
                      "not started (the machine is shared) — rerun later", file=sys.stderr)
                return 1
            cmd = [sys.executable, __file__, "--child", shape, estimator, "--batches", str(args.batches)]
            measured = run_child(cmd)
            if measured is None:
                return 1
            row = {**measured, **predict(shape, estimator)}
            rows.append(row)
            print(f"{shape:<13} {estimator:<7} allocated {row['allocated_peak'] / MiB:8.0f} MiB  RSS-baseline "
                  f"{row['rss_peak_minus_baseline'] / MiB:8.0f} MiB  predicted {(row['predicted_device'] + row['predicted_host']) / MiB:8.0f} MiB"
                  f"  ({row['seconds']:.0f} s)", flush=True)
    meta = run_meta()
    text = markdown(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lora-ga-scale-memory.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
        (out / "lora-ga-scale-memory.md").write_text(f"<!-- {json.dumps(meta)} -->\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
