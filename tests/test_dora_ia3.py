"""DoRA and IA³: their own maths (DoRA's unit scale at init, IA³'s zero-scale refusal and
feedforward flags), bad configs, and parity with HF PEFT given the same tensors, in float64.
The lifecycle every method shares is in ``test_adapter_contract.py``.

Tests are parametrized over both methods; each model case is a tiny random Llama (no
biases) and a tiny GPT-2 (``Conv1D`` layers with biases, which IA³ must scale too).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hybridpeft as hp

transformers = pytest.importorskip("transformers")
from numerics import assert_close_ulps  # noqa: E402
from tiny_models import tiny_gpt2, tiny_llama  # noqa: E402

TARGETS = {"llama": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
           "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}
METHODS = ["dora", "ia3"]


def our_config(method: str, arch: str, **extra):
    targets, feedforward = TARGETS[arch]
    if method == "dora":
        return hp.DoraConfig(target_modules=targets, r=4, alpha=8.0, **extra)
    return hp.IA3Config(target_modules=targets, feedforward_modules=feedforward, **extra)


def build(arch: str, dtype=torch.float64):
    model = BUILD[arch](dtype)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # GPT-2 starts its biases at 0, which would hide whether IA³ scales them
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.dim() == 1 and "ln_" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def logits(model, x):
    return model(x).logits


def perturb(model, scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hp.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


@pytest.fixture
def x():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------- each method's own


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_scale_is_exactly_one_at_init(dtype):
    """m starts as the very numbers the forward divides by, so m / ‖V‖_c = 1 in any dtype."""
    model = hp.inject(tiny_llama(dtype), hp.DoraConfig(target_modules="all-linear", r=4))
    for _, layer in hp.adapted_layers(model):
        a = layer.adapter
        norm = a.row_norm(layer._base_matmul, dtype).to(a.magnitude.dtype)
        assert torch.equal(a.magnitude / norm, torch.ones_like(norm))


@pytest.mark.parametrize("arch", sorted(BUILD))
@pytest.mark.parametrize("method", METHODS)
def test_disabled_after_merge_and_unmerge_is_the_base_to_rounding(method, arch, x):
    """Unmerge brings back W and the bias (IA³ scales both) to within a few ulps of the base output."""
    model = hp.inject(build(arch), our_config(method, arch))
    perturb(model)
    hp.merge(model)
    hp.unmerge(model)
    with hp.disabled(model):
        assert_close_ulps(logits(model, x), logits(build(arch), x))


@pytest.mark.parametrize("arch", sorted(BUILD))
def test_ia3_feedforward_flags_come_back_from_the_config(arch, tmp_path):
    model = hp.inject(build(arch), our_config("ia3", arch))
    hp.save_adapter(model, tmp_path)
    restored = hp.load_adapter(build(arch), tmp_path)
    flags = {n: layer.adapter.feedforward for n, layer in hp.adapted_layers(restored)}
    assert flags == {n: layer.adapter.feedforward for n, layer in hp.adapted_layers(model)}
    assert sum(flags.values()) == 2


def test_ia3_unmerge_refuses_a_zero_scale():
    model = hp.inject(tiny_llama(torch.float64), hp.IA3Config())
    layer = hp.adapted_layers(model)[0][1]
    hp.merge(model)
    with torch.no_grad():
        layer.adapter.ia3_l[3] = 0.0
    with pytest.raises(RuntimeError, match="1 entries of ia3_l are 0"):
        hp.unmerge(model)


@pytest.mark.parametrize(
    "make, field",
    [(lambda: hp.DoraConfig(norm_bound=0.1), "norm_bound"),
     (lambda: hp.DoraConfig(r=0), "r"),
     (lambda: hp.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "feedforward_modules"),
     (lambda: hp.IA3Config(feedforward_modules=[""]), "feedforward_modules")],
)
def test_bad_config_names_field_and_value(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_ia3_feedforward_default_follows_the_targets():
    assert hp.IA3Config().feedforward_modules == ["down_proj"]
    assert hp.IA3Config(target_modules=["q_proj", "v_proj"]).feedforward_modules == []
    assert hp.IA3Config(target_modules="all-linear").feedforward_modules == ["down_proj"]
    config = hp.IA3Config(target_modules=["k_proj"])
    assert hp.AdapterConfig.from_dict(config.to_dict()) == config  # the resolved list is what is saved


def test_ia3_defaults_are_pefts_llama_defaults():
    peft = pytest.importorskip("peft")
    ours = hp.inject(tiny_llama(), hp.IA3Config())
    theirs = peft.get_peft_model(tiny_llama(), peft.IA3Config())
    ours_shapes = {n + ".ia3_l": tuple(layer.adapter.ia3_l.shape) for n, layer in hp.adapted_layers(ours)}
    theirs_shapes = {n.removeprefix("base_model.model.").removesuffix(".default"): tuple(p.squeeze().shape)
                     for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_shapes == theirs_shapes


# ---------------------------------------------------------------- parity with PEFT

def _peft_twin(method: str, arch: str, ours):
    """PEFT's model with the same tensors as ``ours``."""
    peft = pytest.importorskip("peft")
    targets, feedforward = TARGETS[arch]
    if method == "dora":
        config = peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8.0, lora_dropout=0.0, use_dora=True)
    else:
        config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=arch == "gpt2")
    theirs = peft.get_peft_model(build(arch), config)
    modules = dict(theirs.named_modules())
    with torch.no_grad():
        for name, layer in hp.adapted_layers(ours):
            twin, a = modules["base_model.model." + name], layer.adapter
            if method == "dora":
                twin.lora_A["default"].weight.copy_(a.lora_A)
                twin.lora_B["default"].weight.copy_(a.lora_B)
                twin.lora_magnitude_vector["default"].weight.copy_(a.magnitude)
            else:
                twin.ia3_l["default"].copy_(a.ia3_l.view_as(twin.ia3_l["default"]))
    return theirs, modules


def _twin_tensors(method: str, twin) -> list[torch.Tensor]:
    if method == "dora":
        return [twin.lora_A["default"].weight, twin.lora_B["default"].weight, twin.lora_magnitude_vector["default"].weight]
    return [twin.ia3_l["default"]]


@pytest.mark.parametrize("arch", sorted(BUILD))
@pytest.mark.parametrize("method", METHODS)
def test_matches_peft_outputs_gradients_and_merge(method, arch, x):
    ours = hp.inject(build(arch), our_config(method, arch))
    perturb(ours)
    theirs, modules = _peft_twin(method, arch, ours)
    out_ours, out_theirs = logits(ours, x), logits(theirs, x)
    assert (out_ours - build(arch)(x).logits).abs().max() > 1e-3  # the tensors moved: a real comparison
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-12, atol=1e-12)
    probe = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out_ours * probe).sum().backward()
    (out_theirs * probe).sum().backward()
    for name, layer in hp.adapted_layers(ours):
        ours_tensors = [p for p in layer.adapter.parameters() if p.requires_grad]
        for mine, twin in zip(ours_tensors, _twin_tensors(method, modules["base_model.model." + name])):
            torch.testing.assert_close(mine.grad, twin.grad.view_as(mine), rtol=1e-10, atol=1e-12, msg=name)
    hp.merge(ours)
    merged_theirs = dict(theirs.merge_and_unload().named_modules())
    for name, layer in hp.adapted_layers(ours):
        torch.testing.assert_close(layer.base_layer.weight, merged_theirs[name].weight, rtol=1e-12, atol=1e-12)
        if layer.bias is not None:
            torch.testing.assert_close(layer.bias, merged_theirs[name].bias, rtol=1e-12, atol=1e-12)


class _FixedMask(nn.Module):
    """A dropout whose mask is fixed, so two implementations see the same dropped input."""

    def __init__(self, d: int, p: float = 0.5) -> None:
        super().__init__()
        self.register_buffer("mask", (torch.rand(d, generator=torch.Generator().manual_seed(7)) > p).double() / (1 - p))

    def forward(self, x):
        return x * self.mask.to(x.dtype)


def test_dora_dropout_follows_pefts_convention(x):
    """With dropout, PEFT rescales ``W x̃`` (not ``W x``) and keeps ``W x`` outside: same here."""
    ours = hp.inject(tiny_llama(torch.float64), hp.DoraConfig(target_modules=["q_proj", "down_proj"], r=4, alpha=8.0, dropout=0.1))
    perturb(ours)
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_llama(torch.float64), peft.LoraConfig(
        target_modules=["q_proj", "down_proj"], r=4, lora_alpha=8.0, lora_dropout=0.1, use_dora=True))
    modules = dict(theirs.named_modules())
    with torch.no_grad():
        for name, layer in hp.adapted_layers(ours):
            twin, a = modules["base_model.model." + name], layer.adapter
            twin.lora_A["default"].weight.copy_(a.lora_A)
            twin.lora_B["default"].weight.copy_(a.lora_B)
            twin.lora_magnitude_vector["default"].weight.copy_(a.magnitude)
            a.dropout = _FixedMask(a.d_in)
            twin.lora_dropout["default"] = _FixedMask(a.d_in)
    ours.train()
    theirs.train()
    out = logits(ours, x)
    torch.testing.assert_close(out, logits(theirs, x), rtol=1e-12, atol=1e-12)
    ours.eval()
    assert (logits(ours, x) - out).abs().max() > 1e-3  # the mask mattered


class _LargestOutput(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view (e.g. W.t()) allocates nothing
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_dora_step_builds_no_dense_weight_sized_tensor():
    """Forward and backward of a DoRA layer make nothing of W's size (d_out × d_in): the row
    norms come from ‖W_i‖ and r-sized products. (PEFT's DoRA builds B A and W + s B A.)"""
    d_in, d_out, tokens = 96, 80, 8
    layer = hp.AdaptedLinear(nn.Linear(d_in, d_out), hp.adapters.adapter_class("dora")(d_in, d_out, hp.DoraConfig(r=4)))
    perturb_layer = [p for p in layer.adapter.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in perturb_layer:
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(tokens, d_in, requires_grad=True)
    with _LargestOutput() as mode:
        layer(x).sum().backward()
    assert 0 < mode.largest < d_out * d_in, mode.largest
    assert all(p.grad is not None for p in perturb_layer)


def test_job_config_checks_feedforward_against_the_jobs_own_targets():
    """A job file's error names the targets the job set, not IA³'s defaults."""
    from hybridpeft.train.job_config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"feedforward_modules=\['nope'\] is invalid: expected a subset of "
                                          r"target_modules \['q_proj', 'v_proj'\]"):
        load_config(overrides=["adapter.method=ia3", "adapter.target_modules=[q_proj,v_proj]",
                               "adapter.ia3.feedforward_modules=[nope]", "train.lr=0"])
