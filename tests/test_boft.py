"""BOFT: butterfly structure, orthogonality, the memory-saving autograd function, parameter count and sides.
The lifecycle every method shares is in ``test_adapter_contract.py``."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hybridpeft as hp
from hybridpeft.adapters.boft import (
    BoftAdapter,
    BoftConfig,
    ButterflyFunction,
    butterfly_permutation,
    butterfly_reference,
    fits,
    fitting_block_sizes,
    fitting_factor_counts,
)

transformers = pytest.importorskip("transformers")
import tiny_models  # noqa: E402
from numerics import assert_close_ulps  # noqa: E402

SIDES = ["output", "input"]


def tiny_llama(dtype=torch.float32):
    return tiny_models.tiny_llama(dtype, kv_heads=4)


def tiny_gpt2(dtype=torch.float32):
    return tiny_models.tiny_gpt2(dtype, bos_token_id=0, eos_token_id=0)


def linear_stack(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)).to(dtype)


# Every dimension here is a multiple of b * 2^(m-1) = 16 for b = 4, m = 3 (GPT-2's c_attn: 96).
MODELS = {
    "linear": (linear_stack, ["0", "2"], lambda: torch.randn(3, 5, 16)),
    "llama": (tiny_llama, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], lambda: torch.randint(0, 64, (2, 6))),
    "gpt2": (tiny_gpt2, ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], lambda: torch.randint(0, 64, (2, 6))),
}


def boft(targets, side, **kw):
    return BoftConfig(target_modules=targets, block_size=kw.pop("block_size", 4), n_factors=kw.pop("n_factors", 3),
                      side=side, **kw)


def random_adapter(d, b, m, side="output", dtype=torch.float64, scale=0.5, seed=0, form=None):
    adapter = BoftAdapter(d, d, BoftConfig(block_size=b, n_factors=m, side=side)).to(dtype)
    adapter.form = form or adapter.form
    torch.manual_seed(seed)
    with torch.no_grad():
        adapter.boft_Q.normal_(0, scale)
    return adapter


@pytest.fixture(params=[(name, side) for name in sorted(MODELS) for side in SIDES], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    name, side = request.param
    build, targets, make_input = MODELS[name]
    torch.manual_seed(1)
    return build, targets, side, make_input()


# --- config and shape validation -------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("block_size", 0), ("block_size", 1), ("block_size", 2.5), ("block_size", True),
    ("n_factors", 0), ("n_factors", -1), ("side", "both"),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BoftConfig(**{field: value})


def test_config_round_trips_through_dict():
    cfg = BoftConfig(target_modules=["q_proj"], block_size=2, n_factors=5, side="input")
    assert hp.AdapterConfig.from_dict(cfg.to_dict()) == cfg


def test_shape_error_lists_block_sizes_and_factor_counts_that_would_work():
    with pytest.raises(ValueError) as err:
        BoftAdapter(24, 96, BoftConfig(block_size=8, n_factors=4))
    message = str(err.value)
    assert "d=96" in message and "[2, 3, 4, 6, 12]" in message and "[1, 2, 3]" in message
    for b in fitting_block_sizes(96, 4):
        BoftAdapter(24, 96, BoftConfig(block_size=b, n_factors=4))
    for m in fitting_factor_counts(96, 8):
        BoftAdapter(24, 96, BoftConfig(block_size=8, n_factors=m))
    # The input side checks d_in instead: 24 = 8 * 3 blocks cannot pair over 2 factors.
    with pytest.raises(ValueError, match="input-side dimension d=24"):
        BoftAdapter(24, 96, BoftConfig(block_size=8, n_factors=2, side="input"))


def test_fitting_lists_agree_with_fits():
    for d in range(1, 70):
        for m in range(1, 5):
            assert fitting_block_sizes(d, m) == [b for b in range(2, d + 1) if fits(d, b, m)]
        for b in range(1, 9):
            assert fitting_factor_counts(d, b) == [m for m in range(1, 9) if fits(d, b, m)]


def test_inject_names_the_module_that_does_not_fit():
    model = nn.Sequential(nn.Linear(16, 30))
    with pytest.raises(ValueError, match=r"'0'.*d_out=30.*block_size=4"):
        hp.inject(model, BoftConfig(target_modules=["0"], block_size=4))


# --- butterfly structure ---------------------------------------------------------------


@pytest.mark.parametrize("k, b", [(8, 4), (8, 3), (16, 2), (4, 5)])
def test_butterfly_permutations_are_permutations_pairing_blocks_at_stride(k, b):
    levels = 1 + int(math.log2(k))
    assert torch.equal(butterfly_permutation(1, k, b), torch.arange(k * b))
    for level in range(2, levels + 1):
        perm = butterfly_permutation(level, k, b)
        assert torch.equal(perm.sort().values, torch.arange(k * b))
        assert torch.equal(perm[perm], torch.arange(k * b))  # a swap: P_i = P_iᵀ
        stride = 2 ** (level - 2)
        for slot in range(k):
            sources = set((perm[slot * b:(slot + 1) * b] // b).tolist())
            lower = slot % (2 * stride) < stride
            assert sources == ({slot, slot + stride} if lower else {slot - stride, slot})


def test_too_many_factors_for_the_block_count_is_refused():
    with pytest.raises(ValueError, match="n_blocks"):
        butterfly_permutation(4, 6, 2)


@pytest.mark.parametrize("d, b", [(32, 4), (24, 3), (32, 2), (16, 16)])
def test_factor_count_one_plus_log2_k_makes_R_dense_and_fewer_factors_do_not(d, b):
    k = d // b
    full = 1 + int(math.log2(k))
    for m in range(1, full + 1):
        R = random_adapter(d, b, m).dense_rotation().detach()
        connected = R.abs() > 1e-12
        # After m factors each output is tied to exactly one group of 2^(m-1) blocks.
        assert connected.sum(dim=1).tolist() == [b * 2 ** (m - 1)] * d
        if m == full:
            assert connected.all()


# --- orthogonality, identity and consistency of the activation path --------------------


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("d, b, m", [(32, 4, 3), (24, 3, 4), (16, 8, 2), (40, 5, 1)])
def test_rotation_is_orthogonal_and_rotate_matches_dense(d, b, m, side):
    adapter = random_adapter(d, b, m, side=side)
    R = adapter.dense_rotation().detach()
    eye = torch.eye(d, dtype=torch.float64)
    assert (R.T @ R - eye).abs().max() < 1e-10
    assert (R @ R.T - eye).abs().max() < 1e-10
    h = torch.randn(2, 3, d, dtype=torch.float64)
    with torch.no_grad():
        rotated = adapter.rotate(h)
        assert torch.allclose(rotated.norm(dim=-1), h.norm(dim=-1), rtol=1e-12, atol=0)
        assert torch.allclose(rotated, h @ R.T, rtol=0, atol=1e-12)
        assert torch.allclose(adapter.rotate_transposed(h), h @ R, rtol=0, atol=1e-12)
        assert torch.allclose(adapter.rotate_transposed(rotated), h, rtol=0, atol=1e-12)


def test_cayley_blocks_are_exact_cayley_transforms():
    adapter = random_adapter(8, 4, 2)
    blocks = adapter.cayley_blocks().detach()
    b = 4
    rows, cols = torch.triu_indices(b, b, offset=1)
    q = adapter.boft_Q.detach()[1, 0]
    Q = torch.zeros(b, b, dtype=torch.float64)
    Q[rows, cols] = q
    Q = Q - Q.T
    eye = torch.eye(b, dtype=torch.float64)
    assert torch.allclose(blocks[1, 0], (eye + Q) @ torch.linalg.inv(eye - Q), atol=1e-12)


def test_zero_q_gives_identity_rotation():
    adapter = BoftAdapter(32, 32, BoftConfig(block_size=4, n_factors=4)).double()
    assert torch.equal(adapter.dense_rotation(), torch.eye(32, dtype=torch.float64))


# --- the custom autograd function --------------------------------------------------------


@pytest.mark.parametrize("transposed", [False, True])
def test_recomputing_function_matches_plain_autograd_in_float64(transposed):
    adapter = random_adapter(32, 4, 3, form="factored")
    h = torch.randn(3, 5, 32, dtype=torch.float64)
    weights = torch.randn(3, 5, 32, dtype=torch.float64)
    results = []
    for recompute in (True, False):
        adapter.recompute_stages = recompute
        adapter.boft_Q.grad = None
        x = h.clone().requires_grad_(True)
        y = adapter.rotate_transposed(x) if transposed else adapter.rotate(x)
        (y * weights).sum().backward()
        results.append((y.detach(), x.grad, adapter.boft_Q.grad.clone()))
    (y1, gx1, gq1), (y2, gx2, gq2) = results
    assert torch.allclose(y1, y2, rtol=0, atol=1e-13)
    assert torch.allclose(gx1, gx2, rtol=0, atol=1e-12)
    assert torch.allclose(gq1, gq2, rtol=0, atol=1e-12)
    assert gq1.abs().sum() > 0


def saved_activation_elements(adapter, h):
    """Floating-point elements autograd keeps for backward of ``rotate(h)``, minus the O(m·k·b²) block tensors."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() if t.is_floating_point() else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        adapter.rotate(h)
    return sum(n for n in sizes if n >= h.shape[-1] * 8)


def test_function_saves_only_the_branch_input():
    adapter = random_adapter(64, 2, 3, form="factored")  # 32 blocks: a block tensor (m·k·b² = 384) is far below N·d
    h = torch.randn(50, 64, dtype=torch.float64, requires_grad=True)
    assert saved_activation_elements(adapter, h) == h.numel()  # the stages are recomputed in backward
    adapter.recompute_stages = False
    assert saved_activation_elements(adapter, h) >= 3 * h.numel()  # plain autograd keeps every stage


def test_gradcheck_butterfly_function():
    torch.manual_seed(0)
    k, b, m = 4, 3, 3
    adapter = BoftAdapter(k * b, k * b, BoftConfig(block_size=b, n_factors=m))
    h = torch.randn(2, k * b, dtype=torch.float64, requires_grad=True)
    blocks = torch.randn(m, k, b, b, dtype=torch.float64, requires_grad=True)  # any blocks, not only orthogonal
    for plan in (adapter.plan, adapter.plan_transposed):
        assert torch.autograd.gradcheck(ButterflyFunction.apply, (h, blocks, plan, False))
    assert torch.autograd.gradcheck(ButterflyFunction.apply, (h, blocks, adapter.plan, True))  # P_1 = I skipped
    fast = ButterflyFunction.apply(h, blocks, adapter.plan_transposed, False)
    assert torch.allclose(fast, butterfly_reference(h, blocks, adapter.plan_transposed[0]), rtol=0, atol=1e-12)


def test_gradient_only_for_blocks_when_input_is_frozen():
    adapter = random_adapter(16, 4, 3, form="factored")
    h = torch.randn(4, 16, dtype=torch.float64)
    adapter.rotate(h).square().sum().backward()
    reference = adapter.boft_Q.grad.clone()
    adapter.boft_Q.grad = None
    adapter.recompute_stages = False
    adapter.rotate(h).square().sum().backward()
    assert torch.allclose(adapter.boft_Q.grad, reference, atol=1e-12)


# --- the adapter inside models -----------------------------------------------------------


def test_trainable_count_is_closed_form(case):
    build, targets, side, _ = case
    b, m = 4, 3
    model = hp.inject(build(), boft(targets, side, block_size=b, n_factors=m))
    expected = 0
    for _, layer in hp.adapted_layers(model):
        d = layer.adapter.d_out if side == "output" else layer.adapter.d_in
        expected += m * (d // b) * b * (b - 1) // 2
    assert hp.count_trainable(model) == expected


def test_input_side_rotates_activations_before_the_weight():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8).double()
    model = hp.inject(nn.Sequential(layer), BoftConfig(target_modules=["0"], block_size=4, n_factors=2, side="input"))
    tiny_models.perturb(model)
    adapter = hp.adapted_layers(model)[0][1].adapter
    x = torch.randn(5, 16, dtype=torch.float64)
    R = adapter.dense_rotation().detach()
    with torch.no_grad():
        assert torch.allclose(model(x), x @ R.T @ layer.weight.T + layer.bias, atol=1e-12)


# --- property: any (d, b, m) either is refused or gives an orthogonal identity-at-init R ----


@st.composite
def shapes(draw):
    """(d, b, m, side) with d often a multiple of b, so both outcomes are drawn often."""
    b = draw(st.integers(0, 9))
    m = draw(st.integers(0, 5))
    k = draw(st.integers(1, 12))
    d = draw(st.sampled_from([max(1, b * k), max(1, b * k), max(1, b * k + 1)]) | st.integers(1, 48))
    return d, b, m, draw(st.sampled_from(SIDES))


@settings(max_examples=60, deadline=None)
@given(shape=shapes())
def test_any_shape_is_refused_or_orthogonal_and_identity_at_init(shape):
    d, b, m, side = shape
    torch.manual_seed(0)
    layer = nn.Linear(d, d).double()
    x = torch.randn(3, d, dtype=torch.float64)
    try:
        model = hp.inject(nn.Sequential(layer), BoftConfig(target_modules=["0"], block_size=b, n_factors=m, side=side))
    except ValueError:
        assert not (b >= 2 and m >= 1 and fits(d, b, m))
        return
    assert fits(d, b, m)
    with torch.no_grad():
        assert_close_ulps(model(x), layer(x))  # R = I exactly; the bias is added after the GEMM here
        tiny_models.perturb(model, scale=1.0)
        R = hp.adapted_layers(model)[0][1].adapter.dense_rotation()
        W = layer.weight
        expected = (x @ W.T @ R.T if side == "output" else x @ R.T @ W.T) + layer.bias
        assert torch.allclose(model(x), expected, rtol=0, atol=1e-10)
    assert (R.T @ R - torch.eye(d, dtype=torch.float64)).abs().max() < 1e-10
