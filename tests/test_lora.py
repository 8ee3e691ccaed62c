"""Invariants of the core: LoRA, injection, merge/unmerge, disable, save/load, full FT."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hybridpeft as hp
from hybridpeft.adapters.lora import lowrank_frobenius

transformers = pytest.importorskip("transformers")
from numerics import assert_close_ulps
from tiny_models import tiny_llama, tiny_gpt2, mlp

MODELS = {
    "mlp": (mlp, ["0", "2"], lambda: torch.randn(5, 12, dtype=torch.float64)),
    "llama": (lambda: tiny_llama(torch.float64), ["q_proj", "v_proj", "down_proj"],
              lambda: torch.randint(0, 64, (2, 7))),
    "gpt2": (lambda: tiny_gpt2(torch.float64), ["c_attn", "c_fc", "attn.c_proj"],
             lambda: torch.randint(0, 64, (2, 7))),
}


def output(model, inputs):
    out = model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def perturb(model, scale=0.3):
    with torch.no_grad():
        for p in hp.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * scale)


@pytest.fixture(params=sorted(MODELS))
def case(request):
    build, targets, make_input = MODELS[request.param]
    torch.manual_seed(1)
    return build, targets, make_input()


def test_lora_identity_at_init_and_perturbation_changes_output(case):
    build, targets, x = case
    base = output(build(), x)
    model = hp.inject(build(), hp.LoraConfig(target_modules=targets, r=4))
    # B = 0 adds exactly zero, but the bias is added after the GEMM where the base layer
    # adds it inside (nn.Linear, Conv1D): another CPU's BLAS may round that differently.
    assert_close_ulps(output(model, x), base)
    perturb(model)
    assert not torch.allclose(output(model, x), base)


def test_lora_merge_equals_unmerged_and_unmerge_restores(case):
    build, targets, x = case
    model = hp.inject(build(), hp.LoraConfig(target_modules=targets, r=4))
    perturb(model)
    weights = {n: layer.weight.detach().clone() for n, layer in hp.adapted_layers(model)}
    adapted = output(model, x)
    hp.merge(model)
    assert torch.allclose(output(model, x), adapted, rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="already merged"):
        hp.merge(model)
    hp.unmerge(model)
    for n, layer in hp.adapted_layers(model):
        assert torch.allclose(layer.weight, weights[n], atol=1e-12)


def test_merge_in_float32_within_relative_tolerance():
    model = hp.inject(tiny_llama(torch.float32), hp.LoraConfig(target_modules="all-linear", r=4))
    perturb(model, 0.05)
    x = torch.randint(0, 64, (2, 9))
    adapted = output(model, x)
    hp.merge(model)
    merged = output(model, x)
    assert ((merged - adapted).norm() / adapted.norm()).item() < 1e-5


def test_disabled_gives_base_output_and_restores_state_on_error(case):
    build, targets, x = case
    base = output(build(), x)
    model = hp.inject(build(), hp.LoraConfig(target_modules=targets, r=4))
    perturb(model)
    adapted = output(model, x)
    with hp.disabled(model):
        assert torch.allclose(output(model, x), base, atol=1e-12)
    with pytest.raises(KeyError):
        with hp.disabled(model):
            raise KeyError("boom")
    assert torch.equal(output(model, x), adapted)
    hp.merge(model)  # disabling a merged model unmerges for the duration, then merges back
    with hp.disabled(model):
        assert torch.allclose(output(model, x), base, atol=1e-10)
    assert all(layer.merged for _, layer in hp.adapted_layers(model))


def test_only_adapter_parameters_change_after_training_steps():
    model = hp.inject(tiny_llama(), hp.LoraConfig(target_modules=["q_proj", "up_proj"], r=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = hp.trainable_parameters(model)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    x = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable), n
    assert all(".adapter." in n for n in trainable)  # naming is a consequence, not how we find them


def test_lora_parameter_count_closed_form():
    model = tiny_llama()
    cfg = model.config
    r = 4
    hp.inject(model, hp.LoraConfig(r=r))  # default targets: q k v o gate up down
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = r * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    assert hp.count_trainable(model) == per_layer * cfg.num_hidden_layers


def test_save_reseed_load_round_trip(tmp_path, case):
    build, targets, x = case
    model = hp.inject(build(), hp.LoraConfig(target_modules=targets, r=3, alpha=7.0))
    perturb(model)
    expected = output(model, x)
    hp.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["method"] == "lora" and saved["r"] == 3
    torch.manual_seed(1234)
    restored = hp.load_adapter(build(), tmp_path)
    assert torch.equal(output(restored, x), expected)


def test_saved_adapter_holds_no_base_weights(tmp_path):
    from safetensors.torch import load_file

    model = hp.inject(tiny_llama(), hp.LoraConfig(target_modules=["q_proj"], r=2))
    hp.save_adapter(model, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter.safetensors")))
    assert keys == {f"model.layers.{i}.self_attn.q_proj.adapter.{p}" for i in range(2) for p in ("lora_A", "lora_B")}


def test_load_names_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    model = hp.inject(tiny_llama(), hp.LoraConfig(target_modules=["q_proj"], r=2))
    hp.save_adapter(model, tmp_path)
    state = load_file(str(tmp_path / "adapter.safetensors"))
    state.pop("model.layers.1.self_attn.q_proj.adapter.lora_B")
    state["model.layers.9.bogus"] = torch.zeros(1)
    save_file(state, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj\.adapter\.lora_B.*layers\.9\.bogus"):
        hp.load_adapter(tiny_llama(), tmp_path)


def test_newer_format_version_is_refused(tmp_path):
    model = hp.inject(tiny_llama(), hp.LoraConfig(target_modules=["q_proj"], r=2))
    hp.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version=99"):
        hp.load_adapter(tiny_llama(), tmp_path)


def test_merge_and_unload_gives_plain_model_with_same_logits(tmp_path):
    model = hp.inject(tiny_llama(), hp.LoraConfig(target_modules="all-linear", r=4))
    perturb(model, 0.05)
    x = torch.randint(0, 64, (2, 9))
    adapted = output(model, x)
    plain = hp.merge_and_unload(model)
    assert not hp.adapted_layers(plain) and not hasattr(plain, "hybridpeft_config")
    plain.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(output(reloaded, x), adapted, rtol=1e-5, atol=1e-5)


def test_generate_works_through_adapters():
    model = hp.inject(tiny_llama(), hp.LoraConfig(target_modules=["q_proj", "v_proj"], r=2))
    perturb(model)
    out = model.generate(torch.randint(0, 64, (1, 4)), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_finite(dtype):
    model = hp.inject(tiny_llama(dtype), hp.LoraConfig(target_modules="all-linear", r=4))
    perturb(model, 0.01)
    logits = output(model, torch.randint(0, 64, (2, 6)))
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_full_fine_tuning_trains_everything_and_round_trips(tmp_path):
    model = hp.inject(tiny_llama(), hp.FullConfig())
    assert hp.count_trainable(model) == sum(p.numel() for p in model.parameters())
    perturb(model, 0.01)
    x = torch.randint(0, 64, (2, 5))
    hp.save_adapter(model, tmp_path)
    assert torch.allclose(output(hp.load_adapter(tiny_llama(), tmp_path), x), output(model, x))


def test_trainable_modules_train_and_save_with_adapter(tmp_path):
    model = hp.inject(tiny_llama(), hp.LoraConfig(target_modules=["q_proj"], r=2, trainable_modules=["lm_head"]))
    names = set(hp.trainable_parameters(model))
    assert "lm_head.weight" in names
    perturb(model)
    x = torch.randint(0, 64, (2, 5))
    hp.save_adapter(model, tmp_path)
    assert torch.equal(output(hp.load_adapter(tiny_llama(), tmp_path), x), output(model, x))


def test_lora_norm_bound_is_enforced_after_step():
    model = hp.inject(mlp(), hp.LoraConfig(target_modules=["0"], r=4, norm_bound=0.01))
    layer = dict(hp.adapted_layers(model))["0"]
    perturb(model, 1.0)
    hp.after_optimizer_step(model)
    delta = layer.adapter.delta_weight()
    assert delta.norm() <= 0.01 * layer.weight.norm() * (1 + 1e-9)
    assert torch.isclose(layer.adapter.scaling * lowrank_frobenius(layer.adapter.lora_B, layer.adapter.lora_A), delta.norm())


def test_rslora_scaling():
    assert hp.LoraConfig(r=16, alpha=8, rslora=True).scaling() == pytest.approx(2.0)
    assert hp.LoraConfig(r=16, alpha=8).scaling() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"r": 0}, "r"), ({"alpha": -1.0}, "alpha"), ({"dropout": 1.5}, "dropout"),
     ({"target_modules": []}, "target_modules"), ({"adapter_dtype": "int8"}, "adapter_dtype"),
     ({"norm_bound": 0.0}, "norm_bound"), ({"target_modules": ["re:("]}, "target_modules")],
)
def test_bad_config_names_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=field):
        hp.LoraConfig(**kwargs)


def test_injection_errors_name_module_and_field():
    with pytest.raises(ValueError, match="'nope' matches no module"):
        hp.inject(tiny_llama(), hp.LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="'model.norm' of type LlamaRMSNorm"):
        hp.inject(tiny_llama(), hp.LoraConfig(target_modules=["norm"]))
    with pytest.raises(ValueError, match=r"cannot adapt '0'.*r=64"):
        hp.inject(mlp(), hp.LoraConfig(target_modules=["0"], r=64))
    model = hp.inject(mlp(), hp.LoraConfig(target_modules=["0"], r=2))
    with pytest.raises(ValueError, match="already has hybridpeft adapters"):
        hp.inject(model, hp.LoraConfig(target_modules=["2"], r=2))


def test_regex_and_suffix_targets():
    model = hp.inject(tiny_llama(), hp.LoraConfig(target_modules=[r"re:model\.layers\.0\..*_proj", "layers.1.mlp.up_proj"], r=2))
    names = [n for n, _ in hp.adapted_layers(model)]
    assert len(names) == 8 and names[-1] == "model.layers.1.mlp.up_proj"
    assert all(n.startswith("model.layers.0.") for n in names[:-1])


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 24), d_out=st.integers(1, 24), r=st.integers(1, 30), alpha=st.floats(0.1, 64))
def test_lora_property_valid_or_clear_error(d_in, d_out, r, alpha):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    x = torch.randn(3, d_in, dtype=torch.float64)
    base = model(x)
    try:
        hp.inject(model, hp.LoraConfig(target_modules=["0"], r=r, alpha=alpha))
    except ValueError as err:
        assert r > min(d_in, d_out) and "r=" in str(err)
        return
    # Not bitwise: nn.Linear adds the bias inside its GEMM, the host adds it after (1 ulp apart at d_in=1).
    torch.testing.assert_close(model(x), base, rtol=0, atol=1e-14)
    perturb(model)
    adapted = model(x)
    hp.merge(model)
    assert torch.allclose(model(x), adapted, atol=1e-10)


def test_lora_matches_hf_peft_given_same_factors():
    peft = pytest.importorskip("peft")
    ours = hp.inject(tiny_llama(torch.float64), hp.LoraConfig(target_modules=["q_proj", "down_proj"], r=4, alpha=8))
    theirs = peft.get_peft_model(
        tiny_llama(torch.float64), peft.LoraConfig(target_modules=["q_proj", "down_proj"], r=4, lora_alpha=8, lora_dropout=0.0)
    )
    perturb(ours)
    theirs_modules = dict(theirs.named_modules())
    with torch.no_grad():
        for name, layer in hp.adapted_layers(ours):
            peft_layer = theirs_modules["base_model.model." + name]
            peft_layer.lora_A["default"].weight.copy_(layer.adapter.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.adapter.lora_B)
    x = torch.randint(0, 64, (2, 7))
    assert torch.allclose(output(ours, x), theirs(x).logits, rtol=1e-12, atol=1e-12)
