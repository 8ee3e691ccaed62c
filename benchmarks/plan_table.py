"""Predicted peak memory per device for the paper's five models, every method, bf16 / nf4, 1 / 8 devices.

Rows: LoRA (r = 8), LoRA-GA with the exact and the sketched estimate (r = 8; the training step
is the same, the estimate before it differs), BOFT (b = 8, m = 3), the Hybrid (r = 8, b = 8,
m = 3) and full fine-tuning; every projection adapted; batch 1 × 2048 tokens per device;
AdamW; 8 devices = FSDP2 full sharding; with and without activation checkpointing. A LoRA-GA cell is the larger of the training peak
and the estimate's device peak, with the exact estimate's host memory per process beside it.
Full fine-tuning has no nf4 column (4-bit weights cannot train).

    python benchmarks/plan_table.py [--batch 1 --seq 2048] [--out docs/perf]

Writes ``<out>/plan-paper-models.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    import hybridpeft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "src"))

from hybridpeft.plan import PlanRequest, plan  # noqa: E402

MODELS = ["llama-3.1-405b", "llama-3.3-70b", "wizard-vicuna-30b", "bloomz-7b1", "llama-3.1-8b"]
ROWS = {  # label -> (method, adapter fields)
    "LoRA": ("lora", {"r": 8}),
    "LoRA-GA exact": ("lora_ga", {"r": 8, "estimator": "exact"}),
    "LoRA-GA sketch": ("lora_ga", {"r": 8, "estimator": "sketch"}),
    "BOFT": ("boft", {"block_size": 8, "n_factors": 3}),
    "Hybrid": ("hybrid", {"lora_r": 8, "boft_block_size": 8, "boft_n_factors": 3}),
    "full FT": ("full", {}),
}
SETTINGS = [  # (dtype, quantization, devices, activation checkpointing)
    ("bfloat16", "none", 1, False), ("bfloat16", "none", 8, False), ("bfloat16", "nf4", 1, False),
    ("bfloat16", "nf4", 8, False), ("bfloat16", "none", 8, True), ("bfloat16", "nf4", 8, True),
]
GB = 1e9


def cell(model: str, label: str, dtype: str, quant: str, world: int, checkpointing: bool, batch: int, seq: int) -> dict:
    method, fields = ROWS[label]
    if method == "full" and quant == "nf4":
        return {"peak": None}
    p = plan(PlanRequest(model, method, fields, batch=batch, seq=seq, dtype=dtype, quantization=quant,
                         world_size=world, sharding="fsdp" if world > 1 else "none", gradient_checkpointing=checkpointing))
    out = {"peak": p.peak, "weights": p.parts["weights"], "activations": p.parts["activations"]}
    if label.startswith("LoRA-GA"):
        est = next(e for e in p.estimate if e.estimator == fields["estimator"])
        out.update(estimate_device=est.device, estimate_host=est.host, peak=max(p.peak, est.device))
    return out


def markdown(table: dict, batch: int, seq: int) -> str:
    heads = [f"{'bf16' if q == 'none' else 'nf4'} ×{w}{' ckpt' if c else ''}" for _, q, w, c in SETTINGS]
    lines = [f"Predicted peak per device, GB (10⁹ bytes); batch {batch} × {seq} tokens per device; "
             "×8 = FSDP over 8 devices; ckpt = activation checkpointing of every decoder layer. LoRA-GA exact: "
             "`+ host` is the float32 accumulators per process.", ""]
    for model in MODELS:
        lines += [f"**{model}**", "", "| method | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
        for label in ROWS:
            cells = []
            for setting in SETTINGS:
                c = table[model][label][str(setting)]
                if c["peak"] is None:
                    cells.append("—")
                    continue
                text = f"{c['peak'] / GB:.1f}"
                if c.get("estimate_host"):
                    text += f" + host {c['estimate_host'] / GB:.0f}"
                cells.append(text)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--out", help="write plan-paper-models.{json,md} here")
    args = p.parse_args(argv)
    table: dict = {}
    for model in MODELS:
        table[model] = {}
        for label in ROWS:
            table[model][label] = {str(s): cell(model, label, *s, args.batch, args.seq) for s in SETTINGS}
        print(f"{model} done", flush=True)
    text = markdown(table, args.batch, args.seq)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "batch": args.batch, "seq": args.seq}
        (out / "plan-paper-models.json").write_text(json.dumps({"meta": meta, "table": table}, indent=1) + "\n")
        (out / "plan-paper-models.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
