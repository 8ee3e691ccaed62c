"""The fast activation-side paths equal the dense reference forms, in float64.

Each method's ``AdaptedLinear`` forward (reshapes, gathers, batched small
matmuls, FFTs, custom autograd functions) is compared with ``y = W' x + b``
where ``W'`` is built here, densely, from the definition in the method's module docstring and
the adapter's own tensors — never through the adapter's fast path. Outputs
and gradients (w.r.t. the input and every trainable tensor) must agree to
float64 rounding. Parameters are moved off their identity start first, so a
path that ignored them could not pass.

Methods are tested as they are registered in ``hybridpeft.adapters.config.known_methods()``.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridpeft.adapters import adapter_class
from hybridpeft.adapters.base import AdaptedLinear
from hybridpeft.adapters.config import config_class, known_methods

TOL = dict(rtol=1e-10, atol=1e-11)


def needs(method: str):
    return pytest.mark.skipif(method not in known_methods(), reason=f"hybridpeft has no method {method!r} yet")


def _host(method: str, d_in: int, d_out: int, seed: int = 0, adapter_kwargs=None, **fields) -> AdaptedLinear:
    """A float64 ``AdaptedLinear`` (with bias) whose adapter tensors are random, not at their start."""
    torch.manual_seed(seed)
    config = config_class(method)(**fields)
    base = nn.Linear(d_in, d_out, bias=True, dtype=torch.float64)
    adapter = adapter_class(method)(d_in, d_out, config, **(adapter_kwargs or {})).to(torch.float64)
    layer = AdaptedLinear(base, adapter)
    manifold = {id(p) for p in adapter.manifold_parameters()}
    with torch.no_grad():
        for p in adapter.parameters():
            if id(p) in manifold:  # stays on the orthogonal group: random orthogonal blocks
                p.copy_(torch.linalg.qr(torch.randn_like(p))[0])
            else:
                p.add_(0.3 * torch.randn_like(p))
    return layer


def _compare(layer: AdaptedLinear, dense_weight, d_in: int, batch_shape=(2, 5), dense_bias=None) -> None:
    """Fast path vs ``F.linear(x, dense_weight(), dense_bias())``: outputs, input grads, parameter grads.

    ``dense_weight`` (and ``dense_bias``, default the layer's own ``b``) are closures
    building ``W'`` (d_out, d_in) and ``b'`` differentiably from the adapter's parameters.
    """
    params = [p for p in layer.adapter.parameters() if p.requires_grad]
    assert params, "adapter has no trainable tensors"
    x = torch.randn(*batch_shape, d_in, dtype=torch.float64, requires_grad=True)
    y = layer(x)  # (B, T, d_out)
    probe = torch.randn_like(y)
    fast_grads = torch.autograd.grad((y * probe).sum(), [x, *params])

    y_ref = F.linear(x, dense_weight(), layer.bias if dense_bias is None else dense_bias())
    ref_grads = torch.autograd.grad((y_ref * probe).sum(), [x, *params])

    torch.testing.assert_close(y, y_ref, **TOL)
    assert (y - F.linear(x, layer.weight, layer.bias)).abs().max() > 1e-3, "adapter left the output unchanged"
    for fast, ref in zip(fast_grads, ref_grads):
        torch.testing.assert_close(fast, ref, **TOL)


# ---------------------------------------------------------------- dense building blocks

def _cayley(q_triu: Tensor, b: int) -> Tensor:
    """(..., b(b-1)/2) strict upper triangles -> (..., b, b) blocks ``(I + Q)(I − Q)⁻¹``."""
    rows, cols = torch.triu_indices(b, b, offset=1)
    skew = q_triu.new_zeros(*q_triu.shape[:-1], b, b)
    skew[..., rows, cols] = q_triu
    skew = skew - skew.transpose(-1, -2)
    eye = torch.eye(b, dtype=q_triu.dtype)
    return (eye + skew) @ torch.linalg.inv(eye - skew)


def _perm_matrix(index: Tensor) -> Tensor:
    """P with ``(P h)[p] = h[index[p]]``."""
    return torch.eye(index.numel(), dtype=torch.float64)[index]


def _boft_dense(adapter) -> Tensor:
    """``R = B_m ⋯ B_1``, ``B_i = P_iᵀ blockdiag(cayley(Q_i1) … cayley(Q_ik)) P_i``."""
    blocks = _cayley(adapter.boft_Q, adapter.block_size)  # (m, k, b, b)
    r = torch.eye(adapter.dim, dtype=torch.float64)
    for i in range(adapter.n_factors):
        p = _perm_matrix(adapter.permutations[i])
        r = p.t() @ torch.block_diag(*blocks[i]) @ p @ r
    return r


# ---------------------------------------------------------------- LoRA / LoRA-GA

@needs("lora")
def test_lora_fast_path_matches_dense():
    layer = _host("lora", 12, 20, r=3, alpha=6.0)
    a = layer.adapter
    _compare(layer, lambda: layer.weight + a.scaling * a.lora_B @ a.lora_A, 12)


@needs("lora")
@pytest.mark.parametrize("method", ["lora", "lora_ga"])
def test_lora_adds_into_the_base_output_in_place_unless_a_hook_observes_it(method):
    """One N × d_out buffer per layer, not two (addmm would copy h first); a base hook's h stays intact."""
    layer = _host(method, 12, 20, r=3, alpha=6.0)
    layer.base_layer.bias = None  # the bias add would make the output a new tensor either way
    made = []
    original = layer._base_matmul
    layer._base_matmul = lambda t: made.append(original(t)) or made[-1]
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.untyped_storage().data_ptr() == made[-1].untyped_storage().data_ptr()
    del layer._base_matmul
    seen = []
    layer.register_base_hook(lambda x_, h: seen.append((h, h.detach().clone())))
    y = layer(x)
    h, copy = seen[-1]
    assert y.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
    assert torch.equal(h, copy)  # the hook's tensor was not written into


@needs("lora_ga")
def test_lora_ga_rank_2r_branch_matches_dense():
    layer = _host("lora_ga", 12, 20, r=3, alpha=6.0)
    a = layer.adapter
    with torch.no_grad():  # a start point as lora_ga_init would leave it: frozen and non-zero
        a.lora_A0.copy_(torch.randn_like(a.lora_A0))
        a.lora_B0.copy_(torch.randn_like(a.lora_B0))
    _compare(layer, lambda: layer.weight + a.scaling * (a.lora_B @ a.lora_A - a.lora_B0 @ a.lora_A0), 12)


@needs("dora")
def test_dora_fast_path_matches_dense():
    """``W' = diag(m / ‖V‖_c) V``, ``V = W + s B A``, the norm detached (PEFT's and the paper's §4.3)."""
    layer = _host("dora", 12, 20, r=3, alpha=6.0)
    a = layer.adapter

    def dense():
        v = layer.weight + a.scaling * a.lora_B @ a.lora_A  # (d_out, d_in)
        return (a.magnitude / torch.linalg.vector_norm(v, dim=1).detach()).unsqueeze(1) * v

    _compare(layer, dense, 12)


@needs("ia3")
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_matches_dense(feedforward):
    """``W' = diag(l) W``, ``b' = l ⊙ b``; feedforward: ``W' = W diag(l)``, ``b' = b``."""
    layer = _host("ia3", 12, 20, adapter_kwargs={"feedforward": feedforward})
    l = layer.adapter.ia3_l
    if feedforward:
        _compare(layer, lambda: layer.weight * l, 12)
    else:
        _compare(layer, lambda: l.unsqueeze(1) * layer.weight, 12, dense_bias=lambda: l * layer.bias)


# ---------------------------------------------------------------- BOFT

@needs("boft")
@pytest.mark.parametrize(
    "block_size, n_factors, side, d_in, d_out",
    [
        (2, 1, "output", 6, 8),
        (4, 3, "output", 10, 16),
        (3, 3, "output", 7, 24),  # odd blocks: unequal halves swapped at each level
        (4, 2, "input", 16, 6),
        (2, 4, "input", 16, 5),  # m = 1 + log2(k): R is dense
    ],
)
@pytest.mark.parametrize("form", ["composed", "factored"])
def test_boft_butterfly_matches_dense(block_size, n_factors, side, d_in, d_out, form):
    layer = _host("boft", d_in, d_out, block_size=block_size, n_factors=n_factors, side=side)
    a = layer.adapter
    a.form = form
    if side == "output":
        _compare(layer, lambda: _boft_dense(a) @ layer.weight, d_in)
    else:
        _compare(layer, lambda: layer.weight @ _boft_dense(a), d_in)


@needs("boft")
def test_boft_recomputing_backward_equals_plain_autograd():
    """The stage-recomputing autograd function and the plain-autograd path give identical gradients."""
    layer = _host("boft", 8, 32, block_size=4, n_factors=3, side="output")
    layer.adapter.form = "factored"
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    probe = torch.randn(3, 4, 32, dtype=torch.float64)
    grads = []
    for recompute in (True, False):
        layer.adapter.recompute_stages = recompute
        layer.adapter.zero_grad(set_to_none=True)
        (layer(x) * probe).sum().backward()
        grads.append(layer.adapter.boft_Q.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], **TOL)


@needs("boft")
def test_boft_dense_rotation_is_orthogonal_and_merge_matches():
    layer = _host("boft", 8, 16, block_size=4, n_factors=3, side="output")
    r = _boft_dense(layer.adapter)
    torch.testing.assert_close(r.t() @ r, torch.eye(16, dtype=torch.float64), **TOL)
    with torch.no_grad():
        torch.testing.assert_close(layer.adapter.merged_weight(layer.weight), r @ layer.weight, **TOL)


# ---------------------------------------------------------------- unitary

def _householder(v: Tensor) -> Tensor:
    n = v.numel()
    return torch.eye(n, dtype=v.dtype) - 2 * torch.outer(v, v.conj()) / (v.conj() @ v)


def _structured_dense_complex(u) -> Tensor:
    """``U = D3 R2 F⁻¹ D2 Π R1 F D1 S⁻¹`` as an n × n complex matrix (Π = S⁻¹ = the same gather)."""
    n = u.n
    k = torch.arange(n, dtype=torch.float64)
    fourier = torch.exp(-2j * math.pi * torch.outer(k, k) / n) / math.sqrt(n)  # unitary DFT
    gather = _perm_matrix(u.perm).to(torch.complex128)
    phases = torch.polar(torch.ones_like(u.theta), u.theta)  # (3, n)
    v = torch.view_as_complex(u.reflect)  # (2, n)
    v0 = torch.view_as_complex(u.reflect_start)
    r1 = _householder(v[0]) @ _householder(v0[0])
    r2 = _householder(v[1]) @ _householder(v0[1])
    return (torch.diag(phases[2]) @ r2 @ fourier.conj().t() @ torch.diag(phases[1]) @ gather
            @ r1 @ fourier @ torch.diag(phases[0]) @ gather)


def _complex_to_real(m: Tensor) -> Tensor:
    """The real 2n × 2n matrix acting on interleaved (re, im) features like ``m`` on C^n."""
    n = m.shape[0]
    out = m.real.new_zeros(2 * n, 2 * n)
    out[0::2, 0::2], out[0::2, 1::2] = m.real, -m.imag
    out[1::2, 0::2], out[1::2, 1::2] = m.imag, m.real
    return out


@needs("unitary")
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("d_out", [12, 10])  # n = 6 and n = 5 (odd FFT length)
def test_structured_unitary_matches_dense(d_out, recompute):
    layer = _host("unitary", 7, d_out, parameterization="structured", recompute=recompute)
    u = layer.adapter.unitary
    _compare(layer, lambda: _complex_to_real(_structured_dense_complex(u)) @ layer.weight, 7)


@needs("unitary")
def test_full_capacity_unitary_matches_dense():
    layer = _host("unitary", 9, 12, parameterization="full", block_size=4)
    u = layer.adapter.unitary
    _compare(layer, lambda: torch.block_diag(*u.blocks) @ layer.weight, 9)


# ---------------------------------------------------------------- Hybrid

@needs("hybrid")
@pytest.mark.parametrize("lam", [0.3, 0.0, 1.0])
def test_hybrid_single_base_matmul_matches_dense(lam):
    """``W' = λ (W + s (B A − B0 A0)) + (1 − λ) R W`` with every tensor off its start."""
    layer = _host("hybrid", 10, 16, lora_r=2, lora_alpha=4.0, boft_block_size=4, boft_n_factors=3)
    a = layer.adapter
    lo = a.lora
    with torch.no_grad():
        lo.lora_A0.copy_(torch.randn_like(lo.lora_A0))
        lo.lora_B0.copy_(torch.randn_like(lo.lora_B0))
        a.mix_lambda.fill_(lam)

    def dense():
        w = layer.weight
        lora_delta = lo.scaling * (lo.lora_B @ lo.lora_A - lo.lora_B0 @ lo.lora_A0)
        return lam * (w + lora_delta) + (1 - lam) * _boft_dense(a.boft) @ w

    x = torch.randn(2, 3, 10, dtype=torch.float64)
    calls = []
    original = layer._base_matmul
    layer._base_matmul = lambda t: calls.append(1) or original(t)
    layer(x)
    assert len(calls) == 1, "the Hybrid must compute W x once"
    del layer._base_matmul
    _compare(layer, dense, 10)  # at λ = 0 or 1 one branch's gradient is 0 in both paths
