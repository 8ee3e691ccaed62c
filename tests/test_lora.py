"""LoRA's own maths: parameter count, scaling, the norm bound, validation, equivalence with HF PEFT.

The lifecycle every method shares (identity at init, merge, disable, save/load, dtypes)
is in ``test_adapter_contract.py``.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hybridpeft as hp
from hybridpeft.adapters.lora import lowrank_frobenius

transformers = pytest.importorskip("transformers")
from tiny_models import mlp, output, perturb, tiny_llama  # noqa: E402


def test_lora_parameter_count_closed_form():
    model = tiny_llama()
    cfg = model.config
    r = 4
    hp.inject(model, hp.LoraConfig(r=r))  # default targets: q k v o gate up down
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = r * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    assert hp.count_trainable(model) == per_layer * cfg.num_hidden_layers


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
     ({"norm_bound": 0.0}, "norm_bound"), ({"target_modules": ["re:("]}, "target_modules"),
     ({"r": True}, "r"), ({"alpha": "16"}, "alpha"), ({"dropout": None}, "dropout"), ({"norm_bound": "1"}, "norm_bound")],
)
def test_bad_config_names_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=field):
        hp.LoraConfig(**kwargs)


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
