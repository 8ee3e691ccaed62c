"""Model-level operations (``hybridpeft.api``): save/load files and errors, merge_and_unload,
trainable modules, per-step work dispatched by adapter class, the mixing views.

What every method (full fine-tuning included) must do under these operations is in
``test_adapter_contract.py``.
"""
from __future__ import annotations

import json

import pytest
import torch

import hybridpeft as hp
from hybridpeft.adapters.lora import LoraAdapter
from hybridpeft.api import needs_anneal_steps, set_anneal_steps
from hybridpeft.inject import config_of

transformers = pytest.importorskip("transformers")
from tiny_models import output, perturb, tiny_llama  # noqa: E402


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


def test_trainable_modules_train_and_save_with_adapter(tmp_path):
    model = hp.inject(tiny_llama(), hp.LoraConfig(target_modules=["q_proj"], r=2, trainable_modules=["lm_head"]))
    names = set(hp.trainable_parameters(model))
    assert "lm_head.weight" in names
    perturb(model)
    x = torch.randint(0, 64, (2, 5))
    hp.save_adapter(model, tmp_path)
    assert torch.equal(output(hp.load_adapter(tiny_llama(), tmp_path), x), output(model, x))


PUBLIC = {  # what ``import hybridpeft as hp`` offers; a refactor must keep every name
    "__version__", "AdapterConfig", "LoraConfig", "LoraGAConfig", "BoftConfig", "UnitaryConfig", "HybridConfig",
    "FullConfig", "Adapter", "AdaptedLinear", "inject", "adapted_layers", "lora_ga_init", "merge", "unmerge",
    "merge_and_unload", "disabled", "trainable_parameters", "count_trainable", "after_optimizer_step", "update_mixing",
    "mixing_state", "save_adapter", "load_adapter", "read_adapter_config", "build_optimizer", "CombinedOptimizer",
    "RiemannianAdam", "RiemannianSGD", "DoraConfig", "IA3Config", "export_peft", "load_peft",
}


def test_public_names_are_exported():
    assert set(hp.__all__) == PUBLIC
    assert all(getattr(hp, name) is not None for name in PUBLIC)
    assert hp.update_mixing is hp.after_optimizer_step


# ---------------------------------------------------------------------------
# Per-step work: one call per adapter class, with all of its layers


def test_after_optimizer_step_calls_each_adapter_class_once_with_all_its_layers(monkeypatch):
    calls = []
    monkeypatch.setattr(LoraAdapter, "after_optimizer_step_all", classmethod(lambda cls, adapters: calls.append(list(adapters))))
    model = hp.inject(tiny_llama(), hp.LoraConfig(target_modules=["q_proj", "v_proj"], r=2))
    hp.after_optimizer_step(model)
    assert calls == [[layer.adapter for _, layer in hp.adapted_layers(model)]] and len(calls[0]) == 4


def test_default_class_step_runs_every_adapters_own_step():
    model = hp.inject(tiny_llama(torch.float64), hp.LoraConfig(target_modules=["q_proj", "down_proj"], r=2, norm_bound=0.01))
    perturb(model, 1.0)
    hp.update_mixing(model)  # the old name of after_optimizer_step
    for _, layer in hp.adapted_layers(model):  # ‖W‖_F is taken in float32 at bind time: 1e-6 relative slack
        assert layer.adapter.delta_weight().norm() <= 0.01 * layer.weight.norm() * (1 + 1e-6)


# ---------------------------------------------------------------------------
# The Hybrid's λ seen from the model


def hybrid_model(**kw):
    return hp.inject(tiny_llama(), hp.HybridConfig(target_modules=["q_proj", "v_proj"], lora_r=2, boft_block_size=4,
                                                   boft_n_factors=2, **kw))


def test_mixing_state_has_one_row_per_hybrid_layer_and_none_for_other_methods():
    assert hp.mixing_state(hp.inject(tiny_llama(), hp.LoraConfig(target_modules=["q_proj"], r=2))) == {}
    model = hybrid_model(lam_init=0.25)
    state = hp.mixing_state(model)
    assert list(state) == [name for name, _ in hp.adapted_layers(model)] and len(state) == 4
    for row in state.values():
        assert row["lambda"] == 0.25 and row["step"] == 0 and row["g_lora"] != row["g_lora"]  # NaN before a step


def test_set_anneal_steps_reaches_every_layer_and_the_saved_config(tmp_path):
    model = hybrid_model(schedule="anneal")
    assert needs_anneal_steps(model)
    with pytest.raises(ValueError, match="steps=0 is invalid"):
        set_anneal_steps(model, 0)
    set_anneal_steps(model, 7)
    assert not needs_anneal_steps(model)
    assert all(layer.adapter.rule.anneal_steps == 7 for _, layer in hp.adapted_layers(model))
    hp.save_adapter(model, tmp_path)
    assert hp.read_adapter_config(tmp_path).anneal_steps == 7 == config_of(model).anneal_steps
    assert not needs_anneal_steps(hybrid_model(schedule="anneal", anneal_steps=3))
