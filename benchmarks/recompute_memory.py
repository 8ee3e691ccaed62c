"""Activation bytes autograd keeps for backward, with and without ``recompute_base``.

The output-side orthogonal branches (BOFT, Hybrid, unitary) rotate ``h = W x``;
by default backward keeps ``h`` (N × d_out per adapted module). ``recompute_base``
keeps the base input ``x`` instead and recomputes ``h`` in backward (docs/perf/README.md).
This script counts, with ``torch.autograd.graph.saved_tensors_hooks``, the bytes of
the distinct storages one forward of a random-init Llama saves for backward
(parameters and buffers aside), for each method, and optionally times fwd + bwd.
Counting is exact and machine-independent, unlike a peak-RSS reading.

Default shape: SmolLM2-135M (576 wide, 1536 MLP, 9 heads / 3 KV heads, 30 layers,
vocabulary 49152, tied head), 8 × 128 tokens, float32, targets q/k/v/o/gate/up/down.

    python benchmarks/recompute_memory.py [--layers 30] [--batch 8] [--seq 128] [--vocab 49152] [--reps 0] [--out DIR]

Writes ``<out>/recompute-memory.{json,md}`` when ``--out`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
try:  # a fresh checkout without `pip install -e .` still runs
    import hybridpeft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hybridpeft as hp  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CONFIGS: dict[str, Callable[[], Any] | None] = {
    "floor": None,
    "lora": lambda: hp.LoraConfig(target_modules=TARGETS, r=16, alpha=32.0),
    "boft": lambda: hp.BoftConfig(target_modules=TARGETS, block_size=8, n_factors=3),
    "boft-recompute": lambda: hp.BoftConfig(target_modules=TARGETS, block_size=8, n_factors=3, recompute_base=True),
    "hybrid": lambda: hp.HybridConfig(target_modules=TARGETS, lora_r=16, lora_alpha=32.0, boft_block_size=8,
                                      boft_n_factors=3),
    "hybrid-recompute": lambda: hp.HybridConfig(target_modules=TARGETS, lora_r=16, lora_alpha=32.0,
                                                boft_block_size=8, boft_n_factors=3, recompute_base=True),
    "unitary": lambda: hp.UnitaryConfig(target_modules=TARGETS),  # structured (FFT, reflections, phases)
    "unitary-recompute": lambda: hp.UnitaryConfig(target_modules=TARGETS, recompute=True),
    "unitary-recompute-base": lambda: hp.UnitaryConfig(target_modules=TARGETS, recompute_base=True),
    "unitary-full": lambda: hp.UnitaryConfig(target_modules=TARGETS, parameterization="full", block_size=32),
    "unitary-full-recompute": lambda: hp.UnitaryConfig(target_modules=TARGETS, parameterization="full",
                                                       block_size=32, recompute_base=True),
}


def smollm2_shaped(layers: int, dtype: torch.dtype, vocab: int = 49152) -> nn.Module:
    """A random-init ``LlamaForCausalLM`` with SmolLM2-135M's shape, ``layers`` layers and ``vocab`` tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=vocab, tie_word_embeddings=True,
                         max_position_embeddings=2048, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, dtype=dtype).train()


def saved_bytes(model: nn.Module, run: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves during ``run()`` (the model's own tensors aside), and its output."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            storages[ptr] = t.untyped_storage().nbytes()
        return t.detach()  # the tensor itself would be a C++ reference cycle for saved outputs: a leak

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(storages.values()), out


def measure(method: str, layers: int, vocab: int, ids: torch.Tensor, reps: int, dtype: torch.dtype) -> dict[str, Any]:
    model = smollm2_shaped(layers, dtype, vocab)
    for p in model.parameters():
        p.requires_grad_(False)
    make = CONFIGS[method]
    if make is not None:
        hp.inject(model, make())
    model.enable_input_require_grads()  # every method, the floor included, backpropagates from the embeddings
    step = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    row: dict[str, Any] = {"method": method}
    row["saved_bytes"], loss = saved_bytes(model, step)
    del loss  # frees the graph; the count is all this pass was for
    if reps:
        times = []
        for _ in range(reps + 1):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step().backward()
            times.append(time.perf_counter() - t0)
        row["fwd_bwd_s"] = statistics.median(times[1:])
    if make is not None:
        row["adapted_modules"] = len(hp.adapted_layers(model))
        row["sum_d_out"] = sum(layer.adapter.d_out for _, layer in hp.adapted_layers(model))
    return row


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    by = {r["method"]: r for r in rows}
    n = meta["tokens"]
    floor = by.get("floor", {}).get("saved_bytes")
    lora = by.get("lora", {}).get("saved_bytes")
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = [
        "# Saved activations with and without `recompute_base`",
        "",
        f"- {meta['date']}; torch {meta['torch']}; {meta['machine']}",
        f"- random-init Llama of SmolLM2-135M's shape, {meta['layers']} layers, vocabulary {meta['vocab']}, {meta['batch']} × {meta['seq']} = {n} "
        f"tokens, {meta['dtype']}; targets q/k/v/o/gate/up/down; one forward with the loss",
        "- `saved MiB`: distinct storages autograd keeps for backward (saved_tensors_hooks), parameters and buffers "
        "aside; includes the loss's log-softmax over the vocabulary, the same for every method",
        "- `predicted h`: N × Σ d_out × bytes, the `h` tensors the option drops",
        "",
        "| method | saved MiB | − floor MiB | ÷ LoRA | predicted h MiB | fwd+bwd s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = r["saved_bytes"]
        rotates_h = r["method"] not in ("floor", "lora")
        predicted = mib(n * r["sum_d_out"] * meta["itemsize"]) if rotates_h else "—"
        below_floor = mib(b - floor) if floor is not None else "—"
        vs_lora = f"{b / lora:.2f}" if lora else "—"
        timed = f"{r['fwd_bwd_s']:.2f}" if "fwd_bwd_s" in r else "—"
        lines.append(f"| {r['method']} | {mib(b)} | {below_floor} | {vs_lora} | {predicted} | {timed} |")
    pairs = [(a, b) for a, b in (("boft", "boft-recompute"), ("hybrid", "hybrid-recompute"), ("unitary", "unitary-recompute"),
                                  ("unitary", "unitary-recompute-base"), ("unitary-full", "unitary-full-recompute"))
             if a in by and b in by]
    if pairs:
        lines += ["", "| pair | saved without → with | difference MiB | ÷ predicted h |", "|---|---:|---:|---:|"]
        for a, b in pairs:
            diff = by[a]["saved_bytes"] - by[b]["saved_bytes"]
            predicted = n * by[a]["sum_d_out"] * meta["itemsize"]
            lines.append(f"| {a} | {mib(by[a]['saved_bytes'])} → {mib(by[b]['saved_bytes'])} | {mib(diff)} | "
                         f"{diff / predicted:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=49152, help="smaller: the output head stops dominating the timing")
    p.add_argument("--reps", type=int, default=0, help="also time this many fwd+bwd passes (median; 0: no timing)")
    p.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="write recompute-memory.{json,md} here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "layers": args.layers,
            "vocab": args.vocab,
            "batch": args.batch, "seq": args.seq, "tokens": args.batch * args.seq, "dtype": "float32",
            "itemsize": torch.finfo(dtype).bits // 8,
            "machine": f"{os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
                       f"load {os.getloadavg()[0]:.1f}"}
    rows = []
    for method in args.methods:
        row = measure(method, args.layers, args.vocab, ids, args.reps, dtype)
        rows.append(row)
        print(f"{method:<24} saved {row['saved_bytes'] / 2**20:9.1f} MiB"
              + (f"  fwd+bwd {row['fwd_bwd_s']:.2f} s" if "fwd_bwd_s" in row else ""), flush=True)
    text = markdown(meta, rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "recompute-memory.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
        (out / "recompute-memory.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
