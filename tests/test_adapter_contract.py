"""The contract every registered adapter method keeps, checked the same way for each.

For each method (and its variants: BOFT's two sides, the unitary's two
parameterizations) on an MLP, a Llama and a GPT-2 (``Conv1D``):
output unchanged at initialization (after the method's data-dependent start, if
it has one), merged equals unmerged, unmerge restores ``W``, disabled runs the
base model, save → reseed → load reproduces the output, training changes only
adapter tensors, and half-precision models and float32 adapters work. Each
method's own maths (butterfly structure, orthogonality, λ rules, the gradient
start) is tested in its own file. ``full`` (full fine-tuning, registered as a method
so comparisons share one code path) adapts no layer, so merge, unmerge and
disabling do not apply to it; the rest of the contract does (at the end).

Models are float64 here so tolerances can be tight; the float32 and half-precision
checks are at the end. Equality is bitwise only where the same computation
repeats (a disabled layer runs the base layer itself; a reload repeats the forward).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import nn

import hybridpeft as hp
from hybridpeft.adapters import adapter_methods
from hybridpeft.adapters.config import known_methods
from hybridpeft.adapters.unitary import BlockOrthogonal
from hybridpeft.inject import config_of

pytest.importorskip("transformers")
import tiny_models  # noqa: E402
from numerics import assert_close_ulps  # noqa: E402


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return tiny_models.output(model, x).float().square().mean()


def train_steps(model: nn.Module, make_input: Callable[[int], torch.Tensor], steps: int = 3) -> None:
    """``steps`` AdamW steps on fresh inputs, with the per-step adapter work (λ updates, the
    full unitary's Riemannian steps and drift repair) as training does it."""
    optimizer = hp.build_optimizer(model, lr=1e-2)
    for step in range(steps):
        loss_of(model, make_input(20 + step)).backward()
        optimizer.step()
        hp.after_optimizer_step(model)
        optimizer.zero_grad()


def linear_stack(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)).to(dtype)


def gpt2(dtype=torch.float64):
    model = tiny_models.tiny_gpt2(dtype)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # GPT-2 starts its biases at 0, which would hide a method that mishandles them (IA³ scales them)
        for name, p in model.named_parameters():
            if name.endswith("bias") and "ln_" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
    return model


def tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


# Every adapted width is a multiple of b · 2^(m−1) = 16 for BOFT's b = 4, m = 3 (GPT-2's c_attn: 96).
MODELS: dict[str, tuple[Callable[..., nn.Module], list[str], Callable[[int], torch.Tensor]]] = {
    "mlp": (linear_stack, ["0", "2"], lambda seed: torch.randn(3, 5, 16, dtype=torch.float64,
                                                               generator=torch.Generator().manual_seed(seed))),
    "llama": (lambda dtype=torch.float64: tiny_models.tiny_llama(dtype, kv_heads=4), ["q_proj", "v_proj", "down_proj"],
              tokens),
    "gpt2": (gpt2, ["c_attn", "c_fc", "attn.c_proj", "mlp.c_proj"], tokens),
}


# ---------------------------------------------------------------------------
# How each method is set up and moved away from its start


@torch.no_grad()
def perturb_unitary(model: nn.Module, scale: float) -> None:
    """Full-capacity blocks rotate by a random orthogonal matrix (staying on the manifold)."""
    for _, layer in hp.adapted_layers(model):
        u = layer.adapter.unitary
        if isinstance(u, BlockOrthogonal):
            skew = torch.randn(u.k, u.c, u.c, dtype=torch.float64) * scale
            rotation = torch.linalg.matrix_exp(skew - skew.transpose(-1, -2))  # (k, c, c)
            u.blocks.copy_(rotation @ u.blocks.double())
        else:
            u.theta.add_(torch.randn_like(u.theta) * scale)
            u.reflect.add_(torch.randn_like(u.reflect) * scale)


@torch.no_grad()
def perturb_hybrid(model: nn.Module, scale: float) -> None:
    tiny_models.perturb(model, scale)
    for _, layer in hp.adapted_layers(model):
        layer.adapter.mix_lambda.fill_(0.3)  # away from the default 0.5


@dataclass(frozen=True)
class Method:
    """One registered method in one configuration.

    Attributes:
        method: the registered name.
        config: ``(target_modules, **overrides) -> adapter config``.
        parameters: the trainable tensors of one adapter (names under ``.adapter.``).
        perturb: moves every adapter off its start (model, scale).
        gradient_start: run ``lora_ga_init`` after injection.
        init_tolerance: ``(atol, rtol)`` of "output unchanged at init"; ``None`` when the start
            is exact in real arithmetic (then within 16 ulps: only the bias moves out of the GEMM).
        unmerge_atol: how close unmerge brings back ``W`` (float64).
    """

    method: str
    config: Callable[..., hp.AdapterConfig]
    parameters: frozenset[str]
    perturb: Callable[[nn.Module, float], None] = tiny_models.perturb
    gradient_start: bool = False
    init_tolerance: tuple[float, float] | None = None
    unmerge_atol: float = 1e-12


def feedforward(targets: Any) -> list[str]:
    """IA³'s feedforward targets (input-scaled) among ``targets``: each model's MLP output projection."""
    names = ["down_proj"] if targets == "all-linear" else targets
    return [t for t in names if t in ("2", "down_proj", "mlp.c_proj")]


METHODS = {
    "lora": Method("lora", lambda t, **kw: hp.LoraConfig(target_modules=t, r=3, alpha=7.0, **kw),
                   frozenset({"lora_A", "lora_B"})),
    "lora_ga": Method("lora_ga", lambda t, **kw: hp.LoraGAConfig(target_modules=t, r=2, **kw),
                      frozenset({"lora_A", "lora_B"}), gradient_start=True,
                      init_tolerance=(1e-10, 0.0)),  # B A − B0 A0 cancels to rounding
    "boft-output": Method("boft", lambda t, **kw: hp.BoftConfig(target_modules=t, block_size=4, n_factors=3,
                                                                side="output", **kw), frozenset({"boft_Q"})),
    "boft-input": Method("boft", lambda t, **kw: hp.BoftConfig(target_modules=t, block_size=4, n_factors=3,
                                                               side="input", **kw), frozenset({"boft_Q"})),
    "unitary-structured": Method("unitary", lambda t, **kw: hp.UnitaryConfig(target_modules=t, **kw),
                                 frozenset({"unitary.theta", "unitary.reflect"}), perturb_unitary,
                                 init_tolerance=(1e-12, 1e-12)),  # FFTs and reflections cancel to rounding
    "unitary-full": Method("unitary", lambda t, **kw: hp.UnitaryConfig(target_modules=t, parameterization="full",
                                                                       block_size=8, **kw),
                           frozenset({"unitary.blocks"}), perturb_unitary),
    "dora": Method("dora", lambda t, **kw: hp.DoraConfig(target_modules=t, r=4, alpha=8.0, **kw),
                   frozenset({"lora_A", "lora_B", "magnitude"})),
    "ia3": Method("ia3", lambda t, **kw: hp.IA3Config(target_modules=t, feedforward_modules=feedforward(t), **kw),
                  frozenset({"ia3_l"})),
    "hybrid": Method("hybrid", lambda t, **kw: hp.HybridConfig(target_modules=t, lora_r=2, boft_block_size=4,
                                                               boft_n_factors=2, **kw),
                     frozenset({"lora.lora_A", "lora.lora_B", "boft.boft_Q"}), perturb_hybrid, gradient_start=True,
                     init_tolerance=(1e-10, 0.0), unmerge_atol=1e-10),  # unmerge solves (λI + (1−λ)R) W = …
}


def test_every_registered_method_is_in_the_contract():
    assert {m.method for m in METHODS.values()} == set(adapter_methods())
    assert set(known_methods()) == set(adapter_methods()) | {"full"}  # full: its own part of the contract below


def adapted_model(method: Method, build: Callable[..., nn.Module], targets: Any, make_input,
                  dtype: torch.dtype = torch.float64, **config: Any) -> nn.Module:
    """``build(dtype)`` injected with the method and started (LoRA-GA's start on two batches)."""
    model = hp.inject(build(dtype), method.config(targets, **config))
    if method.gradient_start:
        hp.lora_ga_init(model, [make_input(10), make_input(11)], num_batches=2, loss_fn=loss_of)
    return model


@pytest.fixture(params=[(m, name) for m in METHODS for name in MODELS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    method_id, model_name = request.param
    build, targets, make_input = MODELS[model_name]
    method = METHODS[method_id]
    torch.manual_seed(1)
    return method, build, targets, make_input, make_input(0)


# ---------------------------------------------------------------------------
# The contract (float64)


def test_output_unchanged_at_init_and_moved_by_the_adapter(case):
    method, build, targets, make_input, x = case
    base = tiny_models.output(build(), x)
    model = adapted_model(method, build, targets, make_input)
    if method.init_tolerance is None:
        assert_close_ulps(tiny_models.output(model, x), base)  # the host adds the bias after the GEMM, the base layer inside
    else:
        atol, rtol = method.init_tolerance
        torch.testing.assert_close(tiny_models.output(model, x), base, atol=atol, rtol=rtol)
    method.perturb(model, 0.3)
    assert not torch.allclose(tiny_models.output(model, x), base, rtol=1e-3, atol=1e-3)


def test_merged_equals_unmerged_and_unmerge_restores_w(case):
    method, build, targets, make_input, x = case
    model = adapted_model(method, build, targets, make_input)
    method.perturb(model, 0.3)
    weights = {n: layer.weight.detach().clone() for n, layer in hp.adapted_layers(model)}
    biases = {n: layer.bias.detach().clone() for n, layer in hp.adapted_layers(model) if layer.bias is not None}
    adapted = tiny_models.output(model, x)
    hp.merge(model)
    assert all(layer.merged for _, layer in hp.adapted_layers(model))
    assert any(not torch.allclose(layer.weight, weights[n]) for n, layer in hp.adapted_layers(model))
    torch.testing.assert_close(tiny_models.output(model, x), adapted, atol=1e-10, rtol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        hp.merge(model)
    hp.unmerge(model)
    for n, layer in hp.adapted_layers(model):
        torch.testing.assert_close(layer.weight, weights[n], atol=method.unmerge_atol, rtol=0)
        if n in biases:  # IA³ merges into the bias too
            torch.testing.assert_close(layer.bias, biases[n], atol=method.unmerge_atol, rtol=0)
    torch.testing.assert_close(tiny_models.output(model, x), adapted, atol=1e-10, rtol=0)
    plain = hp.merge_and_unload(model)
    assert not hp.adapted_layers(plain) and not hasattr(plain, "hybridpeft_config")
    torch.testing.assert_close(tiny_models.output(plain, x), adapted, atol=1e-10, rtol=0)


def test_disabled_runs_the_base_model_and_restores_the_state(case):
    method, build, targets, make_input, x = case
    base = tiny_models.output(build(), x)
    model = adapted_model(method, build, targets, make_input)
    method.perturb(model, 0.3)
    adapted = tiny_models.output(model, x)
    assert not torch.allclose(adapted, base, rtol=1e-3, atol=1e-3)
    with hp.disabled(model):
        assert torch.equal(tiny_models.output(model, x), base)  # the base layers themselves run
    with pytest.raises(KeyError):
        with hp.disabled(model):
            raise KeyError("boom")
    assert not any(layer.disabled for _, layer in hp.adapted_layers(model))
    assert torch.equal(tiny_models.output(model, x), adapted)
    hp.merge(model)  # disabling a merged model unmerges for the duration, then merges back
    with hp.disabled(model):
        assert torch.allclose(tiny_models.output(model, x), base, atol=1e-10)
    assert all(layer.merged for _, layer in hp.adapted_layers(model))


def test_save_reseed_load_reproduces_the_output(case, tmp_path):
    method, build, targets, make_input, x = case
    model = adapted_model(method, build, targets, make_input)
    method.perturb(model, 0.3)
    expected = tiny_models.output(model, x)
    hp.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == method.method
    assert hp.read_adapter_config(tmp_path) == config_of(model)
    torch.manual_seed(1234)  # a different random start (e.g. the unitary's reflections) must not matter
    restored = hp.load_adapter(build(), tmp_path)
    assert torch.equal(tiny_models.output(restored, x), expected)


def test_training_changes_only_adapter_tensors(case):
    method, build, targets, make_input, x = case
    model = adapted_model(method, build, targets, make_input)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    trainable = hp.trainable_parameters(model)
    assert trainable and {n.split(".adapter.", 1)[-1] for n in trainable} == method.parameters
    assert all(".adapter." in n for n in trainable)
    train_steps(model, make_input)
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == (name in trainable), name
    for name, t in model.state_dict().items():
        if ".adapter." not in name:  # base weights and buffers
            assert torch.equal(t, before[name]), name


# ---------------------------------------------------------------------------
# Other dtypes (one model: the Llama, every linear layer adapted)


def llama_all_linear(method: Method, dtype: torch.dtype, **config: Any) -> nn.Module:
    build, _, make_input = MODELS["llama"]
    return adapted_model(method, build, "all-linear", make_input, dtype, **config)


@pytest.mark.parametrize("method_id", sorted(METHODS))
def test_merge_in_float32_within_relative_tolerance(method_id):
    method = METHODS[method_id]
    model = llama_all_linear(method, torch.float32)
    method.perturb(model, 0.05)
    weights = {n: layer.weight.detach().clone() for n, layer in hp.adapted_layers(model)}
    x = tokens(0)
    adapted = tiny_models.output(model, x)
    hp.merge(model)
    merged = tiny_models.output(model, x)
    assert ((merged - adapted).norm() / adapted.norm()).item() < 1e-5
    hp.unmerge(model)
    for n, layer in hp.adapted_layers(model):
        torch.testing.assert_close(layer.weight, weights[n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method_id", sorted(METHODS))
def test_half_precision_forward_is_finite(method_id, dtype):
    method = METHODS[method_id]
    model = llama_all_linear(method, dtype)
    method.perturb(model, 0.01)
    logits = tiny_models.output(model, tokens(0))
    assert logits.dtype == dtype and torch.isfinite(logits).all()


@pytest.mark.parametrize("method_id", sorted(METHODS))
def test_float32_adapter_on_bfloat16_model(method_id):
    """Activations stay bf16; the adapter's tensors and their gradients are float32 and finite."""
    method = METHODS[method_id]
    model = llama_all_linear(method, torch.bfloat16, adapter_dtype="float32")
    method.perturb(model, 0.1)
    logits = tiny_models.output(model, tokens(0))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().square().mean().backward()
    for name, p in hp.trainable_parameters(model).items():
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all(), name


# ---------------------------------------------------------------------------
# Full fine-tuning: no adapter layers, every parameter trains and is saved


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_full_fine_tuning_keeps_the_contract_that_applies(model_name, tmp_path):
    """Output unchanged at init, every tensor trains, save → reseed → load reproduces the output."""
    build, _, make_input = MODELS[model_name]
    x = make_input(0)
    base = tiny_models.output(build(), x)
    model = hp.inject(build(), hp.FullConfig())
    assert not hp.adapted_layers(model)
    assert torch.equal(tiny_models.output(model, x), base)  # nothing is wrapped: the same computation
    trainable = hp.trainable_parameters(model)
    assert set(trainable) == {n for n, _ in model.named_parameters()}
    assert hp.count_trainable(model) == sum(p.numel() for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, make_input)
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), name
    expected = tiny_models.output(model, x)
    assert not torch.allclose(expected, base, rtol=1e-3, atol=1e-3)
    hp.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == "full"
    torch.manual_seed(1234)
    restored = hp.load_adapter(build(), tmp_path)
    assert torch.equal(tiny_models.output(restored, x), expected)
