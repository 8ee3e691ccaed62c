"""The per-forward batched preparation of BOFT and Hybrid blocks (``hybridpeft.adapters.prepared``).

A model forward computes every layer's rotation blocks in one batched pass; each layer
takes its slice. These tests hold that path to the per-layer one (values and gradients to
float64 tolerance), and check when a slice may and may not be used: after an optimizer
step, under a different grad mode, after the backward that consumed it, under deepcopy.
"""
from __future__ import annotations

import copy

import pytest
import torch

import hybridpeft as hp
from hybridpeft.adapters import prepared
from hybridpeft.adapters.boft import BoftAdapter, BoftConfig, composed_bank
from hybridpeft.adapters.hybrid import HybridAdapter, HybridConfig
from hybridpeft.inject import adapted_layers, prepare_adapters
from tiny_models import tiny_llama

TOL = dict(rtol=1e-10, atol=1e-12)
CONFIGS = {
    "boft": lambda: BoftConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                               block_size=4, n_factors=3),
    "boft-input": lambda: BoftConfig(target_modules=["q_proj", "o_proj", "down_proj"], block_size=4, n_factors=2, side="input"),
    "boft-m1": lambda: BoftConfig(target_modules=["q_proj", "v_proj", "up_proj"], block_size=4, n_factors=1),
    "hybrid": lambda: HybridConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                   boft_block_size=4, boft_n_factors=3, lam_init=0.3),
}


@pytest.fixture(autouse=True)
def prepare_on_cpu(monkeypatch):
    """The preparation runs on CUDA by default (``PREPARE_DEVICES``); these tests opt the CPU in."""
    monkeypatch.setattr(prepared, "PREPARE_DEVICES", prepared.PREPARE_DEVICES | {"cpu"})


def adapted(method: str, seed: int = 0) -> torch.nn.Module:
    model = hp.inject(tiny_llama(torch.float64), CONFIGS[method]())
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in hp.trainable_parameters(model).items():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(input_ids=ids, labels=ids).loss
    params = hp.trainable_parameters(model)
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.detach(), dict(zip(params, grads))


def without_preparation(model: torch.nn.Module):
    """The same model with the pre-hook taken off: every layer computes its own blocks."""
    plain = copy.deepcopy(model)
    from hybridpeft.inject import remove_prepare_hook

    remove_prepare_hook(plain)
    return plain


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_batched_blocks_give_the_per_layer_loss_and_gradients(method):
    model = adapted(method)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    hits = []
    original = prepared.take

    def counting_take(adapter, *sources):
        value = original(adapter, *sources)
        hits.append(value is not None)
        return value

    import hybridpeft.adapters.boft as boft_module
    import hybridpeft.adapters.hybrid as hybrid_module

    boft_module.take, hybrid_module.take = counting_take, counting_take
    try:
        loss, grads = loss_and_grads(model, ids)
    finally:
        boft_module.take, hybrid_module.take = original, original
    assert hits and all(hits)  # every layer took its batched slice
    plain_loss, plain_grads = loss_and_grads(without_preparation(model), ids)
    torch.testing.assert_close(loss, plain_loss, **TOL)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], **TOL, msg=name)


def test_composed_bank_equals_each_adapters_own_blocks():
    torch.manual_seed(0)
    adapters = [BoftAdapter(8, d, BoftConfig(block_size=4, n_factors=3)).double() for d in (16, 48, 32)]
    for a in adapters:
        with torch.no_grad():
            a.boft_Q.normal_(0, 0.5)
    [(group, blocks)] = composed_bank(adapters)
    assert group == adapters
    pieces = blocks.split([a.dim // a.composed_size for a in adapters])
    for adapter, piece in zip(adapters, pieces):
        prepared.discard([adapter])
        torch.testing.assert_close(piece, adapter.composed_blocks(), **TOL)


def test_a_slice_is_not_used_after_the_parameter_changes():
    model = adapted("boft")
    layer = adapted_layers(model)[0][1].adapter
    prepare_adapters(model)
    assert prepared.take(layer, layer.boft_Q) is not None
    with torch.no_grad():
        layer.boft_Q.add_(0.1)  # what an optimizer step does: an in-place update
    assert prepared.take(layer, layer.boft_Q) is None


def test_a_slice_made_without_grad_is_not_used_where_a_gradient_is_wanted():
    model = adapted("hybrid")
    layer = adapted_layers(model)[0][1].adapter
    with torch.no_grad():
        prepare_adapters(model)
        assert prepared.take(layer, layer.boft.boft_Q, layer.mix_lambda) is not None
    assert prepared.take(layer, layer.boft.boft_Q, layer.mix_lambda) is None
    ids = torch.randint(0, 64, (1, 5))
    loss, grads = loss_and_grads(model, ids)  # a fresh, grad-carrying preparation
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_slices_are_dropped_once_their_gradient_has_passed():
    model = adapted("boft")
    ids = torch.randint(0, 64, (1, 5))
    layers = [layer.adapter for _, layer in adapted_layers(model)]
    loss = model(input_ids=ids, labels=ids).loss
    assert all(prepared.take(a, a.boft_Q) is not None for a in layers)
    loss.backward()
    assert all(prepared.take(a, a.boft_Q) is None for a in layers)
    # a layer run on its own after the backward computes its own blocks and trains normally
    x = torch.randn(3, layers[0].d_in, dtype=torch.float64)
    host = adapted_layers(model)[0][1]
    host(x).sum().backward()
    assert layers[0].boft_Q.grad is not None


def test_gradient_accumulation_prepares_afresh_per_forward():
    model = adapted("hybrid")
    ids = [torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    for batch in ids:
        model(input_ids=batch, labels=batch).loss.backward()  # the second forward must not reuse the first graph
    accumulated = {n: p.grad.clone() for n, p in hp.trainable_parameters(model).items()}
    plain = without_preparation(model)
    for p in plain.parameters():
        p.grad = None
    for batch in ids:
        plain(input_ids=batch, labels=batch).loss.backward()
    for name, p in hp.trainable_parameters(plain).items():
        torch.testing.assert_close(accumulated[name], p.grad, **TOL, msg=name)


def test_deepcopy_after_a_forward_and_merge_and_unload_removes_the_hook():
    model = adapted("boft")
    ids = torch.randint(0, 64, (1, 5))
    model(input_ids=ids, labels=ids).loss  # slices with autograd history now exist
    twin = copy.deepcopy(model)  # must not try to copy them
    torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits, **TOL)
    assert prepare_adapters in twin._forward_pre_hooks.values()
    plain = hp.merge_and_unload(twin)
    assert prepare_adapters not in plain._forward_pre_hooks.values()


def test_disabled_and_merged_layers_are_not_prepared():
    model = adapted("boft")
    layers = [layer.adapter for _, layer in adapted_layers(model)]
    with hp.disabled(model):
        prepare_adapters(model)
        assert all(prepared.take(a, a.boft_Q) is None for a in layers)


def test_the_cpu_is_not_prepared_by_default(monkeypatch):
    monkeypatch.setattr(prepared, "PREPARE_DEVICES", {"cuda"})
    model = adapted("hybrid")
    ids = torch.randint(0, 64, (1, 5))
    model(input_ids=ids, labels=ids).loss.backward()
    layers = [layer.adapter for _, layer in adapted_layers(model)]
    prepare_adapters(model)
    assert all(prepared.take(a, a.boft.boft_Q, a.mix_lambda) is None for a in layers)


def test_planner_counts_what_a_prepared_hybrid_saves(tmp_path):
    """As test_plan's formula test, with the preparation on: the per-block λ is counted exactly."""
    from hybridpeft.plan import PlanRequest, plan
    from test_plan import saved_bytes, tiny_config

    config = tiny_config("llama")
    (tmp_path / "config.json").write_text(config.to_json_string())
    torch.manual_seed(0)
    model = __import__("transformers").LlamaForCausalLM(config).train()
    fields = {"boft_block_size": 4, "boft_n_factors": 3}
    hp.inject(model, HybridConfig(target_modules=["q_proj", "v_proj", "down_proj"], **fields))
    measured = saved_bytes(model, torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0)))
    request = PlanRequest(str(tmp_path), "hybrid", fields, targets=["q_proj", "v_proj", "down_proj"], batch=2, seq=16,
                          dtype="float32", device_kind="cpu")
    p = plan(request)
    assert p.activations["base"] + p.activations["adapted_modules"] == measured
