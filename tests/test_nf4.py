"""Adapters on a bitsandbytes NF4 (4-bit) base, the QLoRA setting, on CPU.

For each method: output unchanged at init, training moves only adapter tensors
(the packed codes stay byte-identical), save/load onto a fresh 4-bit model,
merge refused by name, merge_and_unload to an equivalent float model. And the
LoRA-GA gradient estimate from activations (``gᵀ x``), which a 4-bit weight needs.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

import hybridpeft as hp  # noqa: E402
import tiny_models  # noqa: E402
from hybridpeft.adapters.base import (  # noqa: E402
    dequantize_4bit_weight,
    is_4bit_layer,
    is_supported_layer,
    layer_shape,
    weight_of,
)
from hybridpeft.adapters import base as base_module  # noqa: E402
from hybridpeft.gradient_init import estimate_gradients, lora_ga_targets  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]  # d_out 32, 16, 32

CONFIGS = {
    "lora": lambda: hp.LoraConfig(target_modules=TARGETS, r=2),
    "boft": lambda: hp.BoftConfig(target_modules=TARGETS, block_size=4, n_factors=2),
    "unitary-structured": lambda: hp.UnitaryConfig(target_modules=TARGETS),
    "unitary-full": lambda: hp.UnitaryConfig(target_modules=TARGETS, parameterization="full", block_size=8),
    "hybrid": lambda: hp.HybridConfig(target_modules=TARGETS, lora_r=2, boft_block_size=4, boft_n_factors=2,
                                      lam_init=0.6),
    "dora": lambda: hp.DoraConfig(target_modules=TARGETS, r=2),
    "ia3": lambda: hp.IA3Config(target_modules=TARGETS),  # down_proj scales its input
}
ATOL = 1e-6  # float32 logits of order 0.3; measured differences are below 1e-7


def quantize_nf4(model: nn.Module, targets=TARGETS) -> nn.Module:
    """Replace the target ``nn.Linear`` layers by NF4 ``Linear4bit`` (computing in the weight's dtype), in place."""
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] not in targets:
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=module.weight.dtype, quant_type="nf4", device="cpu")
        q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to("cpu"))  # .to() quantizes
    return model


def llama(dtype=torch.float32) -> nn.Module:
    """tiny_models' Llama with biases on every projection, so the host's bias handling is exercised."""
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, mlp_bias=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # transformers starts biases at zero
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    # train mode: on AVX512-BF16 CPUs an eval-mode, no-grad Linear4bit repacks its codes in place
    # (tested separately below); this Llama has no dropout, so the outputs are the same.
    return model.train()


def nf4_llama(dtype=torch.float32) -> nn.Module:
    return quantize_nf4(llama(dtype))


def batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"]).logits


def packed(model):
    """Every 4-bit layer's codes and block scales, by name."""
    return {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
            for n, m in model.named_modules() if is_4bit_layer(m)}


def train(model, steps=3):
    optimizer = hp.build_optimizer(model, lr=1e-2)
    for i in range(steps):
        model(**batch(seed=10 + i)).loss.backward()
        optimizer.step()
        hp.after_optimizer_step(model)
        optimizer.zero_grad(set_to_none=True)
    return model


def _no_dense_weight(layer):
    raise AssertionError("a dense W was dequantized in the training step")


def adapted_nf4(method):
    return hp.inject(nf4_llama(), CONFIGS[method]())


# ---------------------------------------------------------------------------
# The host layer


def test_4bit_layer_is_recognised_by_shape_not_by_packed_weight():
    layer = nf4_llama().model.layers[0].self_attn.v_proj
    assert layer.weight.shape == (32 * 16 // 2, 1) and layer.weight.dtype == torch.uint8
    assert is_4bit_layer(layer) and is_supported_layer(layer)
    assert layer_shape(layer) == (32, 16)
    w = weight_of(layer)
    assert w.shape == (16, 32) and w.dtype == torch.float32
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), x @ w.t() + layer.bias, atol=1e-6, rtol=0)
    assert not is_4bit_layer(nn.Linear(4, 4))


def test_forward_uses_packed_codes_and_passes_gradients_to_the_input():
    model = adapted_nf4("lora")
    host = model.model.layers[0].self_attn.q_proj
    assert host.quantized and "quantized=True" in repr(host)
    x = torch.randn(2, 5, 32, requires_grad=True)
    w = host.weight  # dequantized copy
    h = host._base_matmul(x)
    torch.testing.assert_close(h, x @ w.t(), atol=1e-6, rtol=0)
    h.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2, 5, 32) @ w, atol=1e-6, rtol=0)


def test_dequantize_reads_the_cpu_inference_layout():
    """bitsandbytes may repack a CPU Linear4bit for inference; dequantizing must still give W
    (up to the bfloat16 rounding that layout applies to the block scales)."""
    convert = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU inference layout")
    layer = nf4_llama().model.layers[0].mlp.down_proj  # (32, 64): whole 32-row blocks, 64-wide scale blocks
    before = dequantize_4bit_weight(layer)
    layer.weight.data, layer.weight.quant_state = convert(layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(dequantize_4bit_weight(layer), before, atol=1e-7, rtol=2 ** -8)
    assert not layer.weight.quant_state.packing_format_for_cpu


# ---------------------------------------------------------------------------
# Every method on a 4-bit base


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_output_unchanged_at_init_and_disabled_is_the_base(method):
    b = batch()
    base = logits(nf4_llama(), b)
    model = adapted_nf4(method)
    assert {n for n, _ in hp.adapted_layers(model)} == {
        f"model.layers.{i}.{part}" for i in range(2) for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert all(layer.quantized for _, layer in hp.adapted_layers(model))
    assert all(p.dtype == torch.float32 for p in hp.trainable_parameters(model).values())
    torch.testing.assert_close(logits(model, b), base, atol=ATOL, rtol=0)
    train(model, steps=1)
    assert not torch.allclose(logits(model, b), base, atol=1e-4)
    with hp.disabled(model):
        torch.testing.assert_close(logits(model, b), base, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_training_changes_only_adapters_and_round_trips(method, tmp_path, monkeypatch):
    model = adapted_nf4(method)
    codes = packed(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()}
    trainable = {n: p.detach().clone() for n, p in hp.trainable_parameters(model).items()}
    with monkeypatch.context() as patch:  # training never materialises a dense W
        patch.setattr(base_module, "dequantize_4bit_weight", _no_dense_weight)
        train(model)
    for name, (data, absmax) in packed(model).items():
        assert torch.equal(data, codes[name][0]) and torch.equal(absmax, codes[name][1]), name
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert any(not torch.equal(p, trainable[n]) for n, p in hp.trainable_parameters(model).items())

    b = batch()
    adapted = logits(model, b)
    hp.save_adapter(model, tmp_path)
    loaded = hp.load_adapter(nf4_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, b), adapted, atol=1e-6, rtol=0)
    # what `hybridpeft merge` does: the same adapter on the unquantized base merges in place
    on_float = hp.merge(hp.load_adapter(llama(), tmp_path))
    assert all(layer.merged and not layer.quantized for _, layer in hp.adapted_layers(on_float))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_merge_is_refused_and_merge_and_unload_gives_a_float_model(method):
    model = train(adapted_nf4(method), steps=2)
    b = batch()
    adapted = logits(model, b)
    with pytest.raises(RuntimeError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*4-bit.*merge_and_unload"):
        hp.merge(model)
    assert not any(layer.merged for _, layer in hp.adapted_layers(model))
    with pytest.raises(RuntimeError, match="4-bit"):
        model.model.layers[1].mlp.down_proj.merge()
    torch.testing.assert_close(logits(model, b), adapted, atol=0, rtol=0)

    plain = hp.merge_and_unload(model)
    assert not hp.adapted_layers(plain) and not any(is_4bit_layer(m) for m in plain.modules())
    down = plain.model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear and down.weight.dtype == torch.float32 and not down.weight.requires_grad
    torch.testing.assert_close(logits(plain, b), adapted, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------
# LoRA-GA: gradients from activations


def _perturb(model, scale=0.2):
    torch.manual_seed(4)
    with torch.no_grad():
        for p in hp.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.mark.parametrize("config", [
    hp.HybridConfig(target_modules=TARGETS, lora_r=2, boft_block_size=4, boft_n_factors=2),
    hp.BoftConfig(target_modules=TARGETS, block_size=4, n_factors=2, side="input"),
], ids=["hybrid", "boft-input-side"])
def test_activation_estimate_equals_parameter_hooks_through_any_adapter(config):
    """``Σ gᵀ x`` is taken at the base matmul, so it is ∇_W L even when the adapter rotates W x
    (trained Hybrid: R ≠ I, λ ≠ 1) or feeds W a rotated input (input-side BOFT)."""
    model = _perturb(hp.inject(llama(torch.float64), config))
    layers = dict(hp.adapted_layers(model))
    batches = [batch(seed) for seed in (5, 6)]
    by_param = estimate_gradients(model, {n: l.base_layer.weight for n, l in layers.items()}, batches, num_batches=2)
    by_activation = estimate_gradients(model, {}, batches, num_batches=2, hosts=layers)
    for name, g in by_param.items():
        assert by_activation[name].dtype == torch.float32 and g.abs().max() > 0
        # both are float64 sums until the float32 accumulator; gradients here are ~1e-7..1e-4,
        # so the tolerance is relative to each layer's largest entry
        torch.testing.assert_close(by_activation[name], g, atol=1e-6 * g.abs().max().item(), rtol=1e-5)
    assert all(not p.requires_grad for p in model.parameters() if p not in set(hp.trainable_parameters(model).values()))


@pytest.mark.parametrize("build, targets", [
    (tiny_models.tiny_llama, TARGETS), (tiny_models.tiny_gpt2, ["c_attn", "c_fc"]),
], ids=["llama", "gpt2-conv1d"])
def test_lora_ga_init_estimators_agree(build, targets):
    results = {}
    for estimator in ("auto", "activations"):
        model = hp.inject(build(torch.float64), hp.LoraGAConfig(target_modules=targets, r=2))
        results[estimator] = hp.lora_ga_init(model, [batch(5), batch(6)], num_batches=2, estimator=estimator)
    for name, g in results["auto"].items():
        assert results["activations"][name].shape == g.shape  # (d_out, d_in) for Conv1D too
        assert g.abs().max() > 0
        torch.testing.assert_close(results["activations"][name], g, atol=1e-6 * g.abs().max().item(), rtol=1e-5)
    with pytest.raises(ValueError, match="estimator='params'"):
        hp.lora_ga_init(model, [batch()], num_batches=1, estimator="params")


@pytest.mark.parametrize("method", ["lora_ga", "hybrid"])
def test_lora_ga_init_on_4bit_base(method):
    """The estimate on the 4-bit model equals the ordinary estimate on a float model holding the
    dequantized weights; the start leaves the output unchanged."""
    config = (hp.LoraGAConfig(target_modules=TARGETS, r=2) if method == "lora_ga"
              else hp.HybridConfig(target_modules=TARGETS, lora_r=2, boft_block_size=4, boft_n_factors=2))
    batches = [batch(5), batch(6)]
    model = hp.inject(nf4_llama(), config)
    reference = hp.inject(llama(), config)
    with torch.no_grad():
        for name, layer in hp.adapted_layers(model):
            reference.get_submodule(name).base_layer.weight.copy_(layer.weight)
    expected = hp.lora_ga_init(reference, batches, num_batches=2)

    b = batch()
    before = logits(model, b)
    grads = hp.lora_ga_init(model, batches, num_batches=2)
    assert set(grads) == set(expected)
    for name, g in grads.items():  # the same float32 products: equal in practice
        torch.testing.assert_close(g, expected[name], atol=1e-6 * g.abs().max().item(), rtol=1e-5)
    for _, part in lora_ga_targets(model).values():
        assert part.lora_A0.norm() > 0 and part.lora_B0.norm() > 0
    torch.testing.assert_close(logits(model, b), before, atol=ATOL, rtol=0)
    train(model, steps=1)
    assert not torch.allclose(logits(model, b), before, atol=1e-4)


def test_subtract_offset_is_refused_on_4bit_base():
    model = hp.inject(nf4_llama(), hp.LoraGAConfig(target_modules=TARGETS, r=2, offset="subtract"))
    with pytest.raises(ValueError, match=r"offset='subtract'.*'model\.layers\.0\.self_attn\.q_proj'.*offset='adapter'"):
        hp.lora_ga_init(model, [batch()], num_batches=1)


def test_bfloat16_compute_with_float32_adapters():
    """The usual QLoRA setting: bf16 activations, NF4 base, float32 adapter tensors; merge_and_unload
    returns bf16 layers (the dtype the weights had before quantization)."""
    b = batch()
    base = logits(nf4_llama(torch.bfloat16), b)
    model = hp.inject(nf4_llama(torch.bfloat16), CONFIGS["hybrid"]())
    assert all(p.dtype == torch.float32 for p in hp.trainable_parameters(model).values())
    hp.lora_ga_init(model, [batch(5)], num_batches=1)
    out = logits(model, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), base.float(), atol=8e-3, rtol=0)  # bf16 logits ~0.3: ulp 2e-3
    train(model, steps=1)
    adapted = logits(model, b)
    plain = hp.merge_and_unload(model)
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits(plain, b).float(), adapted.float(), atol=8e-3, rtol=0)


def test_gradient_cache_works_on_4bit_base(tmp_path, monkeypatch):
    """The cache key fingerprints the packed codes; a fresh 4-bit model hits it."""
    first = hp.lora_ga_init(hp.inject(nf4_llama(), hp.LoraGAConfig(target_modules=TARGETS, r=2)),
                            [batch(5)], num_batches=1, cache_dir=tmp_path)
    monkeypatch.setattr("hybridpeft.gradient_init.estimate_gradients", lambda *a, **k: pytest.fail("estimated again"))
    again = hp.lora_ga_init(hp.inject(nf4_llama(), hp.LoraGAConfig(target_modules=TARGETS, r=2)),
                            [batch(5)], num_batches=1, cache_dir=tmp_path)
    assert set(again) == set(first) and all(torch.equal(again[n], g) for n, g in first.items())
