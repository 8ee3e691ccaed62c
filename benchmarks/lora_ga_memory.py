"""Peak memory of LoRA-GA's gradient estimate: per-parameter offload hooks vs a plain full backward.

Both modes average ``∇_W L`` of every adapted weight (7 projections per block)
over the same batches of a random-init Llama:

- ``plain``: the target weights require grad and ``loss.backward()`` accumulates
  into ``.grad`` — every target gradient is alive on the compute device at once.
- ``hooks``: ``hybridpeft.gradient_init.estimate_gradients`` — each gradient is added
  into a host (CPU, float32) accumulator and dropped as soon as autograd produces it.

Measured per mode:

- ``peak``: on CUDA ``torch.cuda.max_memory_allocated`` above the memory held before
  the estimate (model, batches, adapters). On CPU, where ``tracemalloc`` cannot see
  torch's allocations, each mode runs in a fresh process and ``peak`` is the growth
  of the peak resident set size (``ru_maxrss``) over a no-grad forward; on CPU the
  host accumulators live in the same memory, so ``peak − accumulators`` is
  reported as what the compute device would hold.
- ``max live grads``: the largest total size of target-weight ``.grad`` tensors
  alive at one moment (checked whenever a gradient lands), the quantity the hooks bound.

Usage::

    python benchmarks/lora_ga_memory.py                       # CPU, writes docs/perf/lora_ga_memory.md
    python benchmarks/lora_ga_memory.py --device cuda --dtype bfloat16 --out docs/perf/lora_ga_memory_cuda.md
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

import hybridpeft as hp
from hybridpeft.gradient_init import estimate_gradients, lora_ga_targets

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MiB = 2 ** 20


def build(device: str, dtype: torch.dtype, batch: int, seq: int, n_batches: int):
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).to(device=device, dtype=dtype)
    model = hp.inject(model, hp.LoraGAConfig(target_modules=TARGETS, r=8))
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq), generator=g).to(device)
        batches.append({"input_ids": ids, "labels": ids})
    weights = {n: layer.base_layer.weight for n, (layer, _) in lora_ga_targets(model).items()}
    return model, batches, weights


def live_grad_bytes(weights) -> int:
    return sum(w.grad.numel() * w.grad.element_size() for w in weights.values() if w.grad is not None)


def run_plain(model, batches, weights, track: list[int]) -> None:
    for w in weights.values():
        w.requires_grad_(True)
    for batch in batches:
        model(**batch).loss.backward()
        track.append(live_grad_bytes(weights))
    for w in weights.values():
        w.grad.div_(len(batches))  # the mean, in place: no second copy


def run_hooks(model, batches, weights, track: list[int]) -> None:
    # an extra observer hook, registered first so it sees the grad before the offload hook frees it
    for w in weights.values():
        w.requires_grad_(True)  # hooks need it; estimate_gradients sets it anyway
    handles = [w.register_post_accumulate_grad_hook(lambda p: track.append(live_grad_bytes(weights))) for w in weights.values()]
    try:
        estimate_gradients(model, weights, batches, num_batches=len(batches))
    finally:
        for h in handles:
            h.remove()


def measure(mode: str, device: str, dtype: torch.dtype, batch: int, seq: int, n_batches: int) -> dict:
    model, batches, weights = build(device, dtype, batch, seq, n_batches)
    with torch.no_grad():
        model(**batches[0])  # allocator and kernels warmed; activations of a forward counted in the baseline
    track: list[int] = []
    run = run_plain if mode == "plain" else run_hooks
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(model, batches, weights, track)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        run(model, batches, weights, track)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    target_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    accumulators = sum(w.numel() * 4 for w in weights.values()) if mode == "hooks" else 0
    return {
        "mode": mode, "peak": peak, "max_live_grads": max(track), "target_weight_bytes": target_bytes,
        "largest_target": max(w.numel() * w.element_size() for w in weights.values()),
        "host_accumulators": accumulators, "n_params": sum(p.numel() for p in model.parameters()),
    }


def child(args: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--device", args.device, "--dtype", args.dtype,
           "--batch", str(args.batch), "--seq", str(args.seq), "--batches", str(args.batches)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(args: argparse.Namespace, rows: list[dict]) -> str:
    plain, hooks = (next(r for r in rows if r["mode"] == m) for m in ("plain", "hooks"))
    cpu = args.device == "cpu"
    lines = [
        "# LoRA-GA gradient estimate: peak memory, offload hooks vs plain backward",
        "",
        f"Generated by `python benchmarks/lora_ga_memory.py --device {args.device} --dtype {args.dtype}` "
        f"(torch {torch.__version__}, {platform.machine()}, {args.device}).",
        "",
        f"Model: random-init Llama, hidden {SHAPE['hidden_size']}, MLP {SHAPE['intermediate_size']}, "
        f"{SHAPE['num_hidden_layers']} blocks, vocab {SHAPE['vocab_size']}, {plain['n_params'] / 1e6:.1f}M parameters, "
        f"{args.dtype}; LoRA-GA r=8 on the 7 projections ({plain['target_weight_bytes'] / MiB:.1f} MiB of target weights, "
        f"largest {plain['largest_target'] / MiB:.2f} MiB). {args.batches} batches of {args.batch}×{args.seq} tokens.",
        "",
        "| mode | peak above start (MiB) | max live target grads (MiB) | host accumulators (MiB) |"
        + (" peak − accumulators (MiB) |" if cpu else ""),
        "|---|---|---|---|" + ("---|" if cpu else ""),
    ]
    for r in (plain, hooks):
        row = f"| {r['mode']} | {r['peak'] / MiB:.1f} | {r['max_live_grads'] / MiB:.2f} | {r['host_accumulators'] / MiB:.1f} |"
        if cpu:
            row += f" {(r['peak'] - r['host_accumulators']) / MiB:.1f} |"
        lines.append(row)
    lines += [
        "",
        f"Live target gradients: {plain['max_live_grads'] / MiB:.1f} MiB (plain) vs {hooks['max_live_grads'] / MiB:.2f} MiB "
        f"(hooks) — {plain['max_live_grads'] / max(hooks['max_live_grads'], 1):.0f}× less; the hooks keep at most "
        "the gradients autograd produces at one moment, about one layer's.",
    ]
    if cpu:
        lines += [
            "",
            "On CPU the host accumulators (float32, one per target weight) are in the same memory as the model, "
            "so the total peak is not smaller there; the column `peak − accumulators` is the part a GPU would hold. "
            "`peak` is the growth of the process's peak RSS (each mode in a fresh process), so it includes "
            "activations of the backward and allocator slack; compare the two rows, not the absolute values.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "docs" / "perf" / "lora_ga_memory.md"))
    parser.add_argument("--child", choices=["plain", "hooks"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.child:
        print(json.dumps(measure(args.child, args.device, dtype, args.batch, args.seq, args.batches)))
        return
    if args.device == "cpu":
        rows = [child(args, mode) for mode in ("plain", "hooks")]
    else:
        rows = [measure(mode, args.device, dtype, args.batch, args.seq, args.batches) for mode in ("plain", "hooks")]
    text = report(args, rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
