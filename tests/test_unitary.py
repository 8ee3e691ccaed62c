"""Unitary adapter: exact orthogonality, the structured start point, gradients, the reversible backward,
drift repair. The lifecycle every method shares is in ``test_adapter_contract.py``."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hybridpeft as hp
from hybridpeft.adapters.unitary import (
    StructuredUnitary,
    UnitaryAdapter,
    UnitaryConfig,
    _fourier_compatible_stride,
)

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_llama  # noqa: E402


def config_for(parameterization, targets, block, **kw):
    return UnitaryConfig(target_modules=targets, parameterization=parameterization, block_size=block, **kw)


def random_rotation(k, c, scale, dtype):
    skew = torch.randn(k, c, c, dtype=dtype) * scale
    return torch.linalg.matrix_exp(skew - skew.transpose(-1, -2))  # (k, c, c), det +1


def adapter(d, parameterization="structured", dtype=torch.float64, block_size=4, **kw):
    torch.manual_seed(3)
    return UnitaryAdapter(d, d, UnitaryConfig(parameterization=parameterization, block_size=block_size, **kw)).to(dtype)


@pytest.mark.parametrize("parameterization", ["structured", "full"])
def test_every_parameter_has_nonzero_gradient_at_init(parameterization):
    a = adapter(16, parameterization)
    h = torch.randn(9, 16, dtype=torch.float64)
    target = torch.randn(9, 16, dtype=torch.float64)
    loss = (a(h, lambda v: v) - target).square().sum()
    loss.backward()
    u = a.unitary
    if parameterization == "structured":
        for j in range(3):
            assert u.theta.grad[j].abs().max() > 1e-6, f"D{j + 1}"
        for j in range(2):
            assert u.reflect.grad[j].abs().max() > 1e-6, f"R{j + 1}"
    else:  # the Euclidean gradient may be anything; its skew part is what moves U
        g = u.blocks.grad
        assert (g @ u.blocks.transpose(-1, -2) - u.blocks @ g.transpose(-1, -2)).abs().max() > 1e-6


@pytest.mark.parametrize("parameterization", ["structured", "full"])
def test_orthogonal_to_1e10_after_random_parameters(parameterization):
    a = adapter(24, parameterization)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 2.0)
    if parameterization == "full":
        a.unitary.reorthonormalize()  # random blocks are projected back; structured needs nothing
    u = a.dense_unitary()
    eye = torch.eye(24, dtype=torch.float64)
    assert (u.t() @ u - eye).abs().max() < 1e-10
    assert (u - eye).abs().max() > 0.1  # really moved
    h = torch.randn(7, 24, dtype=torch.float64)
    y = a(h, lambda v: v)
    assert torch.allclose(y.norm(dim=-1), h.norm(dim=-1), rtol=1e-12)
    assert torch.allclose(y, h @ u.t(), atol=1e-12)  # dense form describes the fast path
    assert torch.allclose(a.unitary.apply_transposed(y), h, atol=1e-12)


def test_structured_is_complex_linear():
    """A unitary on C^{d/2}: U commutes with multiplying every (re, im) pair by i."""
    a = adapter(20)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p))
    u = a.dense_unitary()
    j = torch.block_diag(*[torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)] * 10)
    assert torch.allclose(u @ j, j @ u, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12, 17, 64])
def test_start_point_is_the_permutation_the_design_claims(n):
    """``F⁻¹ Π F`` with ``Π: k ↦ a k mod n`` is the permutation ``m ↦ a⁻¹ m``, cancelled by one gather."""
    a = _fourier_compatible_stride(n)
    assert math.gcd(a, n) == 1
    k = torch.arange(n, dtype=torch.float64)
    dft = torch.exp(-2j * math.pi * torch.outer(k, k) / n) / math.sqrt(n)  # F, (n, n)
    pi = torch.zeros(n, n, dtype=torch.complex128)
    pi[torch.arange(n), (a * torch.arange(n)) % n] = 1  # (Π ẑ)_k = ẑ_{a k}
    start = dft.conj().t() @ pi @ dft
    s_inv = pi.to(torch.complex128)  # the same gather, applied in space
    assert torch.allclose(start @ s_inv, torch.eye(n, dtype=torch.complex128), atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), scale=st.floats(0.0, 3.0))
def test_structured_property_any_even_width(n, scale):
    torch.manual_seed(n)
    u = StructuredUnitary(2 * n).double()
    with torch.no_grad():
        for p in u.parameters():
            p.add_(torch.randn_like(p) * scale)
    dense = u.apply(torch.eye(2 * n, dtype=torch.float64)).t()
    assert (dense.t() @ dense - torch.eye(2 * n, dtype=torch.float64)).abs().max() < 1e-10
    w = torch.randn(2 * n, 3, dtype=torch.float64)
    assert torch.allclose(u.apply_transposed(u.apply(w.t())).t(), w, atol=1e-10)


@pytest.mark.parametrize("parameterization", ["structured", "full"])
def test_stays_orthogonal_through_training(parameterization):
    model = hp.inject(tiny_llama(), config_for(parameterization, ["q_proj", "up_proj"], 8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = hp.trainable_parameters(model)
    opt = hp.build_optimizer(model, lr=1e-2)
    x = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        model(x, labels=x).loss.backward()
        opt.step()
        hp.after_optimizer_step(model)
        opt.zero_grad()
    for n, p in model.named_parameters():
        assert (not torch.equal(p, before[n])) == (n in trainable), n
    for _, layer in hp.adapted_layers(model):
        u = layer.adapter.dense_unitary().double()
        assert (u.t() @ u - torch.eye(u.shape[0], dtype=torch.float64)).abs().max() < 1e-5


@pytest.mark.parametrize("parameterization, per_width", [("structured", lambda d: 7 * d // 2), ("full", lambda d: d * 8)])
def test_parameter_count_closed_form(parameterization, per_width):
    model = tiny_llama()
    cfg = model.config
    hp.inject(model, config_for(parameterization, list(hp.adapters.config.DEFAULT_TARGETS), 8))
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    widths = [h, kv, kv, h, i, i, h]  # d_out of q k v o gate up down
    assert hp.count_trainable(model) == sum(per_width(d) for d in widths) * cfg.num_hidden_layers
    assert all(layer.adapter.num_parameters() == per_width(layer.adapter.d_out) for _, layer in hp.adapted_layers(model))


def test_gradcheck_structured_through_fft():
    u = StructuredUnitary(6).double()
    with torch.no_grad():
        u.theta.normal_()
        u.reflect.add_(torch.randn_like(u.reflect))
    h = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def fn(h, theta, reflect):
        u.theta, u.reflect = theta, reflect  # type: ignore[assignment]
        return u.apply(h)

    theta = u.theta.detach().clone().requires_grad_(True)
    reflect = u.reflect.detach().clone().requires_grad_(True)
    del u.theta, u.reflect  # let gradcheck feed plain tensors in their place
    assert torch.autograd.gradcheck(fn, (h, theta, reflect))


def test_gradcheck_through_recompute():
    a = adapter(8, recompute=True)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p))
    h = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: a(v, lambda w: w), (h,))


def test_recompute_matches_plain_forward_and_gradients():
    plain = adapter(16, recompute=False)
    saved = adapter(16, recompute=True)
    saved.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for p, q in zip(plain.parameters(), saved.parameters()):
            noise = torch.randn_like(p)
            p.add_(noise)
            q.add_(noise)
    h = torch.randn(4, 5, 16, dtype=torch.float64)
    grads = []
    for a in (plain, saved):
        y = a(h, lambda v: v)
        (y.sin().sum()).backward()
        grads.append((y.detach(), [p.grad for p in a.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-12)  # reversible vs reference forward
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(g0, g1, atol=1e-12)


def _moved_structured(d: int, dtype=torch.float64) -> StructuredUnitary:
    u = StructuredUnitary(d).to(dtype)
    with torch.no_grad():
        u.theta.add_(0.5 * torch.randn_like(u.theta))
        u.reflect.add_(0.5 * torch.randn_like(u.reflect))
    return u


@pytest.mark.parametrize("d", [2, 10, 12, 64])  # n = 1, 5 (odd FFT length), 6, 32
def test_reversible_backward_equals_autograd_of_the_reference(d):
    torch.manual_seed(d)
    u = _moved_structured(d)
    h = torch.randn(3, 4, d, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(3, 4, d, dtype=torch.float64)
    results = []
    for forward in (u.apply, u.apply_reference):
        y = forward(h)
        results.append((y, *torch.autograd.grad((y * probe).sum(), [h, u.theta, u.reflect])))
    for fast, reference in zip(*results):
        torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)


def test_gradcheck_reversible_function_directly():
    from hybridpeft.adapters.unitary import ReversibleStructuredFunction

    torch.manual_seed(1)
    u = _moved_structured(10)
    inputs = (torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True),
              u.theta.detach().clone().requires_grad_(True), u.reflect.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda h, t, r: ReversibleStructuredFunction.apply(h, t, r, u), inputs)


def _saved_bytes(fn, h) -> int:
    """Bytes of the distinct storages autograd keeps for backward of ``fn(h)``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(h)
    return sum(storages.values())


def test_reversible_backward_keeps_one_output_sized_tensor():
    u = StructuredUnitary(256)
    h = torch.randn(64, 256, requires_grad=True)  # float32: N·d·4 = 64 KiB
    activation = h.numel() * 4
    kept = _saved_bytes(u.apply, h)
    assert activation <= kept < activation + 16 * 1024  # + parameters (3·128 + 2·128·2 floats)
    assert _saved_bytes(u.apply_reference, h) >= 4 * activation  # what plain autograd keeps


def test_reversible_gradients_under_bf16_match_the_reference_to_float32_precision():
    torch.manual_seed(2)
    u = _moved_structured(128, torch.float32)
    h = torch.randn(32, 128).bfloat16().requires_grad_()
    probe = torch.randn(32, 128)
    grads = []
    for forward in (u.apply, u.apply_reference):
        y = forward(h)
        assert y.dtype == torch.bfloat16
        grads.append(torch.autograd.grad((y.float() * probe).sum(), [h, u.theta, u.reflect]))
    (fast_h, *fast_params), (reference_h, *reference_params) = grads
    # ∂L/∂h is a bf16 tensor: two float32 values a rounding apart may land one bf16 ulp
    # apart (2⁻⁷ relative at most), as seen with another BLAS kernel. The float32
    # parameters' gradients must agree to float32-level accuracy.
    assert fast_h.dtype == torch.bfloat16
    torch.testing.assert_close(fast_h.float(), reference_h.float(), rtol=2.0 ** -7, atol=1e-4)
    for fast, reference in zip(fast_params, reference_params):
        torch.testing.assert_close(fast.float(), reference.float(), rtol=1e-4, atol=1e-4)


def test_no_grad_forward_is_the_reference():
    u = _moved_structured(12)
    h = torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(u.apply(h), u.apply_reference(h))


def test_reorthonormalization_triggers_only_when_drift_exceeds_tolerance():
    a = adapter(12, "full", block_size=4, drift_tolerance=1e-6)
    blocks = a.unitary.blocks
    with torch.no_grad():
        blocks.copy_(random_rotation(3, 4, 0.5, torch.float64))
    rotation = blocks.detach().clone()
    a.after_optimizer_step()
    assert a.unitary.reorthonormalizations == 0 and torch.equal(blocks, rotation)
    with torch.no_grad():
        blocks.add_(torch.randn_like(blocks) * 1e-3)  # inject drift
    assert a.unitary.drift() > 1e-6
    a.after_optimizer_step()
    assert a.unitary.reorthonormalizations == 1
    assert a.unitary.drift() < 1e-12
    assert (blocks - rotation).abs().max() < 1e-2  # projected to a nearby orthogonal matrix, not reset


def test_bf16_blocks_are_not_reorthonormalized_below_their_rounding_floor():
    a = adapter(64, "full", block_size=32).to(torch.bfloat16)  # rounding alone leaves ~0.014 drift
    with torch.no_grad():
        a.unitary.blocks.copy_(random_rotation(2, 32, 0.5, torch.float64).to(torch.bfloat16))
    assert a.drift_tolerance < a.unitary.drift() < a.unitary.drift_floor
    a.after_optimizer_step()
    assert a.unitary.reorthonormalizations == 0
    with torch.no_grad():
        a.unitary.blocks.add_(0.05 * torch.randn_like(a.unitary.blocks))  # real drift, above the floor
    a.after_optimizer_step()
    assert a.unitary.reorthonormalizations == 1


def test_repair_drift_reads_all_layers_at_once_and_repairs_only_the_drifted():
    from hybridpeft.adapters.unitary import repair_drift

    layers = [adapter(12, "full", block_size=4, drift_tolerance=1e-6) for _ in range(3)]
    with torch.no_grad():
        for a in layers:
            a.unitary.blocks.copy_(random_rotation(3, 4, 0.5, torch.float64))
        layers[1].unitary.blocks.add_(1e-3 * torch.randn_like(layers[1].unitary.blocks))
    structured = adapter(12)  # no blocks: skipped
    repair_drift(layers + [structured])
    assert [a.unitary.reorthonormalizations for a in layers] == [0, 1, 0]
    assert layers[1].unitary.drift() < 1e-12


def test_float32_blocks_under_bf16_activations_compute_in_bf16():
    a = adapter(64, "full", block_size=32).float()
    with torch.no_grad():
        a.unitary.blocks.copy_(random_rotation(2, 32, 0.5, torch.float64).float())
    h = torch.randn(16, 64).bfloat16().requires_grad_()
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = a(h, lambda v: v)
    assert y.dtype == torch.bfloat16
    assert not any(t.dtype == torch.float32 and t.numel() >= h.numel() for t in kept)  # no float32 copy of h
    reference = torch.einsum("nkj,kij->nki", h.double().view(16, 2, 32), a.unitary.blocks.double()).reshape(16, 64)
    torch.testing.assert_close(y.double(), reference, rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert a.unitary.blocks.grad.dtype == torch.float32 and torch.isfinite(a.unitary.blocks.grad).all()


@pytest.mark.parametrize(
    "kwargs, field",
    [({"parameterization": "dense"}, "parameterization"), ({"block_size": 0}, "block_size"),
     ({"retraction": "qr"}, "retraction"), ({"drift_tolerance": 0.0}, "drift_tolerance"),
     ({"recompute": "yes"}, "recompute")],
)
def test_bad_config_names_field_and_value(kwargs, field):
    value = next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=rf"{field}={value!r}".replace("(", r"\(")):
        UnitaryConfig(**kwargs)


def test_unusable_widths_give_clear_errors():
    odd = nn.Sequential(nn.Linear(4, 7)).double()
    with pytest.raises(ValueError, match=r"cannot adapt '0'.*even d_out.*d_out=7"):
        hp.inject(odd, UnitaryConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match=r"block_size=5.*d_out=12.*\[1, 2, 3, 4, 6, 12\]"):
        hp.inject(nn.Sequential(nn.Linear(4, 12)), UnitaryConfig(target_modules=["0"], parameterization="full", block_size=5))


def test_only_full_blocks_are_manifold_parameters():
    assert adapter(8, "structured").manifold_parameters() == []
    full = adapter(8, "full")
    assert [p is full.unitary.blocks for p in full.manifold_parameters()] == [True]
