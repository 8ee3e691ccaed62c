"""The composed butterfly and the block-diagonal function behind BOFT, the Hybrid and the full unitary.

The composed form rests on one structural claim, tested first: for our factor layout the
butterfly product ``R = B_m ⋯ B_1`` is block-diagonal with dense blocks of ``c = b · 2^(m−1)``
consecutive features (no outer permutation). Then every piece is checked in float64 against
plain autograd or a dense reference, with ``gradcheck`` on each custom autograd Function, and
the memory and accuracy claims of the reversible backward are measured.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hybridpeft as hp
from hybridpeft.adapters.base import AdaptedLinear
from hybridpeft.adapters.blockdiag import BlockDiagonalFunction, Keep, LateFlag, block_apply
from hybridpeft.adapters.boft import (
    BoftAdapter,
    BoftConfig,
    CayleyFunction,
    ComposedButterflyFunction,
    butterfly_form,
    composed_size,
    skew_index,
)
from hybridpeft.adapters.hybrid import HybridAdapter, HybridConfig, rebuild_is_accurate
from numerics import assert_close_ulps

TOL = dict(rtol=1e-10, atol=1e-11)


def random_boft(d, b, m, scale=0.5, seed=0, form="composed"):
    torch.manual_seed(seed)
    adapter = BoftAdapter(d, d, BoftConfig(block_size=b, n_factors=m)).double()
    adapter.form = form
    with torch.no_grad():
        adapter.boft_Q.normal_(0, scale)
    return adapter


def random_orthogonal_blocks(k, c, seed=0):
    torch.manual_seed(seed)
    return torch.linalg.qr(torch.randn(k, c, c, dtype=torch.float64))[0]


# --- the structure the composed form relies on ------------------------------------------------


@pytest.mark.parametrize("d, b, m", [(32, 4, 3), (48, 3, 3), (64, 2, 4), (32, 8, 2), (24, 3, 1), (32, 2, 5)])
def test_butterfly_product_is_block_diagonal_with_dense_blocks_of_b_times_2_to_m_minus_1(d, b, m):
    r = random_boft(d, b, m, form="factored").dense_rotation().detach()  # (d, d), by the factored path
    c = composed_size(b, m)
    assert c == b * 2 ** (m - 1)
    group = torch.arange(d) // c
    same_block = group[:, None] == group[None, :]
    assert r[~same_block].abs().max() == 0 if (~same_block).any() else True  # nothing outside the blocks
    assert r[same_block].abs().min() > 1e-12  # dense inside: the blocks are not any smaller


def test_composed_blocks_are_the_diagonal_blocks_of_the_factored_rotation():
    adapter = random_boft(48, 3, 3, form="factored")
    dense = adapter.dense_rotation().detach()
    blocks = adapter.composed_blocks().detach()  # (4, 12, 12)
    torch.testing.assert_close(torch.block_diag(*blocks), dense, **TOL)


def test_form_rule_picks_composed_up_to_its_limit_and_factored_beyond():
    assert butterfly_form(8, 3) == "composed" and butterfly_form(8, 1) == "composed"
    assert butterfly_form(2, 8) == "factored"  # c = 256: too wide to apply densely
    assert butterfly_form(512, 1) == "composed"  # one factor: R's blocks are the Cayley blocks


# --- the custom autograd Functions ------------------------------------------------------------


def _skew(q, b):
    rows, cols = torch.triu_indices(b, b, offset=1)
    skew = q.new_zeros(*q.shape[:-1], b, b)
    skew[..., rows, cols] = q
    return skew - skew.transpose(-1, -2)


@pytest.mark.parametrize("scale", [0.3, 30.0])  # 30: rotations near 180°, far beyond fine-tuning
def test_cayley_function_equals_solve_and_passes_gradcheck(scale):
    b = 5
    q = (scale * torch.randn(2, 3, b * (b - 1) // 2, dtype=torch.float64)).requires_grad_(True)
    skew = _skew(q, b)
    eye = torch.eye(b, dtype=torch.float64)
    reference = (eye + skew) @ torch.linalg.inv(eye - skew)
    fast = CayleyFunction.apply(q, skew_index(b), b)
    torch.testing.assert_close(fast, reference, **TOL)
    probe = torch.randn_like(fast)
    g_fast, = torch.autograd.grad((fast * probe).sum(), q)
    g_ref, = torch.autograd.grad((reference * probe).sum(), q)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-11)
    assert torch.autograd.gradcheck(lambda t: CayleyFunction.apply(t, skew_index(b), b), (q,))


def test_cayley_solve_path_of_cuda_equals_the_cpu_elimination(monkeypatch):
    """The CUDA branch (one solve_ex) run on the CPU: same blocks and gradients as the elimination."""
    from hybridpeft.adapters import boft

    b = 6
    q = (0.7 * torch.randn(4, b * (b - 1) // 2, dtype=torch.float64)).requires_grad_(True)
    probe = torch.randn(4, b, b, dtype=torch.float64)
    results = []
    for devices in ({"cpu"}, set()):
        monkeypatch.setattr(boft, "ELIMINATION_DEVICES", devices)
        r = CayleyFunction.apply(q, skew_index(b), b)
        results.append((r, *torch.autograd.grad((r * probe).sum(), q)))
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, **TOL)


def test_cayley_in_float32_is_correctly_rounded_without_pivoting():
    """The CPU forward eliminates without pivoting, in float64: correct to float32 rounding even for large S."""
    b = 8
    q = 10 * torch.randn(3, 64, b * (b - 1) // 2)
    r = CayleyFunction.apply(q, skew_index(b), b)
    skew, eye = _skew(q.double(), b), torch.eye(b, dtype=torch.float64)
    exact = torch.linalg.solve(eye - skew, eye + skew)
    assert r.dtype == torch.float32
    assert (r.double() - exact).abs().max() <= torch.finfo(torch.float32).eps  # |R_ij| ≤ 1: half an ulp of 1 and below


def test_composed_butterfly_function_passes_gradcheck():
    adapter = random_boft(24, 3, 2)
    blocks = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)  # any blocks, not only orthogonal
    assert torch.autograd.gradcheck(lambda t: ComposedButterflyFunction.apply(t, adapter.plan, 6), (blocks,))


KEEPS = {
    "input": lambda base: Keep("input"),
    "output-transpose": lambda base: Keep("output", inverse="transpose"),
    "output-solve": lambda base: Keep("output", inverse="solve"),
    "base": lambda base: Keep("base", base=base),
    "output-guard-false": lambda base: Keep("output", inverse="solve", base=base, guard=LateFlag(torch.tensor(False))),
}


@pytest.mark.parametrize("keep", sorted(KEEPS))
@pytest.mark.parametrize("low_rank", [False, True])
def test_block_diagonal_function_gradcheck_and_equality_with_autograd(keep, low_rank):
    torch.manual_seed(0)
    k, c, n, r = 3, 4, 5, 2
    w = torch.randn(k * c, 7, dtype=torch.float64)
    x = torch.randn(n, 7, dtype=torch.float64)
    base = lambda t: t @ w.t()  # noqa: E731
    h = base(x).requires_grad_(True)
    if keep == "output-transpose":  # the transpose is the inverse only for orthogonal blocks
        blocks = random_orthogonal_blocks(k, c).requires_grad_(True)
    else:
        blocks = (torch.eye(c, dtype=torch.float64) + 0.3 * torch.randn(k, c, c, dtype=torch.float64)).requires_grad_(True)
    u = torch.randn(n, r, dtype=torch.float64, requires_grad=True) if low_rank else None
    v = torch.randn(k * c, r, dtype=torch.float64, requires_grad=True) if low_rank else None
    spec = KEEPS[keep](base)
    inputs = [t for t in (h, blocks, u, v) if t is not None]

    def fast(h_, blocks_, *uv):
        return BlockDiagonalFunction.apply(h_, blocks_, *(uv or (None, None)), x, spec)

    def reference(h_, blocks_, *uv):
        y = torch.einsum("nkj,kij->nki", h_.view(n, k, c), blocks_).reshape(n, k * c)
        return y + uv[0] @ uv[1].t() if uv else y

    probe = torch.randn(n, k * c, dtype=torch.float64)
    torch.testing.assert_close(fast(*inputs), reference(*inputs), **TOL)
    for a, b in zip(torch.autograd.grad((fast(*inputs) * probe).sum(), inputs),
                    torch.autograd.grad((reference(*inputs) * probe).sum(), inputs)):
        torch.testing.assert_close(a, b, **TOL)
    assert torch.autograd.gradcheck(fast, tuple(inputs))


def test_keep_output_saves_the_returned_tensor_only():
    blocks = random_orthogonal_blocks(4, 8)
    h = torch.randn(50, 32, dtype=torch.float64, requires_grad=True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = BlockDiagonalFunction.apply(h, blocks, None, None, None, Keep("output", inverse="transpose"))
    activations = {ptr: n for ptr, n in storages.items() if n >= h.numel()}
    assert activations == {y.untyped_storage().data_ptr(): y.numel()}  # y itself, not h


def test_guard_false_recomputes_h_from_x_in_backward():
    calls = []
    w = torch.randn(8, 6, dtype=torch.float64)

    def base(t):
        calls.append(torch.is_grad_enabled())
        return t @ w.t()

    x = torch.randn(3, 6, dtype=torch.float64)
    blocks = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    for flag, expected_calls in ((True, [True]), (False, [True, False])):
        calls.clear()
        keep = Keep("output", inverse="solve", base=base, guard=LateFlag(torch.tensor(flag)))
        BlockDiagonalFunction.apply(base(x), blocks, None, None, x, keep).sum().backward()
        assert calls == expected_calls  # the forward's call, then (guard false) a recomputation without grad


def test_keep_validates_its_fields():
    with pytest.raises(ValueError, match="kind='both'"):
        Keep("both")
    with pytest.raises(ValueError, match="inverse='pinv'"):
        Keep("output", inverse="pinv")
    with pytest.raises(ValueError, match="needs base"):
        Keep("base")


# --- adapters on the composed form ------------------------------------------------------------


@pytest.mark.parametrize("side", ["output", "input"])
def test_composed_and_factored_forms_agree_in_float64(side):
    torch.manual_seed(0)
    results = []
    for form in ("composed", "factored"):
        torch.manual_seed(0)
        layer = AdaptedLinear(nn.Linear(32, 48).double(), BoftAdapter(32, 48, BoftConfig(block_size=4, n_factors=3,
                                                                                         side=side)).double())
        layer.adapter.form = form
        with torch.no_grad():
            layer.adapter.boft_Q.normal_(0, 0.4)
        x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        (y * torch.linspace(-1, 1, 48, dtype=torch.float64)).sum().backward()
        with torch.no_grad():
            merged = layer.adapter.merged_weight(layer.weight)
            unmerged = layer.adapter.unmerged_weight(merged)
        results.append((y.detach(), x.grad, layer.adapter.boft_Q.grad, merged, unmerged))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)


def test_reversible_boft_in_bf16_is_as_accurate_as_keeping_h():
    """Rebuilding h from the bf16 output costs no accuracy: ∂L/∂Q within 1.25× the factored path's error."""
    torch.manual_seed(0)
    w = torch.randn(128, 64) / 8
    x = torch.randn(200, 64)
    probe = torch.randn(200, 128)
    truth_adapter = random_boft(128, 4, 3, scale=0.3, form="factored")
    (truth_adapter.rotate(x.double() @ w.double().t()) * probe.double()).sum().backward()
    truth = truth_adapter.boft_Q.grad
    errors = {}
    for form in ("composed", "factored"):
        adapter = BoftAdapter(64, 128, BoftConfig(block_size=4, n_factors=3))
        adapter.form = form
        with torch.no_grad():
            adapter.boft_Q.copy_(truth_adapter.boft_Q.float())
        layer = AdaptedLinear(nn.Linear(64, 128, bias=False).bfloat16(), adapter)
        with torch.no_grad():
            layer.base_layer.weight.copy_(w)
        (layer(x.bfloat16()).float() * probe).sum().backward()
        errors[form] = ((adapter.boft_Q.grad.double() - truth).norm() / truth.norm()).item()
    assert errors["composed"] <= 1.25 * errors["factored"], errors


def _hybrid_layer(lam, seed=0, bias=True):
    torch.manual_seed(seed)
    adapter = HybridAdapter(12, 16, HybridConfig(lora_r=2, lora_alpha=4.0, boft_block_size=4, boft_n_factors=2,
                                                 schedule="fixed", lam_fixed=lam)).double()
    layer = AdaptedLinear(nn.Linear(12, 16, bias=bias).double(), adapter)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn_like(p))
        adapter.lora.lora_A0.normal_()
        adapter.lora.lora_B0.normal_()
    return layer


def _grads(layer, x, probe):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * probe).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in layer.adapter.parameters() if p.requires_grad]


@pytest.mark.parametrize("lam", [0.5, 0.2, 0.0, 1.0])
def test_hybrid_composed_equals_the_lerp_form(lam):
    layer = _hybrid_layer(lam)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    probe = torch.randn(2, 3, 16, dtype=torch.float64)
    composed = _grads(layer, x, probe)
    layer.adapter.boft.form = "factored"
    factored = _grads(layer, x, probe)
    for a, b in zip(composed, factored):
        torch.testing.assert_close(a, b, **TOL)


def test_hybrid_with_a_half_turn_at_lambda_half_recomputes_h_and_stays_exact():
    """λ = ½ and a block that reverses a plane: M is singular, so h cannot be rebuilt from y."""
    layer = _hybrid_layer(0.5)
    boft = layer.adapter.boft
    with torch.no_grad():  # each 4×4 Cayley block of factor 1 rotates by ~179.4° in one plane: tan(θ/2) = 200
        boft.boft_Q.zero_()
        boft.boft_Q[0, :, 0] = 200.0
    lam = layer.adapter.mix_lambda
    assert not bool(rebuild_is_accurate(boft.composed_blocks().detach(), lam))
    calls = []
    original = layer._base_matmul
    layer._base_matmul = lambda t: calls.append(1) or original(t)
    x = torch.randn(4, 12, dtype=torch.float64)
    probe = torch.randn(4, 16, dtype=torch.float64)
    composed = _grads(layer, x, probe)
    assert len(calls) == 2  # forward, and the recomputation in backward
    del layer._base_matmul
    boft.form = "factored"
    factored = _grads(layer, x, probe)
    for a, b in zip(composed, factored):
        torch.testing.assert_close(a, b, **TOL)


def test_rebuild_guard_accepts_small_rotations_and_any_rotation_far_from_lambda_half():
    eye = torch.eye(8, dtype=torch.float64).expand(3, 8, 8)
    half_turn = torch.diag(torch.tensor([-1.0, -1.0, 1, 1, 1, 1, 1, 1], dtype=torch.float64)).expand(3, 8, 8)
    assert bool(rebuild_is_accurate(eye, torch.tensor(0.5)))
    assert not bool(rebuild_is_accurate(half_turn, torch.tensor(0.5)))  # M = diag(0, 0, 1, …): singular
    assert bool(rebuild_is_accurate(half_turn, torch.tensor(0.8)))  # σ_min ≥ |2λ − 1| = 0.6
    assert bool(rebuild_is_accurate(half_turn, torch.tensor(0.0)))  # M = R, orthogonal


def test_hybrid_keeps_no_n_by_d_tensor_of_its_own():
    """Saved for backward: x (the LoRA branch's), u and the output, never h = W x."""
    layer = _hybrid_layer(0.3, bias=False)  # (a bias would make the layer's output a new tensor)
    x = torch.randn(40, 12, dtype=torch.float64, requires_grad=True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.numel()
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    big = {ptr for ptr, n in storages.items() if n >= x.numel()}
    assert big == {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}


def test_full_unitary_keeps_its_output_and_matches_einsum_gradients():
    torch.manual_seed(0)
    model = hp.inject(nn.Sequential(nn.Linear(12, 16).double()), hp.UnitaryConfig(target_modules=["0"],
                                                                                   parameterization="full", block_size=4))
    unitary = hp.adapted_layers(model)[0][1].adapter.unitary
    with torch.no_grad():
        unitary.blocks.copy_(random_orthogonal_blocks(4, 4))
    h = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(6, 16, dtype=torch.float64)
    fast = unitary.apply(h)
    reference = torch.einsum("nkj,kij->nki", h.view(6, 4, 4), unitary.blocks).reshape(6, 16)
    torch.testing.assert_close(fast, reference, **TOL)
    inputs = [h, unitary.blocks]
    for a, b in zip(torch.autograd.grad((fast * probe).sum(), inputs), torch.autograd.grad((reference * probe).sum(), inputs)):
        torch.testing.assert_close(a, b, **TOL)


def test_block_apply_matches_block_diag_matmul():
    blocks = torch.randn(3, 5, 5, dtype=torch.float64)
    h = torch.randn(7, 15, dtype=torch.float64)
    assert_close_ulps(block_apply(h, blocks), h @ torch.block_diag(*blocks).t())
    assert_close_ulps(block_apply(h, blocks, transpose=True), h @ torch.block_diag(*blocks))
