"""One FSDP2 run per method on a float64 tiny Llama, and the same run in one process.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT METHOD...``
trains every METHOD sharded over the ranks (gloo): LoRA-GA's start on 2 batches when the
method has one, then ``STEPS`` optimizer steps. Rank ``k`` takes rows ``[k·B, (k+1)·B)`` of
each global batch of ``WORLD·B`` rows (equal token counts, so the mean of the rank means is
the global mean). Per method it writes into ``OUT/METHOD/``:

- ``rank<k>.json``: global loss per step, per-step λ of every Hybrid layer as this rank sees
  it, parameter/gradient bytes this rank holds, drift repairs;
- ``adapter/`` (``save_adapter``: gathered, written by rank 0), ``start.safetensors`` (the
  gathered LoRA-GA starts A0, B0 and the estimated gradients), ``probe.safetensors`` (logits of
  the sharded model and of ``merge_and_unload``'s plain merged model on a probe batch).

``run(method, 0, 1, shard=False)`` runs the same in one process on the whole global batch,
for the tests to compare with (``tests/test_fsdp.py``). The pseudo-method ``head-warmup`` instead
warms up the score head of a LoRA-adapted sequence classifier (``warm_head``) and writes the
gathered head to ``OUT/head-warmup/head.safetensors``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

import hybridpeft as hp
from hybridpeft import distributed, fsdp
from hybridpeft.inject import adapted_layers
from hybridpeft.gradient_init import lora_ga_targets

WORLD = 2
ROWS = 2  # rows per rank per step
STEPS = 5
SEQ = 9
TARGETS = ["q_proj", "v_proj", "down_proj"]  # d_out 32, 32, 32; d_in 32, 32, 64

CONFIGS = {
    # norm_bound binds after a few steps: the bound is computed from gathered factors
    "lora": lambda: hp.LoraConfig(target_modules=TARGETS, r=2, norm_bound=0.02),
    "lora_ga": lambda: hp.LoraGAConfig(target_modules=TARGETS, r=2, num_batches=2),
    # the sketched estimate (issue 14) from activations, as sharded weights require: k = 4r = 8 < 32
    "lora_ga-sketch": lambda: hp.LoraGAConfig(target_modules=TARGETS, r=2, num_batches=2, estimator="sketch",
                                              sketch_size=8),
    # boft_Q is (3, 8, 6): three factors over two ranks, an uneven split
    "boft": lambda: hp.BoftConfig(target_modules=TARGETS, block_size=4, n_factors=3),
    "unitary-structured": lambda: hp.UnitaryConfig(target_modules=TARGETS),
    # one 32×32 block per layer: rank 1 holds no block at all; repairs forced every step
    "unitary-full": lambda: hp.UnitaryConfig(target_modules=TARGETS, parameterization="full", block_size=32,
                                             drift_tolerance=1e-300),
    "hybrid": lambda: hp.HybridConfig(target_modules=TARGETS, lora_r=2, boft_block_size=4, boft_n_factors=2,
                                      lam_init=0.6, ga_num_batches=2),
    "dora": lambda: hp.DoraConfig(target_modules=TARGETS, r=2),  # magnitude per row, norms of W from bind()
    "ia3": lambda: hp.IA3Config(target_modules=TARGETS),  # down_proj scales its input (d_in = 64)
    "full": lambda: hp.FullConfig(),
}
LR = {"full": 1e-3}  # every weight moves in full fine-tuning; adapters take 1e-2


def base_model(empty: bool = False) -> torch.nn.Module:
    """Tied embeddings (as SmolLM2 has): the shared matrix must stay one tensor in one unit.
    ``empty``: parameters on the meta device (a RAM-efficient rank other than 0)."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   tie_word_embeddings=True, dtype=torch.float64)
    torch.manual_seed(0)
    if empty:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = transformers.LlamaForCausalLM(cfg)
        model.tie_weights()
        return model.to(torch.float64).train()
    return transformers.LlamaForCausalLM(cfg).to(torch.float64).train()


def adapted(method: str, empty: bool = False) -> torch.nn.Module:
    model = base_model(empty)
    torch.manual_seed(1)  # adapter initialization (LoRA's A, the structured unitary's reflections)
    return hp.inject(model, CONFIGS[method]())


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """Step ``step``'s global batch (WORLD·ROWS rows); steps < 0 feed LoRA-GA's estimate."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 64, (WORLD * ROWS, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def rank_rows(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {k: v[rank * ROWS:(rank + 1) * ROWS] for k, v in batch.items()}


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy in the logits' dtype (float64 here); transformers' own
    loss casts logits to float32, which would cap the comparison at float32 precision."""
    logits = model(input_ids=batch["input_ids"]).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))


def probe() -> torch.Tensor:
    return torch.randint(0, 64, (3, SEQ), generator=torch.Generator().manual_seed(7))


def _start_state(model: torch.nn.Module, grads: dict) -> dict[str, torch.Tensor]:
    # a sketch's estimate is its leading singular triplets (LowRankGradient): kept as u diag(s) vᵀ
    out = {f"{name}.grad": (g if isinstance(g, torch.Tensor) else g.dense()).double() for name, g in grads.items()}
    for name, (_, part) in lora_ga_targets(model).items():
        out[f"{name}.A0"] = distributed.full(part.lora_A0).detach().cpu()  # a buffer: rank 0's, whole
        out[f"{name}.B0"] = distributed.full(part.lora_B0).detach().cpu()
        out[f"{name}.A"] = distributed.full(part.lora_A).detach().cpu()  # gathered from every rank's rows
        out[f"{name}.B"] = distributed.full(part.lora_B).detach().cpu()
    return out


def _lambdas(model: torch.nn.Module) -> dict[str, list[float]]:
    """Per Hybrid layer: [λ, ‖∇ LoRA-GA branch‖, ‖∇ BOFT branch‖] after the step."""
    return {name: [row["lambda"], row["g_lora"], row["g_boft"]] for name, row in hp.mixing_state(model).items()}


def run(method: str, rank: int, world: int, shard: bool,
        start: dict[str, torch.Tensor] | None = None) -> tuple[torch.nn.Module, dict, dict[str, torch.Tensor]]:
    """Train ``method``; sharded over ``world`` ranks, or (``world == 1``) on the whole batch.

    ``start``: LoRA-GA factors (``<layer>.A0`` / ``<layer>.B0``, as in ``start.safetensors``)
    to begin from instead of the estimated ones.
    """
    # Sharded: the RAM-efficient path — rank 0 builds the model, the others start on the meta
    # device and receive their pieces (and the adapters' initial values) from rank 0.
    model = adapted(method, empty=shard and rank != 0)
    if shard:
        source = fsdp.detach_for_sharding(model) if rank == 0 else None
        fsdp.shard_model(model)
        fsdp.materialize_from_rank0(model, source)
    record: dict = {"loss": [], "lambda": [], "bytes": fsdp.local_parameter_bytes(model)}
    if lora_ga_targets(model):
        # The randomized SVD's draws differ between ranks here (as they can in a real run, where
        # ranks consume random numbers differently); rank 0's factors must be the ones every rank keeps.
        torch.manual_seed(2 + rank)
        batches = [global_batch(-1 - i) for i in range(2)]
        if world > 1:
            batches = [rank_rows(b, rank) for b in batches]
        estimated = _start_state(model, hp.lora_ga_init(model, batches, loss_fn=lm_loss))
        for name, (_, part) in lora_ga_targets(model).items() if start is not None else ():
            part.set_start(start[f"{name}.A0"], start[f"{name}.B0"])
        start = estimated
    optimizer = hp.build_optimizer(model, lr=LR.get(method, 1e-2))
    for step in range(STEPS):
        batch = global_batch(step)
        loss = lm_loss(model, rank_rows(batch, rank) if world > 1 else batch)
        loss.backward()
        record.setdefault("grad_bytes", fsdp.local_parameter_bytes(model)["grad"])
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        hp.after_optimizer_step(model)
        optimizer.zero_grad(set_to_none=True)
        mean = distributed.all_reduce_sum(loss.detach().clone()) / world
        record["loss"].append(mean.item())
        record["lambda"].append(_lambdas(model))
    record["repairs"] = [getattr(layer.adapter.unitary, "reorthonormalizations", None)
                         for _, layer in adapted_layers(model) if hasattr(layer.adapter, "unitary")]
    return model, record, start if lora_ga_targets(model) else {}


def classifier(empty: bool = False) -> torch.nn.Module:
    """A float64 tiny Llama sequence classifier (3 labels; pad id 0, never in the inputs) with LoRA."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   pad_token_id=0, num_labels=3, dtype=torch.float64)
    torch.manual_seed(0)
    if empty:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = transformers.LlamaForSequenceClassification(cfg)
    else:
        model = transformers.LlamaForSequenceClassification(cfg)
    return hp.inject(model.to(torch.float64), hp.LoraConfig(target_modules=["q_proj", "v_proj"], r=2))


def label_batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    return {"input_ids": torch.randint(1, 64, (WORLD * ROWS, SEQ), generator=g),
            "labels": torch.randint(0, 3, (WORLD * ROWS,), generator=g)}


def warm_head(rank: int, world: int, shard: bool) -> torch.nn.Module:
    """``train.head_warmup_steps``' warm-up (``warm_up_head``, 3 steps) sharded or on the global batch.
    ``eps = 0.1``: Adam's early steps are then not invariant to the gradient's scale, so a gradient
    averaged twice or summed instead of averaged moves the head differently."""
    from hybridpeft.train.setup import warm_up_head

    model = classifier(empty=shard and rank != 0)
    if shard:
        source = fsdp.detach_for_sharding(model) if rank == 0 else None
        fsdp.shard_model(model)
        fsdp.materialize_from_rank0(model, source)
    batches = [label_batch(step) for step in range(3)]
    if world > 1:
        batches = [rank_rows(b, rank) for b in batches]
    warm_up_head(model, batches, 3, lr=1e-2, eps=0.1)
    return model


def main(out: Path, methods: list[str]) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    assert world == WORLD, f"run with --nproc_per_node {WORLD}"
    torch.set_num_threads(1)
    for method in methods:
        target = out / method
        target.mkdir(parents=True, exist_ok=True)
        if method == "head-warmup":
            from safetensors.torch import save_file

            head = distributed.full(warm_head(rank, world, shard=True).score.weight).detach().cpu().contiguous()
            if rank == 0:
                save_file({"score": head}, str(target / "head.safetensors"))
            torch.distributed.barrier()
            continue
        model, record, start = run(method, rank, world, shard=True)
        hp.save_adapter(model, target / "adapter")  # collective; rank 0 writes
        with torch.no_grad():
            sharded_logits = model(input_ids=probe()).logits  # every rank runs the same probe
        plain = hp.merge_and_unload(model)  # collective; the plain merged model on rank 0
        if rank == 0:
            from safetensors.torch import save_file

            with torch.no_grad():
                merged_logits = plain.eval()(input_ids=probe()).logits
            save_file({"sharded": sharded_logits.contiguous(), "merged": merged_logits.contiguous()},
                      str(target / "probe.safetensors"))
            if start:
                save_file({k: v.contiguous() for k, v in start.items()}, str(target / "start.safetensors"))
            record["plain_is_unsharded"] = not fsdp.is_sharded_model(plain) and not hasattr(plain, "hybridpeft_config")
        (target / f"rank{rank}.json").write_text(json.dumps(record))
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]), sys.argv[2:])
