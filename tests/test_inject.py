"""Target matching and wrapping (``hybridpeft.inject``)."""
from __future__ import annotations

import pytest
import torch
import hybridpeft as hp
from hybridpeft.inject import config_of, find_targets

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_gpt2, tiny_llama, mlp  # noqa: E402


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


def test_all_linear_adapts_every_linear_layer_but_the_output_head():
    llama = tiny_llama()
    names = find_targets(llama, ["all-linear"])
    assert len(names) == 7 * 2 and "lm_head" not in names
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    gpt2 = tiny_gpt2()  # Conv1D layers; the head is tied to the embedding
    names = find_targets(gpt2, ["all-linear"])
    assert len(names) == 4 * 2 and {n.split(".", 3)[-1] for n in names} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}


def test_inject_freezes_the_base_and_casts_adapters_to_the_chosen_dtype():
    model = hp.inject(mlp(torch.float32), hp.LoraConfig(target_modules=["0", "2"], r=2, adapter_dtype="float64"))
    for name, p in model.named_parameters():
        assert p.requires_grad == (".adapter." in name), name
        assert p.dtype == (torch.float64 if ".adapter." in name else torch.float32), name
    model = hp.inject(mlp(torch.float32), hp.LoraConfig(target_modules=["0"], r=2))  # None follows the weight
    assert {p.dtype for p in hp.trainable_parameters(model).values()} == {torch.float32}
    assert config_of(model).target_modules == ["0"]


def test_unmatched_trainable_module_and_missing_adapters_are_named():
    with pytest.raises(ValueError, match="trainable_modules entry 'nope' matches no module"):
        hp.inject(mlp(), hp.LoraConfig(target_modules=["0"], r=2, trainable_modules=["nope"]))
    with pytest.raises(ValueError, match=r"no hybridpeft adapters; call hybridpeft.inject"):
        config_of(mlp())
