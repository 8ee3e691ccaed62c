"""``recompute_base``: output-side orthogonal branches keep ``x`` for backward and recompute ``h = W x``.

Same outputs and gradients with and without the option (float64; bf16 autocast;
a 4-bit base), the recomputing autograd function under gradcheck, the base matmul
really re-run in backward, and the saved activations: without the option the composed
BOFT, the Hybrid and the full unitary keep their output (``h`` is rebuilt from it), so the
option saves only the outputs that the next op would not have kept anyway.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import hybridpeft as hp
import tiny_models
from numerics import assert_close_ulps
from hybridpeft.adapters.base import AdaptedLinear
from hybridpeft.adapters.boft import BoftAdapter, BoftConfig, RecomputedBaseButterflyFunction
from hybridpeft.adapters.hybrid import HybridAdapter
from hybridpeft.adapters.unitary import UnitaryAdapter

pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CONFIGS = {
    "boft": lambda **kw: hp.BoftConfig(target_modules=TARGETS, block_size=4, n_factors=2, **kw),
    "hybrid": lambda **kw: hp.HybridConfig(target_modules=TARGETS, lora_r=2, boft_block_size=4, boft_n_factors=2,
                                           lam_init=0.3, **kw),
    "unitary": lambda **kw: hp.UnitaryConfig(target_modules=TARGETS, **kw),
    "unitary-full": lambda **kw: hp.UnitaryConfig(target_modules=TARGETS, parameterization="full", block_size=8, **kw),
}


def set_recompute(model, on: bool) -> None:
    for _, layer in hp.adapted_layers(model):
        adapter = layer.adapter
        (adapter.boft if isinstance(adapter, HybridAdapter) else adapter).recompute_base = on


def adapted_llama(method: str, dtype=torch.float64):
    model = hp.inject(tiny_models.tiny_llama(dtype), CONFIGS[method]())
    torch.manual_seed(1)
    with torch.no_grad():  # off the identity start, so every gradient is non-trivial
        for p in hp.trainable_parameters(model).values():
            p.add_(0.1 * torch.randn_like(p))
    return model


def ids(seed=2):
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def saved_bytes(model, run) -> int:
    """Bytes of the distinct storages autograd keeps for backward during ``run()``, the model's own tensors aside."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            storages[ptr] = t.untyped_storage().nbytes()
        return t.detach()  # the tensor itself would be a C++ reference cycle for saved outputs: a leak

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


# --- config ----------------------------------------------------------------------------


def test_input_side_refuses_recompute_base_by_name():
    with pytest.raises(ValueError, match="^recompute_base=True is invalid.*side='input'"):
        BoftConfig(side="input", recompute_base=True)
    BoftConfig(side="input")  # the default stays valid


@pytest.mark.parametrize("make", [lambda: BoftConfig(recompute_base=1), lambda: hp.UnitaryConfig(recompute_base="yes"),
                                  lambda: hp.HybridConfig(recompute_base=None)])
def test_non_bool_is_refused_naming_the_field(make):
    with pytest.raises(ValueError, match="^recompute_base="):
        make()


def test_hybrid_passes_the_flag_to_its_boft_branch_and_round_trips():
    config = hp.HybridConfig(lora_r=2, boft_block_size=4, boft_n_factors=2, recompute_base=True)
    assert config.boft_config().recompute_base is True
    assert hp.HybridConfig.from_dict(config.to_dict()) == config
    adapter = HybridAdapter(16, 32, config)
    assert adapter.boft.recompute_base and "recompute_base=True" in repr(adapter)
    assert HybridAdapter(16, 32, hp.HybridConfig(lora_r=2, boft_block_size=4, boft_n_factors=2)).boft.recompute_base is False


# --- the autograd function ---------------------------------------------------------------


def test_gradcheck_recomputing_function():
    torch.manual_seed(0)
    d_in, k, b, m = 5, 4, 3, 3
    adapter = BoftAdapter(d_in, k * b, BoftConfig(block_size=b, n_factors=m))
    weight = torch.randn(k * b, d_in, dtype=torch.float64)
    base = lambda x: x @ weight.t()  # noqa: E731
    x = torch.randn(2, 3, d_in, dtype=torch.float64)
    blocks = torch.randn(m, k, b, b, dtype=torch.float64, requires_grad=True)  # any blocks, not only orthogonal
    h = base(x).reshape(-1, k * b).requires_grad_(True)
    for plan, lead in ((adapter.plan, True), (adapter.plan, False), (adapter.plan_transposed, False)):
        assert torch.autograd.gradcheck(lambda h_, q_: RecomputedBaseButterflyFunction.apply(h_, x, q_, plan, lead, base),
                                        (h, blocks))

    def composed(x_, q_):  # as the adapters use it: x's gradient flows through the caller's base(x)
        return RecomputedBaseButterflyFunction.apply(base(x_).reshape(-1, k * b), x_.detach(), q_, adapter.plan, True, base)

    assert torch.autograd.gradcheck(composed, (x.clone().requires_grad_(True), blocks))


def test_backward_reruns_the_base_matmul_once_without_grad():
    torch.manual_seed(0)
    layer = nn.Linear(8, 16, bias=False).double()
    calls = []

    def base(x):
        calls.append(torch.is_grad_enabled())
        return layer(x)

    adapter = BoftAdapter(8, 16, BoftConfig(block_size=4, n_factors=2, recompute_base=True)).double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    y = adapter(x, base)
    assert calls == [True]
    y.sum().backward()
    assert calls == [True, False]  # one recomputation; observers that ignore no-grad calls see one matmul


# --- same values and gradients --------------------------------------------------------


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_outputs_and_gradients_identical_with_and_without(method):
    model = adapted_llama(method)
    embeds = model.get_input_embeddings()(ids()).detach()
    results = []
    for on in (False, True):
        set_recompute(model, on)
        model.zero_grad(set_to_none=True)
        x = embeds.clone().requires_grad_(True)
        logits = model(inputs_embeds=x).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum().backward()
        grads = {n: p.grad.clone() for n, p in hp.trainable_parameters(model).items()}
        results.append((logits.detach(), x.grad, grads))
    (y0, gx0, g0), (y1, gx1, g1) = results
    assert torch.allclose(y0, y1, rtol=0, atol=1e-12)
    assert torch.allclose(gx0, gx1, rtol=0, atol=1e-12)
    assert g0.keys() == g1.keys() and all(g0[n].abs().sum() > 0 for n in g0)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=0, atol=1e-12), n


def test_bf16_autocast_recomputes_h_in_the_forwards_dtype():
    # Backward runs outside the caller's autocast; recomputing h in float32 would change ∂L/∂Q.
    torch.manual_seed(0)
    adapter = BoftAdapter(16, 32, BoftConfig(block_size=4, n_factors=2))
    adapter.form = "factored"  # keeps h without the option; the composed form is in test_blockdiag.py
    with torch.no_grad():
        adapter.boft_Q.normal_()
    layer = AdaptedLinear(nn.Linear(16, 32, bias=False), adapter)
    results = []
    for on in (False, True):
        adapter.recompute_base = on
        adapter.boft_Q.grad = None
        x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        (y.float() * torch.arange(32.0)).sum().backward()
        results.append((y.detach(), x.grad, adapter.boft_Q.grad.clone()))
    assert results[0][0].dtype == torch.bfloat16
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_hybrid_on_a_4bit_base_gives_the_same_gradients():
    bnb = pytest.importorskip("bitsandbytes")
    from hybridpeft.adapters import base as base_module

    if not hasattr(base_module, "is_4bit_layer"):
        pytest.skip("this hybridpeft has no 4-bit base support")
    torch.manual_seed(0)
    dense = nn.Linear(16, 32, bias=False)
    quantized = bnb.nn.Linear4bit(16, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4", device="cpu")
    quantized.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    quantized = quantized.to("cpu")  # .to() quantizes
    adapter = HybridAdapter(16, 32, hp.HybridConfig(lora_r=2, boft_block_size=4, boft_n_factors=2, lam_init=0.4))
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer = AdaptedLinear(quantized, adapter).train()
    assert layer.quantized
    results = []
    for on in (False, True):
        adapter.boft.recompute_base = on
        adapter.zero_grad(set_to_none=True)
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
        y = layer(x)
        (y * torch.arange(32.0)).sum().backward()
        results.append((y.detach(), x.grad, *[p.grad.clone() for p in adapter.parameters()]))
    # Without the option h is rebuilt from the float32 output (M⁻¹ (y − u vᵀ)): equal up to rounding.
    for a, b in zip(*results):
        assert_close_ulps(a, b, ulps=64)


# --- memory -------------------------------------------------------------------------------


# The Llama projections whose output the next op does not keep: RoPE's products keep cos/sin
# (not q, k) and o/down feed a residual add; gate (SiLU) and up (the product) are kept. v is kept by
# attention unless transformers repeats it for grouped-query attention first (it then keeps the copy).
NOT_KEPT_DOWNSTREAM = ("q_proj", "k_proj", "o_proj", "down_proj")
MAYBE_KEPT = ("v_proj",)


def test_hybrid_keeps_its_output_where_recompute_base_keeps_nothing_new():
    """Neither keeps h. Default: the output (rebuilt to h in backward), which costs memory only where
    the next op does not keep it anyway; recompute_base: x, which the LoRA branch keeps anyway."""
    model = adapted_llama("hybrid", torch.float32)
    tokens = ids()
    n = tokens.numel()
    per_module = {}
    for on in (False, True):
        set_recompute(model, on)
        per_module[on] = saved_bytes(model, lambda: model(input_ids=tokens).logits)
    at_least = sum(n * layer.adapter.d_out * 4 for name, layer in hp.adapted_layers(model)
                   if name.endswith(NOT_KEPT_DOWNSTREAM))
    maybe = sum(n * layer.adapter.d_out * 4 for name, layer in hp.adapted_layers(model) if name.endswith(MAYBE_KEPT))
    assert per_module[False] - per_module[True] in (at_least, at_least + maybe)


@pytest.mark.parametrize("method", ["boft", "unitary-full"])
def test_boft_and_unitary_keep_no_more_bytes_with_recompute_base(method):
    # Alone they keep x instead of the output: q/k/v and gate/up share their x.
    model = adapted_llama(method, torch.float32)
    tokens = ids()
    saved = {}
    for on in (False, True):
        set_recompute(model, on)
        saved[on] = saved_bytes(model, lambda: model(input_ids=tokens).logits)
    assert saved[True] <= saved[False]


def test_memory_benchmark_script_counts_the_dropped_h(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "recompute_memory.py"
    spec = importlib.util.spec_from_file_location("recompute_memory", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--layers", "1", "--batch", "1", "--seq", "4", "--vocab", "64",
                        "--methods", "hybrid", "hybrid-recompute", "--out", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "recompute-memory.json").read_text())["results"]}
    dropped = rows["hybrid"]["saved_bytes"] - rows["hybrid-recompute"]["saved_bytes"]
    # the Hybrid's outputs that no later op keeps: q (576), k (192), o, down (576), perhaps v (192); N = 4, float32
    assert dropped in (4 * (576 + 192 + 576 + 576) * 4, 4 * (576 + 192 + 192 + 576 + 576) * 4)
    assert "| hybrid | " in (tmp_path / "recompute-memory.md").read_text()
