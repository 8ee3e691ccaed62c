"""Unitary (uRNN-style) adapter: ``W' x = U (W x)`` with ``U`` orthogonal and ``U = I`` at start.

A real output of even width ``d`` is read as ``z ∈ C^{d/2}`` (adjacent features are
real and imaginary parts), so a unitary map on ``C^{d/2}`` is an orthogonal map on
``R^d``. Two parameterizations:

* ``structured`` (Arjovsky et al. 2016): ``U = D3 R2 F⁻¹ D2 Π R1 F D1 · S⁻¹`` with
  ``O(d)`` parameters and ``O(d log d)`` work per token (see ``StructuredUnitary``).
* ``full`` (Wisdom et al. 2016): block-diagonal orthogonal blocks of size ``c``
  trained on the manifold by ``hybridpeft.optim.RiemannianSGD`` / ``RiemannianAdam``
  (see ``BlockOrthogonal``).

We multiply rather than replace (``W' = U W``): replacing a pretrained weight by a
unitary matrix, as the paper words it, would erase what the model knows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import distributed
from ..checks import check, is_int, is_number
from .config import AdapterConfig
from .base import Adapter, BaseMatmul
from .blockdiag import BlockDiagonalFunction, Keep

PARAMETERIZATIONS = ("structured", "full")
RETRACTIONS = ("cayley", "exp")


@dataclass
class UnitaryConfig(AdapterConfig):
    """Args:
        parameterization: ``"structured"`` (FFT/reflection/phase product, ``7 d / 2``
            parameters per layer) or ``"full"`` (block-diagonal orthogonal, ``d · c``).
        block_size: ``c``, the size of each orthogonal block (``full`` only); must
            divide every adapted layer's ``d_out``.
        retraction: how the Riemannian optimizer maps a step back onto the manifold
            (``full`` only): ``"cayley"`` (Wisdom et al.) or ``"exp"`` (the paper's
            matrix exponential, with the sign that descends).
        drift_tolerance: after an optimizer step, blocks with ``‖UᵀU − I‖_F`` above
            this are re-orthonormalized (``full`` only). Never below what the blocks'
            dtype can hold, ``eps · √c`` (bf16, c = 32: 0.044; rounding an orthogonal
            block to bf16 alone leaves ≈ 0.014), since a re-orthonormalized block rounds
            back to that drift. With a bf16 model prefer ``adapter_dtype="float32"``:
            the blocks then stay orthogonal to float32 precision, and the forward still
            runs in the activations' dtype.
        recompute: ``structured`` only: keep the branch input ``h = W x`` for backward and
            rerun the branch's forward there. The default already keeps a single
            ``N × d`` tensor (the output in ≥ float32, from which backward rebuilds the
            rest, see ``ReversibleStructuredFunction``), so this saves memory only under
            a bf16/fp16 model (``h`` in its 2-byte dtype), for one more branch forward.
        recompute_base: keep only the base input ``x`` for backward (both parameterizations):
            the base matmul and ``U`` run under one non-reentrant checkpoint, so backward
            recomputes ``h = W x`` (one more base matmul per module) and ``U h`` (for
            ``structured`` this implies ``recompute``; for ``full`` one more block matmul).
            Memory: the branch keeps no ``N × d_out`` tensor, only ``x`` — a saving where
            ``x`` is kept anyway (modules sharing an input, e.g. q/k/v) or ``d_in < d_out``.
            Same values and gradients. For ``structured`` in float32 the default keeps
            less (its one saved tensor is the output, which the next layer usually keeps
            too; measured on SmolLM2's shape: 0.93× LoRA's saved activations, against
            0.99× with this option and 1.20× with ``recompute``).
    """

    method = "unitary"
    parameterization: str = "structured"
    block_size: int = 32
    retraction: str = "cayley"
    drift_tolerance: float = 1e-5
    recompute: bool = False
    recompute_base: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.parameterization in PARAMETERIZATIONS, "parameterization", self.parameterization,
              " or ".join(repr(p) for p in PARAMETERIZATIONS))
        check(is_int(self.block_size) and self.block_size > 0,
              "block_size", self.block_size, "a positive integer")
        check(self.retraction in RETRACTIONS, "retraction", self.retraction, " or ".join(repr(r) for r in RETRACTIONS))
        check(is_number(self.drift_tolerance) and self.drift_tolerance > 0,
              "drift_tolerance", self.drift_tolerance, "a positive number")
        check(isinstance(self.recompute, bool), "recompute", self.recompute, "True or False")
        check(isinstance(self.recompute_base, bool), "recompute_base", self.recompute_base, "True or False")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # torch.fft and linalg have no bf16/fp16 CPU kernels and lose too many bits there anyway.
    return torch.promote_types(dtype, torch.float32)


def _fourier_compatible_stride(n: int) -> int:
    """A multiplier ``a`` coprime to ``n`` near ``n / golden ratio`` (1 when ``n ≤ 2``).

    ``Π: k ↦ a k mod n`` scatters neighbouring frequencies far apart, and because
    ``F⁻¹ Π F`` is then the spatial permutation ``m ↦ a⁻¹ m``, cancelling the start
    point costs one gather instead of two extra FFTs.
    """
    if n <= 2:
        return 1
    target = round(n / ((1 + math.sqrt(5)) / 2))
    for offset in range(n):
        for a in (target - offset, target + offset):
            if 1 < a < n and math.gcd(a, n) == 1:
                return a
    return 1


class StructuredUnitary(nn.Module):
    """``U = D3 R2 F⁻¹ D2 Π R1 F D1 S⁻¹`` acting on ``z ∈ C^n``, ``n = d / 2``.

    * ``D_j = diag(e^{iθ_j})``: phases, ``θ_j ∈ R^n``, zero at start.
    * ``R_j = H(v_j) H(v_j⁰)``, ``H(v) = I − 2 v vᴴ / ‖v‖²`` a complex Householder
      reflection; ``v_j⁰`` is a frozen copy of the random start ``v_j``, so ``R_j = I``
      at start while the gradient with respect to ``v_j`` is already non-zero there.
    * ``F`` the unitary DFT (``norm="ortho"``), ``Π: ẑ_k ↦ ẑ_{a k mod n}``.
    * ``S = F⁻¹ Π F`` (the start point with every ``D``, ``R`` the identity) is the
      permutation ``z_m ↦ z_{a⁻¹ m}``, so ``S⁻¹`` is the gather ``z_m ↦ z_{a m}`` and
      ``U = I`` at start.

    Every factor is unitary for any parameter values, so ``U`` is unitary to
    floating-point rounding throughout training. Parameters: ``3 n + 4 n = 7 d / 2``.

    Raises:
        ValueError: ``d`` is odd.
    """

    def __init__(self, d: int) -> None:
        super().__init__()
        if d % 2:
            raise ValueError(f"parameterization='structured' pairs features into complex numbers and "
                             f"needs an even d_out; got d_out={d} (use parameterization='full')")
        n = d // 2
        self.d, self.n = d, n
        self.theta = nn.Parameter(torch.zeros(3, n))  # phases of D1, D2, D3
        start = torch.randn(2, n, 2)  # v_1, v_2 as (real, imag) pairs
        self.reflect = nn.Parameter(start.clone())
        self.register_buffer("reflect_start", start)  # saved: the start is random
        a = _fourier_compatible_stride(n)
        index = (a * torch.arange(n)) % n  # z_m ↦ z_{a m}: both Π and S⁻¹
        self.register_buffer("perm", index, persistent=False)
        self.register_buffer("perm_inv", torch.argsort(index), persistent=False)

    def _factors(self, dtype: torch.dtype, theta: Tensor | None = None,
                 reflect: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(phases (3, n), v (2, n), v⁰ (2, n)) in complex ``dtype``; from ``theta``/``reflect`` when given."""
        theta = self.theta if theta is None else theta
        reflect = self.reflect if reflect is None else reflect
        phases = torch.polar(torch.ones_like(theta, dtype=dtype), theta.to(dtype))  # (3, n)
        v = torch.view_as_complex(reflect.to(dtype))  # (2, n)
        v0 = torch.view_as_complex(self.reflect_start.to(dtype))  # (2, n)
        return phases, v, v0

    @staticmethod
    def _householder(z: Tensor, v: Tensor) -> Tensor:
        """``H(v) z = z − 2 v (vᴴ z) / ‖v‖²``; z: (..., n), v: (n,)."""
        norm2 = torch.view_as_real(v).square().sum().clamp_min(1e-30)
        coeff = (z * v.conj()).sum(-1, keepdim=True) * (2 / norm2)  # (..., 1)
        return z - coeff * v

    def apply(self, h: Tensor) -> Tensor:
        """``U h`` for real h: (..., d) -> (..., d), in ``h``'s dtype (computed in ≥ float32).

        With autograd on, runs as ``ReversibleStructuredFunction``: backward keeps only the
        output and walks the factors back from it (see there), instead of autograd keeping
        about five complex ``N × n`` intermediates.
        """
        if torch.is_grad_enabled() and (h.requires_grad or self.theta.requires_grad or self.reflect.requires_grad):
            return ReversibleStructuredFunction.apply(h, self.theta, self.reflect, self)
        return self.apply_reference(h)

    def apply_reference(self, h: Tensor, theta: Tensor | None = None, reflect: Tensor | None = None) -> Tensor:
        """``U h`` by plain autograd ops: the definition the reversible backward is tested against."""
        dtype = _compute_dtype(h.dtype)
        phases, v, v0 = self._factors(dtype, theta, reflect)
        z = _as_complex(h.to(dtype))  # (..., n)
        z = z[..., self.perm] * phases[0]  # D1 S⁻¹
        z = torch.fft.fft(z, norm="ortho")
        z = self._householder(self._householder(z, v0[0]), v[0])  # R1
        z = z[..., self.perm] * phases[1]  # D2 Π
        z = torch.fft.ifft(z, norm="ortho")
        z = self._householder(self._householder(z, v0[1]), v[1])  # R2
        z = z * phases[2]  # D3
        return _as_real(z).to(h.dtype)

    def apply_transposed(self, h: Tensor) -> Tensor:
        """``Uᵀ h = U⁻¹ h``: every factor inverted, in reverse order."""
        dtype = _compute_dtype(h.dtype)
        phases, v, v0 = self._factors(dtype)
        z = _as_complex(h.to(dtype)) * phases[2].conj()
        z = self._householder(self._householder(z, v[1]), v0[1])  # R2ᴴ = H(v⁰) H(v)
        z = torch.fft.fft(z, norm="ortho")
        z = (z * phases[1].conj())[..., self.perm_inv]
        z = self._householder(self._householder(z, v[0]), v0[0])
        z = torch.fft.ifft(z, norm="ortho")
        z = (z * phases[0].conj())[..., self.perm_inv]
        return _as_real(z).to(h.dtype)

    def num_parameters(self) -> int:
        return 7 * self.n


class ReversibleStructuredFunction(torch.autograd.Function):
    """``y = U h`` for ``StructuredUnitary`` with a backward that stores only ``y``.

    Every factor of ``U`` is unitary with a cheap exact inverse, so backward can
    rebuild each factor's input from its output while it carries the gradient
    through the same factor: going from the last factor to the first it holds the
    stacked pair ``(z, g)`` (the factor's output and the loss gradient there, in
    ``C^n`` with ``g = ∂L/∂Re z + i ∂L/∂Im z``) and maps both by the factor's
    inverse, which for a unitary factor is also its adjoint. Along the way:

    * phase ``z' = z e^{iθ}``: ``∂L/∂θ = Σ Im(g' · conj(z'))``;
    * Householder ``z' = H(v) z`` (``s = ‖v‖²``, ``c = vᴴ z'``, ``b = vᴴ g'``):
      ``∂L/∂v = (2/s) Σ [conj(c) g' − conj(b) z' + (2i/s) Im(conj(b) c) v]``
      (a complex gradient; its real and imaginary parts are those of ``reflect``);
    * DFTs and gathers have no parameters: ``F`` ↔ ``F⁻¹`` and ``perm`` ↔ ``perm_inv``.

    Sums run over all tokens. Memory: one ``N × d`` tensor, the output in the compute
    dtype (≥ float32; for a float32 model the returned tensor itself, which the next
    layer often keeps anyway), instead of ~5 complex intermediates. Rebuilding adds
    rounding of the compute dtype only (the factors are unitary and do not amplify
    it), so gradients match plain autograd to float32 precision under a bf16 model
    too. ``torch.autograd.gradcheck`` passes in float64 (tests).
    """

    @staticmethod
    def forward(ctx, h: Tensor, theta: Tensor, reflect: Tensor, unitary: "StructuredUnitary") -> Tensor:
        dtype = _compute_dtype(h.dtype)
        phases, v, v0 = unitary._factors(dtype, theta, reflect)
        z = _as_complex(h.to(dtype))[..., unitary.perm].mul_(phases[0])  # (..., n): D1 S⁻¹ (the gather's fresh copy, scaled in place)
        z = torch.fft.fft(z, norm="ortho")
        z = _reflect_twice(z, v0[0], v[0])  # R1 = H(v_1) H(v_1⁰)
        z = z[..., unitary.perm].mul_(phases[1])  # D2 Π
        z = torch.fft.ifft(z, norm="ortho")
        z = _reflect_twice(z, v0[1], v[1])  # R2
        y = _as_real(z.mul_(phases[2]))  # (..., d): D3, in the compute dtype
        ctx.unitary = unitary
        ctx.save_for_backward(y, theta, reflect)  # the returned tensor itself unless h is bf16/fp16
        return y.to(h.dtype)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        y, theta, reflect = ctx.saved_tensors
        u: StructuredUnitary = ctx.unitary
        dtype = _compute_dtype(y.dtype)
        phases, v, v0 = u._factors(dtype, theta, reflect)  # (3, n), (2, n), (2, n)
        pair = torch.stack((_as_complex(y.to(dtype)), _as_complex(grad_y.to(dtype))))  # (2, ..., n): (z, g)
        pair = pair.reshape(2, -1, u.n)  # (2, M, n)
        grad_theta = torch.empty(3, u.n, dtype=dtype, device=y.device)
        grad_v = torch.empty(2, u.n, dtype=pair.dtype, device=y.device)

        grad_theta[2], pair = _phase_backward(pair, phases[2])  # D3
        grad_v[1], pair = _reflection_backward(pair, v[1], v0[1])  # R2 = H(v_2) H(v_2⁰)
        pair = torch.fft.fft(pair, norm="ortho")  # F⁻¹'s inverse and adjoint
        grad_theta[1], pair = _phase_backward(pair, phases[1])  # D2
        pair = pair[..., u.perm_inv]  # Π
        grad_v[0], pair = _reflection_backward(pair, v[0], v0[0])  # R1
        pair = torch.fft.ifft(pair, norm="ortho")  # F
        grad_theta[0], pair = _phase_backward(pair, phases[0])  # D1
        grad_h = _as_real(pair[1][..., u.perm_inv]).reshape(grad_y.shape)  # S⁻¹
        return (grad_h.to(grad_y.dtype) if ctx.needs_input_grad[0] else None,
                grad_theta.to(theta.dtype) if ctx.needs_input_grad[1] else None,
                torch.view_as_real(grad_v).to(reflect.dtype) if ctx.needs_input_grad[2] else None,
                None)


def _reflect_twice(z: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """``H(second) H(first) z`` as one rank-2 update (two small matmuls); z: (..., n), first/second: (n,)."""
    return _reflect_twice_from(z, *_reflection_coeffs(z, first, second))


def _reflection_coeffs(z: Tensor, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(basis ``[first, second]`` (2, n), ``[firstᴴ z, secondᴴ z]`` (..., 2), ``2 / ‖·‖²`` of both (2,))."""
    basis = torch.stack((first, second))  # (2, n)
    return basis, z @ basis.conj().t(), 2 / torch.view_as_real(basis).square().sum((-1, -2)).clamp_min(1e-30)


def _reflect_twice_from(z: Tensor, basis: Tensor, coeff: Tensor, scale: Tensor) -> Tensor:
    first, second = basis
    c_first = coeff[..., 0] * scale[0]
    c_second = (coeff[..., 1] - c_first * (first.conj() @ second).conj()) * scale[1]  # secondᴴ H(first) z, scaled
    coeffs = torch.stack((c_first, c_second), dim=-1)  # (..., 2)
    if z.dim() == 2:  # the subtraction fused into the GEMM: one pass over z less
        return torch.addmm(z, coeffs, basis, alpha=-1)
    if z.dim() == 3:
        return torch.baddbmm(z, coeffs, basis.expand(z.shape[0], 2, -1), alpha=-1)
    return z - coeffs @ basis


def _reflection_backward(pair: Tensor, v: Tensor, v0: Tensor) -> tuple[Tensor, Tensor]:
    """(∂L/∂v as a complex (n,) vector, the pair one factor earlier) for ``z' = H(v) H(v⁰) z``.

    pair: ``(z', g')`` (2, M, n); ``vᴴ z'`` and ``vᴴ g'`` serve both the gradient and the
    inverse ``H(v⁰) H(v)``, so they are computed once.
    """
    basis, coeff, scale = _reflection_coeffs(pair, v, v0)  # (2, n), (2, M, 2), (2,)
    c_out, b = coeff[0, :, 0], coeff[1, :, 0]  # (M,) each: vᴴ z', vᴴ g'
    cross = (b.conj() * c_out).sum()
    grad = scale[0] * (c_out.conj() @ pair[1] - b.conj() @ pair[0] + (1j * scale[0]) * cross.imag * v)
    return grad, _reflect_twice_from(pair, basis, coeff, scale)


def _phase_backward(pair: Tensor, phase: Tensor) -> tuple[Tensor, Tensor]:
    """(∂L/∂θ, the pair one factor earlier) for ``z' = z · phase``; pair: (2, M, n)."""
    z_out, g_out = pair[0], pair[1]
    grad = torch.linalg.vecdot(z_out, g_out, dim=0).imag  # Σ_tokens Im(conj(z') g'), (n,), no M × n product kept
    return grad, pair.mul_(phase.conj())  # every caller passes a fresh pair (stack, FFT, gather output)


class BlockOrthogonal(nn.Module):
    """``U = blockdiag(U_1 … U_k)``, ``k = d / c``, each ``U_j`` a ``c × c`` orthogonal matrix.

    The blocks are free tensors kept on the orthogonal group by a Riemannian
    optimizer (they are the adapter's ``manifold_parameters``); ``reorthonormalize``
    removes the rounding drift that accumulates over many retractions. Applied as
    one batched ``c × c`` matmul over the ``k`` blocks: ``O(d c)`` per token.
    Parameters: ``k c² = d c``.

    Raises:
        ValueError: ``c`` does not divide ``d`` (the message lists sizes that do).
    """

    def __init__(self, d: int, block_size: int) -> None:
        super().__init__()
        divisors = [c for c in range(1, min(d, 1024) + 1) if d % c == 0]
        check(d % block_size == 0, "block_size", block_size, f"a divisor of d_out={d}, e.g. one of {divisors}")
        self.d, self.c, self.k = d, block_size, d // block_size
        self.blocks = nn.Parameter(torch.eye(block_size).repeat(self.k, 1, 1))  # (k, c, c)
        self.reorthonormalizations = 0  # how often drift exceeded the tolerance; for monitoring

    def apply(self, h: Tensor) -> Tensor:
        """``U h`` for h: (..., d), returned in ``h``'s dtype (see ``_operands`` for the compute dtype).

        With autograd on, backward keeps only the output and rebuilds ``h = U⁻¹ y`` there
        (``blockdiag.BlockDiagonalFunction``; ``U⁻¹`` solved per block rather than taken as
        ``Uᵀ``, because the blocks are orthogonal only up to the drift the optimizer allows).
        """
        hb, u = self._operands(h)
        if torch.is_grad_enabled() and (hb.requires_grad or u.requires_grad):
            y = BlockDiagonalFunction.apply(hb.reshape(-1, self.d), u, None, None, None, Keep("output", inverse="solve"))
            return y.view(h.shape).to(h.dtype)
        y = torch.einsum("...kj,kij->...ki", hb, u)  # (..., k, c)
        return y.reshape(h.shape).to(h.dtype)

    def apply_transposed(self, h: Tensor) -> Tensor:
        hb, u = self._operands(h)
        y = torch.einsum("...ki,kij->...kj", hb, u)  # (..., k, c)
        return y.reshape(h.shape).to(h.dtype)

    def _operands(self, h: Tensor) -> tuple[Tensor, Tensor]:
        # Half-precision activations stay as they are and the (small) blocks are cast down,
        # as BOFT does: upcasting would copy and save every N × d activation in float32.
        half = h.dtype in (torch.bfloat16, torch.float16)
        dtype = h.dtype if half else torch.promote_types(h.dtype, self.blocks.dtype)
        return h.reshape(*h.shape[:-1], self.k, self.c).to(dtype), self.blocks.to(dtype)  # (..., k, c), (k, c, c)

    def num_parameters(self) -> int:
        return self.d * self.c

    @property
    def drift_floor(self) -> float:
        """The drift rounding to the blocks' dtype alone can cause (``eps · √c``)."""
        return torch.finfo(self.blocks.dtype).eps * math.sqrt(self.c)

    @torch.no_grad()
    def drift(self) -> Tensor:
        """``max_j ‖U_jᵀ U_j − I‖_F`` (a 0-dim tensor) over the blocks this rank holds
        (all of them unless sharded; 0 for none)."""
        u = distributed.local(self.blocks).to(_compute_dtype(self.blocks.dtype))  # (k_local, c, c)
        gram = u.transpose(-1, -2) @ u  # (k_local, c, c)
        eye = torch.eye(self.c, dtype=u.dtype, device=u.device)
        return (gram - eye).flatten(1).norm(dim=1).max() if u.shape[0] else u.new_zeros(())

    @torch.no_grad()
    def reorthonormalize(self) -> None:
        """Replace every block (this rank's, if sharded) by its nearest orthogonal matrix
        (polar factor ``P Qᵀ`` of ``U = P Σ Qᵀ``)."""
        blocks = distributed.local(self.blocks)  # (k_local, c, c); FSDP never splits a block
        u = blocks.to(_compute_dtype(blocks.dtype))
        p, _, qh = torch.linalg.svd(u)  # (k_local, c, c) each
        blocks.copy_((p @ qh).to(blocks.dtype))
        self.reorthonormalizations += 1


class UnitaryAdapter(Adapter):
    """``W' x = U (W x)``; ``U`` orthogonal on ``R^{d_out}`` and the identity at start.

    ``merged_weight(W) = U W`` applies ``U`` to the columns of ``W`` (no ``d × d``
    matrix is formed); ``unmerged_weight`` applies ``Uᵀ = U⁻¹``.
    """

    method = "unitary"

    def __init__(self, d_in: int, d_out: int, config: UnitaryConfig) -> None:
        super().__init__(d_in, d_out)
        self.parameterization = config.parameterization
        self.retraction = config.retraction  # read by hybridpeft.optim.build_optimizer
        self.drift_tolerance = config.drift_tolerance
        self.recompute = config.recompute
        self.recompute_base = config.recompute_base
        if config.parameterization == "structured":
            self.unitary: StructuredUnitary | BlockOrthogonal = StructuredUnitary(d_out)
        else:
            self.unitary = BlockOrthogonal(d_out, config.block_size)

    def forward(self, x: Tensor, base: BaseMatmul) -> Tensor:
        if self.recompute_base and torch.is_grad_enabled():
            # Saves only x; backward re-runs base(x) and U (base hooks see that second call).
            return checkpoint(self._rotated_base, x, base, use_reentrant=False)  # (..., d_out)
        h = base(x)  # (..., d_out)
        if self.recompute and torch.is_grad_enabled() and isinstance(self.unitary, StructuredUnitary):
            return checkpoint(self.unitary.apply_reference, h, use_reentrant=False)  # exact even in bf16
        return self.unitary.apply(h)

    def _rotated_base(self, x: Tensor, base: BaseMatmul) -> Tensor:
        return self.unitary.apply(base(x))  # (..., d_out)

    def dense_unitary(self) -> Tensor:
        """``U`` as a real ``d_out × d_out`` matrix — for tests and inspection only."""
        eye = torch.eye(self.d_out, dtype=_param_dtype(self), device=_param_device(self))
        return self.unitary.apply(eye).t()  # row j of apply(I) is U e_j

    def merged_weight(self, weight: Tensor) -> Tensor:
        return self.unitary.apply(weight.t()).t()  # (d_out, d_in)

    def unmerged_weight(self, merged: Tensor) -> Tensor:
        return self.unitary.apply_transposed(merged.t()).t()

    def num_parameters(self) -> int:
        return self.unitary.num_parameters()

    def manifold_parameters(self) -> list[nn.Parameter]:
        return [self.unitary.blocks] if isinstance(self.unitary, BlockOrthogonal) else []

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        repair_drift([self])

    @classmethod
    @torch.no_grad()
    def after_optimizer_step_all(cls, adapters: Sequence["UnitaryAdapter"]) -> None:
        """Repair every layer's drift with one host read of all drifts."""
        repair_drift(adapters)


@torch.no_grad()
def repair_drift(adapters: Sequence[UnitaryAdapter]) -> None:
    """Re-orthonormalize the full-capacity blocks whose drift exceeds their tolerance.

    All drifts are read in one host transfer (one device sync per step, not one per layer).
    The tolerance is ``max(drift_tolerance, eps(dtype) · √c)``: below the rounding floor of
    the blocks' dtype a re-orthonormalization cannot help. Sharded blocks: the drifts are
    maxed over ranks in one all-reduce, so every rank repairs its blocks of the same layers.
    """
    blocks = [a for a in adapters if isinstance(a.unitary, BlockOrthogonal)]
    if not blocks:
        return
    device = blocks[0].unitary.blocks.device
    drifts = torch.stack([a.unitary.drift().float().to(device) for a in blocks])  # (L,)
    if distributed.any_sharded(a.unitary.blocks for a in blocks):  # each rank saw its own blocks: agree on the max
        distributed.all_reduce_max(drifts)
    drifts = drifts.tolist()  # one host transfer
    for adapter, drift in zip(blocks, drifts):
        if drift > max(adapter.drift_tolerance, adapter.unitary.drift_floor):
            adapter.unitary.reorthonormalize()


def _as_complex(h: Tensor) -> Tensor:
    """(..., 2n) real -> (..., n) complex, features (2m, 2m+1) as (real, imag)."""
    pairs = h.reshape(*h.shape[:-1], h.shape[-1] // 2, 2).contiguous()  # (..., n, 2)
    if pairs.storage_offset() % 2:  # view_as_complex needs complex-aligned storage
        pairs = pairs.clone()
    return torch.view_as_complex(pairs)


def _as_real(z: Tensor) -> Tensor:
    return torch.view_as_real(z).flatten(-2)  # (..., 2n)


def _param_dtype(module: nn.Module) -> torch.dtype:
    return _compute_dtype(next(module.parameters()).dtype)


def _param_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
