"""Activation checkpointing (transformers', non-reentrant) with every method gives the same gradients.

Float64 tiny Llama in train mode; every trainable tensor is moved off its start first, so
each branch carries a gradient. Under checkpointing each block's forward runs again in
backward, including our custom autograd Functions (``ButterflyFunction``,
``RecomputedBaseButterflyFunction``, ``ReversibleStructuredFunction``) and the unitary's
own nested checkpoint (``recompute_base``); LoRA dropout must draw the same mask again.
The recomputation repeats the same float64 operations, so the gradients agree to rounding;
bound: 1e-12 of the largest gradient entry (measured: identical). A recomputation that
differs from the forward (e.g. checkpointing without ``preserve_rng_state``, which redraws
the dropout masks) fails by ~1e-2.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hybridpeft as hp
import tiny_models
from hybridpeft.gradient_init import lora_ga_targets
from hybridpeft.train.setup import enable_activation_checkpointing

TARGETS = ["q_proj", "v_proj", "down_proj"]
CONFIGS = {
    "lora": lambda: hp.LoraConfig(target_modules=TARGETS, r=2, dropout=0.2),
    "lora_ga": lambda: hp.LoraGAConfig(target_modules=TARGETS, r=2, num_batches=1, dropout=0.2),
    "boft": lambda: hp.BoftConfig(target_modules=TARGETS, block_size=4, n_factors=2),
    "boft-recompute_base": lambda: hp.BoftConfig(target_modules=TARGETS, block_size=4, n_factors=2, recompute_base=True),
    "unitary-structured": lambda: hp.UnitaryConfig(target_modules=TARGETS),
    "unitary-structured-recompute": lambda: hp.UnitaryConfig(target_modules=TARGETS, recompute=True),
    "unitary-structured-recompute_base": lambda: hp.UnitaryConfig(target_modules=TARGETS, recompute_base=True),
    "unitary-full": lambda: hp.UnitaryConfig(target_modules=TARGETS, parameterization="full", block_size=8),
    "unitary-full-recompute_base": lambda: hp.UnitaryConfig(target_modules=TARGETS, parameterization="full",
                                                            block_size=8, recompute_base=True),
    "hybrid": lambda: hp.HybridConfig(target_modules=TARGETS, lora_r=2, boft_block_size=4, boft_n_factors=2,
                                      ga_num_batches=1, lam_init=0.3, lora_dropout=0.2),
    "hybrid-recompute_base": lambda: hp.HybridConfig(target_modules=TARGETS, lora_r=2, boft_block_size=4,
                                                     boft_n_factors=2, ga_num_batches=1, recompute_base=True),
    "dora": lambda: hp.DoraConfig(target_modules=TARGETS, r=2, dropout=0.2),
    "ia3": lambda: hp.IA3Config(target_modules=TARGETS),
    "full": lambda: hp.FullConfig(),
}


def batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def lm_loss(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"]).logits  # float64 (transformers' own loss would cast to float32)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1))


def adapted(name: str, checkpointing: bool) -> torch.nn.Module:
    model = tiny_models.tiny_llama(torch.float64, kv_heads=4).train()
    if checkpointing:
        enable_activation_checkpointing(model)
    torch.manual_seed(1)
    hp.inject(model, CONFIGS[name]())
    if lora_ga_targets(model):
        torch.manual_seed(2)
        hp.lora_ga_init(model, [batch(5)], loss_fn=lm_loss)
    torch.manual_seed(3)
    with torch.no_grad():  # off the start: every branch (BOFT's Q, B of LoRA, phases, blocks) gets a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def gradients(name: str, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """(gradients of every trainable tensor, calls of the first block's q_proj in one step)."""
    model = adapted(name, checkpointing)
    calls = []
    # a pre-hook: non-reentrant recomputation stops early once it has what backward needs
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(4)  # dropout masks
    lm_loss(model, batch(0)).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_checkpointing_keeps_every_gradient(name):
    (plain, plain_calls), (checkpointed, calls) = gradients(name, False), gradients(name, True)
    assert (plain_calls, calls) == (1, 2)  # the block really ran again in backward
    assert plain.keys() == checkpointed.keys() and plain
    scale = max(g.abs().max().item() for g in plain.values())
    assert scale > 0
    for key, expected in plain.items():
        actual = checkpointed[key]
        assert actual is not None, f"{key}: no gradient under checkpointing"
        assert (actual - expected).abs().max().item() <= 1e-12 * scale, key


@pytest.mark.parametrize("name", ["lora_ga", "hybrid"])
def test_lora_ga_estimate_under_checkpointing(name):
    """The gradient estimate's host hooks see the recomputed forward too; it must count once."""
    estimates = []
    for checkpointing in (False, True):
        model = tiny_models.tiny_llama(torch.float64, kv_heads=4).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        torch.manual_seed(1)
        hp.inject(model, CONFIGS[name]())
        estimates.append(hp.lora_ga_init(model, [batch(5)], loss_fn=lm_loss, estimator="activations"))
    for key, expected in estimates[0].items():
        assert torch.allclose(estimates[1][key], expected, rtol=1e-6, atol=1e-7 * expected.abs().max().item()), key
