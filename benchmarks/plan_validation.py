"""The planner's predicted training peak against a measured one, every method, on CPU shapes.

For each shape (``tiny`` 2×16 tokens, ``cpu-small`` 2×128, ``smollm2-135m`` 8×128; random-init
Llama models of those shapes, float32) and each method (library defaults, every projection
adapted), a fresh process builds the model, injects the method and runs three training steps
as ``hybridpeft train`` does (forward with labels, backward, gradient clipping, AdamW step,
``after_optimizer_step``, ``zero_grad(set_to_none=True)``). Measured:

* ``allocated``: the peak of live tensor storages (``memtrack.StorageTracker``, the CPU
  counterpart of ``torch.cuda.max_memory_allocated``), weights included;
* ``RSS − baseline``: peak RSS minus the RSS after imports and a warm-up step of a throwaway
  model (the process baseline, reported); the model is built after the baseline.

Predicted: ``hybridpeft plan --model <shape> --method <m> --batch B --seq S --dtype float32
--device-kind cpu``'s peak. The ±15 % criterion is read on both. glibc's dynamic mmap
threshold keeps freed mid-size blocks in the heap, so RSS runs above the live tensors; with
``MALLOC_MMAP_THRESHOLD_=65536`` in the environment (children inherit it) it tracks them.

    python benchmarks/plan_validation.py [--shapes tiny cpu-small smollm2-135m] [--methods ...] [--out docs/perf]

Writes ``<out>/plan-validation[-TAG].{json,md}``. On a GPU (not run yet: no GPU here)::

    python benchmarks/plan_validation.py --device cuda --dtype bfloat16 --shapes llama-3.2-1b llama-3.1-8b --tag cuda
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
try:  # a fresh checkout without `pip install -e .` still runs
    import hybridpeft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "src"))

SHAPES = {"tiny": (2, 16), "cpu-small": (2, 128), "smollm2-135m": (8, 128),
          # for --device cuda (not run here: this machine has no GPU)
          "llama-3.2-1b": (4, 1024), "llama-3.1-8b": (2, 1024)}
METHODS = ["lora", "lora_ga", "boft", "unitary", "hybrid", "full"]
MiB = 2 ** 20


def adapter_config(method: str):
    import hybridpeft as hp
    from hybridpeft.adapters.config import config_class

    return hp.FullConfig() if method == "full" else config_class(method)()


def measure(shape: str, method: str, steps: int, checkpointing: bool = False, device: str = "cpu",
            dtype: str = "float32") -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import hybridpeft as hp
    from hybridpeft.plan.shapes import resolve_config
    from memtrack import StorageTracker, rss_now, rss_peak, warm_up

    torch.set_num_threads(1)
    warm_up()
    gc.collect()
    baseline = rss_now()
    cuda_base = 0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    batch, seq = SHAPES[shape]
    config = resolve_config(shape)
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).train()
    if checkpointing:  # as hybridpeft.train.setup.prepare_model does it, before injection
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hp.inject(model, adapter_config(method))
    optimizer = hp.build_optimizer(model, lr=1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    tracker = StorageTracker()
    tracker.track(list(model.parameters()) + list(model.buffers()) + [ids])
    started = time.perf_counter()
    with tracker:
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            hp.after_optimizer_step(model)
            optimizer.zero_grad(set_to_none=True)
            del loss
    if device == "cuda":  # the allocator's own count; the tracker sees only CPU storages
        torch.cuda.synchronize()
        tracker.peak = torch.cuda.max_memory_allocated() - cuda_base
    return {"shape": shape, "method": method, "checkpointing": checkpointing, "batch": batch, "seq": seq,
            "device": device, "dtype": dtype, "allocated_peak": tracker.peak,
            "rss_peak_minus_baseline": rss_peak() - baseline, "baseline_rss": baseline,
            "seconds": time.perf_counter() - started}


def predict(shape: str, method: str, checkpointing: bool = False, device: str = "cpu", dtype: str = "float32") -> dict:
    from hybridpeft.plan import PlanRequest, plan

    batch, seq = SHAPES[shape]
    p = plan(PlanRequest(shape, method, batch=batch, seq=seq, dtype=dtype, device_kind=device,
                         gradient_checkpointing=checkpointing))
    return {"predicted_peak": p.peak, "parts": p.parts, "phases": p.phases}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "| shape | tokens | method | predicted MiB | allocated peak MiB | ÷ | RSS − baseline MiB | ÷ |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pred = r["predicted_peak"]
        method = r["method"] + (" + checkpointing" if r.get("checkpointing") else "")
        lines.append(f"| {r['shape']} | {r['batch']}×{r['seq']} | {method} | {pred / MiB:.2f} | "
                     f"{r['allocated_peak'] / MiB:.2f} | {pred / r['allocated_peak']:.3f} | "
                     f"{r['rss_peak_minus_baseline'] / MiB:.2f} | {pred / max(r['rss_peak_minus_baseline'], 1):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["tiny", "cpu-small", "smollm2-135m"], choices=list(SHAPES))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action="store_true", help="measure with activation checkpointing")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: compare with torch.cuda.max_memory_allocated (e.g. --shapes llama-3.2-1b --dtype bfloat16)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", help="write plan-validation[-TAG].{json,md} here")
    p.add_argument("--tag", default="", help="suffix of the output files (e.g. the malloc setting measured)")
    p.add_argument("--child", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.steps, args.gradient_checkpointing, args.device, args.dtype)))
        return 0
    from memtrack import run_child, run_meta

    rows = []
    for shape in args.shapes:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--child", shape, method, "--steps", str(args.steps)]
            cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            cmd += ["--device", args.device, "--dtype", args.dtype]
            measured = run_child(cmd)
            if measured is None:
                return 1
            row = {**measured, **predict(shape, method, args.gradient_checkpointing, args.device, args.dtype)}
            rows.append(row)
            print(f"{shape:<13} {method:<8} predicted {row['predicted_peak'] / MiB:9.2f} MiB  allocated "
                  f"{row['allocated_peak'] / MiB:9.2f} MiB  RSS-baseline {row['rss_peak_minus_baseline'] / MiB:9.2f} MiB "
                  f"(baseline {row['baseline_rss'] / MiB:.0f} MiB)", flush=True)
    meta = run_meta()
    text = markdown(rows, meta)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "plan-validation" + (f"-{args.tag}" if args.tag else "")
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
        (out / f"{stem}.md").write_text(f"<!-- {json.dumps(meta)} -->\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
