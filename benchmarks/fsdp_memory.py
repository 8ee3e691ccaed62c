"""Per-process memory of sharded (FSDP2) training on CPU: RAM-efficient loading vs every rank loading.

Two processes (gloo) train a random-init Llama (default ~170M parameters, float32, saved
once as safetensors) with an adapter, three ways:

- ``fsdp-ram-efficient``: rank 0 reads the checkpoint, rank 1 builds the model on the meta
  device; ``shard_model`` then ``materialize_from_rank0`` (what ``fsdp.ram_efficient_loading``
  and ``fsdp_cpu_ram_efficient_loading`` do);
- ``fsdp-every-rank-loads``: both ranks read the whole checkpoint, then shard;
- ``ddp``: both ranks hold the whole model (the replicated default), for reference.

Per rank it records the peak resident set (``ru_maxrss``) after importing (the floor:
python, torch, transformers), after loading + sharding, and after 2 optimizer steps, and
the bytes of parameters / gradients / optimizer state this rank holds. A peak RSS is a
property of the allocator too (freed memory is not always returned), so read the
differences between modes side by side, not absolute values.

    python benchmarks/fsdp_memory.py [--hidden 1024] [--layers 8] [--vocab 32000] [--method lora] [--out docs/perf]

Writes ``<out>/fsdp-memory.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODES = ("fsdp-ram-efficient", "fsdp-every-rank-loads", "ddp")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(model_dir: str, mode: str, method: str, out: str) -> None:
    """One rank (started by torch.distributed.run)."""
    import torch
    import torch.distributed as dist

    import hybridpeft as hp
    from hybridpeft import distributed, fsdp
    from hybridpeft.models import load_causal_lm

    floor = _peak_mb()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    empty = mode == "fsdp-ram-efficient" and rank != 0
    model, _ = load_causal_lm(model_dir, empty=empty)
    config = {"lora": lambda: hp.LoraConfig(target_modules=TARGETS, r=16),
              "hybrid": lambda: hp.HybridConfig(target_modules=TARGETS, lora_r=16, boft_block_size=8)}[method]()
    hp.inject(model.train(), config)
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        source = fsdp.detach_for_sharding(model) if mode == "fsdp-ram-efficient" and rank == 0 else None
        fsdp.shard_model(model)
        if mode == "fsdp-ram-efficient":
            fsdp.materialize_from_rank0(model, source)
            del source
        wrapped = model
    loaded = {"peak_mb": _peak_mb(), "rss_mb": _rss_mb(), **fsdp.local_parameter_bytes(model)}
    optimizer = hp.build_optimizer(model, lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=g)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        grads = fsdp.local_parameter_bytes(model)["grad"]
        optimizer.step()
        hp.after_optimizer_step(model)
        optimizer.zero_grad(set_to_none=True)
    optimizer_bytes = sum(distributed.local(v).nbytes for state in optimizer.state.values()
                          for v in state.values() if torch.is_tensor(v))
    record = {"rank": rank, "mode": mode, "floor_peak_mb": floor, "after_load": loaded,
              "after_steps": {"peak_mb": _peak_mb(), "rss_mb": _rss_mb(), "grad_bytes": grads,
                              "optimizer_bytes": optimizer_bytes}}
    Path(out, f"{mode}-rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def save_model(path: Path, hidden: int, layers: int, vocab: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny character tokenizer is a test fixture
    from tiny_models import char_tokenizer

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    mb = 2**20
    lines = [
        "# Per-process memory of sharded training (CPU, 2 processes)",
        "",
        f"Model: random-init Llama, hidden {meta['hidden']}, {meta['layers']} layers, vocabulary {meta['vocab']}, "
        f"{meta['params'] / 1e6:.0f}M parameters ({meta['params'] * 4 / mb:.0f} MiB in float32); adapter: "
        f"`{meta['method']}` on all 7 projections; 2 optimizer steps on 2 × 64 tokens per rank. "
        f"Generated by `python benchmarks/fsdp_memory.py` on {meta['machine']}.",
        "",
        "Peak RSS is the process's high-water mark (`ru_maxrss`); *floor* is the same after importing "
        "python, torch and transformers, before any model exists. Parameter/gradient/optimizer bytes are "
        "what this rank holds (its pieces of sharded tensors).",
        "",
        "| mode | rank | floor MiB | peak after load+shard MiB | peak after 2 steps MiB | frozen params MiB "
        "| trainable params MiB | grads MiB | optimizer state MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, s = r["after_load"], r["after_steps"]
        lines.append(f"| {r['mode']} | {r['rank']} | {r['floor_peak_mb']:.0f} | {a['peak_mb']:.0f} | {s['peak_mb']:.0f} "
                     f"| {a['frozen'] / mb:.1f} | {a['trainable'] / mb:.2f} | {s['grad_bytes'] / mb:.2f} "
                     f"| {s['optimizer_bytes'] / mb:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--method", choices=["lora", "hybrid"], default="lora")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--machine", default="a shared 2-core CPU machine")
    parser.add_argument("--worker", nargs=4, metavar=("MODEL_DIR", "MODE", "METHOD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, records = Path(tmp) / "model", Path(tmp) / "records"
        records.mkdir()
        params = save_model(model_dir, args.hidden, args.layers, args.vocab)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        for mode in MODES:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       str(Path(__file__).resolve()), "--worker", str(model_dir), mode, args.method, str(records)]
            print(f"{mode} ...", file=sys.stderr, flush=True)
            subprocess.run(command, env=env, check=True)
        rows = [json.loads((records / f"{mode}-rank{k}.json").read_text()) for mode in MODES for k in (0, 1)]
    meta = {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "params": params,
            "method": args.method, "machine": args.machine}
    text = markdown(rows, meta)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fsdp-memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / "fsdp-memory.md").write_text(text)


if __name__ == "__main__":
    main()
