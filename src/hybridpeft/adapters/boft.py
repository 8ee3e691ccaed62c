"""BOFT: butterfly orthogonal fine-tuning (Liu et al., ICLR 2024), applied on activations.

An orthogonal ``R`` (``d × d``) multiplies the frozen map on one side:

- ``side="output"``: ``y = R (W x) + b``, ``d = d_out`` (``ΔW = (R − I) W``);
- ``side="input"``:  ``y = W (R x) + b``, ``d = d_in``  (``ΔW = W (R − I)``).

``R = B_m ⋯ B_1`` is a product of ``m`` butterfly factors. With ``b`` the block
size and ``k = d / b`` the number of blocks, factor ``i`` is

    B_i = P_iᵀ · blockdiag(R_i1, …, R_ik) · P_i,

``P_i`` the butterfly permutation of level ``i`` (``P_1 = I``) and every block the
exact Cayley transform ``R_ij = (I + Q_ij)(I − Q_ij)⁻¹`` of a skew-symmetric
``Q_ij`` (stored as its ``b(b−1)/2`` strict upper triangle, zero at start, so
``R = I``). A Cayley block is orthogonal for every ``Q`` (the eigenvalues of
``Q`` are imaginary, so ``I − Q`` is always invertible), hence so is ``R``.

Level ``i ≥ 2`` pairs block ``j`` with block ``j + s``, ``s = 2^(i−2)``, inside
groups of ``2s`` consecutive blocks, and swaps the last ``⌊b/2⌋`` coordinates of
block ``j`` with the first ``⌊b/2⌋`` of block ``j + s`` (so ``P_i = P_iᵀ``): each
permuted block then holds coordinates of both partners. By induction, after ``i``
factors every output depends on a whole group of ``2^(i−1)`` blocks, so with
``m = 1 + log2(k)`` the product is dense. Realisable when ``2^(m−1)`` divides ``k``.

Every permutation stays inside groups of ``2^(i−1)`` consecutive blocks, so ``R`` is
block-diagonal with blocks of ``c = b · 2^(m−1)`` consecutive features (no outer
permutation), dense inside each block. Two ways to apply it, both without a
``d × d`` matrix (``butterfly_form`` picks one per ``(b, m)``):

- ``"composed"``: compose the ``d / c`` blocks of size ``c × c`` once per call
  (``ComposedButterflyFunction``, the factors applied to a tiled ``c × d`` identity)
  and apply them as one batched matmul — ``O(N · d · c)``, one pass over the
  activations. On the output side the backward keeps only the output and forms the
  blocks' gradient from it, ``Σ g hᵀ = (Σ g yᵀ) R`` (``blockdiag.BlockDiagonalFunction``,
  ``R⁻ᵀ = R``), so no ``N × d`` tensor of its own outlives the forward. In a model forward
  the blocks of every composed layer come from one batched Cayley transform and
  composition (``prepare_all``, ``hybridpeft.adapters.prepared``).
- ``"factored"``: per factor, one gather along ``d`` and one batched ``b × b``
  matmul over the ``k`` blocks — ``O(N · d · b · m)`` but ``m`` passes and ``m + 1``
  gathers. ``ButterflyFunction`` keeps only the branch input and the blocks and
  recomputes the ``m`` stage inputs in backward, instead of autograd holding
  ``m × N × d`` activations per module (docs/perf/README.md).

On the output side ``recompute_base`` keeps the base input ``x`` instead (of ``h``
or the output) and recomputes ``h = W x`` in backward (one more base matmul).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..checks import check, is_int
from .config import AdapterConfig
from .base import Adapter, BaseMatmul
from .blockdiag import BlockDiagonalFunction, Keep
from .prepared import offer, preparable, take

SIDES = ("output", "input")


@dataclass
class BoftConfig(AdapterConfig):
    """Args:
        block_size: ``b``, the size of each orthogonal block; at least 2 (a
            1 × 1 orthogonal block has no free parameter).
        n_factors: ``m``, the number of butterfly factors (the paper uses 3);
            ``1 + log2(d / b)`` makes ``R`` dense.
        side: ``"output"`` (``y = R W x``, the paper's Hybrid) or ``"input"``
            (``y = W R x``).
        recompute_base: output side only. ``False`` (default): backward keeps
            ``h = W x`` (N × d_out per module) as the butterfly's input. ``True``:
            it keeps the base input ``x`` instead and recomputes ``h = W x`` in
            backward — one more base matmul per module per step (the frozen
            layer's two matmuls, forward and input gradient, become three), for
            ``N × d_out`` less memory per module *when ``x`` is kept anyway*: by a LoRA branch
            beside it (the Hybrid with ``lora_dropout=0``) or by a sibling module
            reading the same ``x`` (q/k/v, gate/up). Alone on a module whose ``x``
            nothing else keeps, it trades ``N × d_out`` for ``N × d_in``.
            Gradients are unchanged (the recomputed ``h`` is the forward's, bit for
            bit, for a deterministic base matmul).
    """

    method = "boft"
    block_size: int = 8
    n_factors: int = 3
    side: str = "output"
    recompute_base: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check(is_int(self.block_size) and self.block_size >= 2, "block_size", self.block_size, "an integer >= 2")
        check(is_int(self.n_factors) and self.n_factors >= 1, "n_factors", self.n_factors, "a positive integer")
        check(self.side in SIDES, "side", self.side, f"one of {list(SIDES)}")
        check(isinstance(self.recompute_base, bool), "recompute_base", self.recompute_base, "True or False")
        check(not (self.recompute_base and self.side == "input"), "recompute_base", self.recompute_base,
              "False with side='input' (the input side rotates x before the base matmul: its branch "
              "input is x itself, there is no h = W x to drop)")


# ---------------------------------------------------------------------------
# Butterfly structure


def fits(d: int, block_size: int, n_factors: int) -> bool:
    """Whether ``d`` splits into ``k = d / b`` blocks pairable over ``m`` butterfly factors."""
    k, rest = divmod(d, block_size)
    return rest == 0 and k % (2 ** (n_factors - 1)) == 0


def fitting_block_sizes(d: int, n_factors: int) -> list[int]:
    """Block sizes ``b ≥ 2`` that work for dimension ``d`` with ``n_factors`` factors."""
    return [b for b in range(2, d + 1) if fits(d, b, n_factors)]


def fitting_factor_counts(d: int, block_size: int) -> list[int]:
    """Factor counts that work for dimension ``d`` with ``block_size``: ``1 … 1 + v2(d / b)``."""
    if block_size < 1 or d % block_size:
        return []
    k, counts = d // block_size, [1]
    while k % 2 == 0:
        k //= 2
        counts.append(counts[-1] + 1)
    return counts


def _check_fits(d: int, block_size: int, n_factors: int, side: str) -> None:
    if fits(d, block_size, n_factors):
        return
    if d % block_size:
        reason = f"d is not divisible by block_size={block_size}"
    else:
        need = 2 ** (n_factors - 1)
        reason = f"k = d / b = {d // block_size} blocks is not divisible by 2^(n_factors-1) = {need}"
    sizes = fitting_block_sizes(d, n_factors) or "none"
    counts = fitting_factor_counts(d, block_size) or "none"
    raise ValueError(
        f"block_size={block_size}, n_factors={n_factors} do not fit the {side}-side dimension d={d} ({reason}); "
        f"block sizes that work with n_factors={n_factors}: {sizes}; "
        f"n_factors that work with block_size={block_size}: {counts}"
    )


FORMS = ("composed", "factored")
COMPOSED_MAX = 64  # largest composed block applied as one batched matmul; see butterfly_form


def composed_size(block_size: int, n_factors: int) -> int:
    """``c = b · 2^(m−1)``: the size of the diagonal blocks of ``R = B_m ⋯ B_1``."""
    return block_size * 2 ** (n_factors - 1)


def butterfly_form(block_size: int, n_factors: int) -> str:
    """``"composed"`` when ``R``'s blocks are at most ``COMPOSED_MAX`` wide, else ``"factored"``.

    Composed costs ``c = b · 2^(m−1)`` multiply-adds per feature and token in one pass,
    factored ``b · m`` in ``m`` passes plus ``m + 1`` gathers; the rule is fixed by shape
    (so a run and its resumption compute alike) and set by ``benchmarks/butterfly_forms.py``
    (numbers in ``docs/perf/README.md``).
    """
    return "composed" if n_factors == 1 or composed_size(block_size, n_factors) <= COMPOSED_MAX else "factored"


def butterfly_permutation(level: int, n_blocks: int, block_size: int) -> Tensor:
    """The gather index ``π`` of ``P_level``: ``(P h)[p] = h[π[p]]``, shape ``(d,)``.

    Level 1 is the identity. Level ``i ≥ 2`` (stride ``s = 2^(i−2)`` blocks)
    fills slot ``j`` (first half of its group of ``2s``) with the first ``⌈b/2⌉``
    coordinates of block ``j`` then the first ``⌊b/2⌋`` of block ``j + s``, and
    slot ``j + s`` with the rest of both: a swap of ``⌊b/2⌋`` coordinate pairs,
    hence an involution.

    Raises:
        ValueError: ``n_blocks`` is not divisible by ``2^(level−1)``.
    """
    d = n_blocks * block_size
    if level == 1:
        return torch.arange(d)
    stride = 2 ** (level - 2)
    check(n_blocks % (2 * stride) == 0, "n_blocks", n_blocks, f"divisible by 2^(level-1) = {2 * stride} for level {level}")
    head = (block_size + 1) // 2
    tail = block_size - head
    p = torch.arange(d)
    slot, offset = p // block_size, p % block_size
    in_group = slot % (2 * stride)
    lower = in_group < stride
    first = torch.where(lower, slot, slot - stride) * block_size  # start of partner j
    second = first + stride * block_size  # start of partner j + s
    from_lower = torch.where(offset < head, first + offset, second + offset - head)
    from_upper = torch.where(offset < tail, first + head + offset, second + offset)
    return torch.where(lower, from_lower, from_upper)


def _inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


def _gather_plan(perms: list[Tensor]) -> Tensor:
    """Composed gather indices for applying ``P_1ᵀ D_1 P_1`` then ``P_2ᵀ D_2 P_2`` …

    Each ``P_iᵀ`` is fused with the next ``P_{i+1}`` into one index, so the
    plan holds ``m + 1`` gathers: ``π_1``, ``π_1⁻¹[π_2]``, …, ``π_m⁻¹``.
    Returns ``(2, m + 1, d)``: the gathers and their inverses (used in backward).
    """
    gathers = [perms[0]]
    for prev, nxt in zip(perms[:-1], perms[1:]):
        gathers.append(_inverse(prev)[nxt])
    gathers.append(_inverse(perms[-1]))
    forward = torch.stack(gathers)  # (m + 1, d)
    return torch.stack([forward, torch.stack([_inverse(g) for g in gathers])])


# ---------------------------------------------------------------------------
# Applying the factors to activations. Between stages the activations live in
# column layout (d, N): every gather copies whole rows and every stage is one
# (k, b, b) @ (k, b, N) bmm. The first stage reads h (N, d) through a strided
# (k, b, N) view instead of transposing it, so with P_1 = I nothing is copied.


def _blocked(z: Tensor, k: int, b: int) -> Tensor:
    """(N, d) row layout -> (k, b, N) view, no copy."""
    return z.view(z.shape[0], k, b).permute(1, 2, 0)


def _stage_inputs(h: Tensor, blocks: Tensor, gathers: Tensor, lead_identity: bool) -> list[Tensor]:
    """The input ``u_i`` (k, b, N) of every stage; the last stage itself is not run."""
    m, k, b, _ = blocks.shape
    n = h.shape[0]
    inputs = [_blocked(h if lead_identity else h.index_select(1, gathers[0]), k, b)]
    for i in range(1, m):
        z = torch.bmm(blocks[i - 1], inputs[-1]).view(k * b, n)  # (d, N)
        inputs.append(z.index_select(0, gathers[i]).view(k, b, n))  # (k, b, N)
    return inputs


def _butterfly(h: Tensor, blocks: Tensor, gathers: Tensor, lead_identity: bool) -> Tensor:
    """h (N, d) -> (N, d): the stages then the last gather, fused with the transpose back."""
    k, b = blocks.shape[1], blocks.shape[2]
    u = _stage_inputs(h, blocks, gathers, lead_identity)[-1]
    z = torch.bmm(blocks[-1], u).view(k * b, h.shape[0])  # (d, N)
    return z.t().index_select(1, gathers[-1])  # (N, d)


def butterfly_reference(h: Tensor, blocks: Tensor, gathers: Tensor, lead_identity: bool = False) -> Tensor:
    """Plain-autograd butterfly product (autograd keeps every stage); the reference for tests.

    Args:
        h: (N, d) activations.
        blocks: (m, k, b, b); stage ``i`` multiplies block ``j`` by ``blocks[i, j]``.
        gathers: (m + 1, d) composed indices from ``_gather_plan``.
        lead_identity: ``gathers[0]`` is the identity and may be skipped.
    """
    return _butterfly(h, blocks, gathers, lead_identity)


def _butterfly_backward(h: Tensor, blocks: Tensor, plan: Tensor, lead_identity: bool, grad_out: Tensor,
                        need_h: bool, need_blocks: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``_butterfly(h, blocks, plan[0])`` for ``grad_out`` (N, d), stages recomputed from ``h``.

    For ``i = m … 1``: ``∂L/∂blocks_i = g_i u_iᵀ`` and ``g_{i−1} = blocks_iᵀ g_i`` (per
    block), each gather undone by its inverse index. Returns ``(∂L/∂h, ∂L/∂blocks)``,
    ``None`` where not needed.
    """
    gathers, scatters = plan[0], plan[1]
    m, k, b, _ = blocks.shape
    n, d = h.shape
    inputs = _stage_inputs(h, blocks, gathers, lead_identity)  # m × (k, b, N)
    g = _blocked(grad_out.to(h.dtype).index_select(1, scatters[-1]), k, b)  # (k, b, N), strided
    grad_blocks = torch.empty_like(blocks) if need_blocks else None
    for i in reversed(range(m)):
        if grad_blocks is not None:
            grad_blocks[i] = torch.bmm(g, inputs[i].transpose(1, 2))  # (k, b, b)
        if i == 0 and not need_h:
            break
        g = torch.bmm(blocks[i].transpose(1, 2), g).view(d, n)  # (d, N)
        if i > 0:
            g = g.index_select(0, scatters[i]).view(k, b, n)
    grad_h = None
    if need_h:
        grad_h = g.t() if lead_identity else g.t().index_select(1, scatters[0])  # (N, d)
        grad_h = grad_h.contiguous()
    return grad_h, grad_blocks


class ButterflyFunction(torch.autograd.Function):
    """``y = butterfly(h; blocks)`` saving only ``h`` and the blocks.

    Backward recomputes the stage inputs ``u_i`` and runs, for ``i = m … 1``,
    ``∂L/∂blocks_i = g_i u_iᵀ`` and ``g_{i−1} = blocks_iᵀ g_i`` (per block), each
    gather undone by its inverse index. Exact (same ops as forward), not an
    approximation; valid for any blocks, orthogonal or not. The recomputed
    stages (m × N × d) live only while this one backward runs.

    Inputs: ``h`` (N, d), ``blocks`` (m, k, b, b) of h's dtype, ``plan``
    (2, m + 1, d) from ``_gather_plan``, ``lead_identity`` as in ``butterfly_reference``.
    """

    @staticmethod
    def forward(ctx, h: Tensor, blocks: Tensor, plan: Tensor, lead_identity: bool) -> Tensor:  # type: ignore[override]
        # Autocast off: the caller already chose the dtype, and backward must see the same one.
        with torch.autocast(h.device.type, enabled=False):
            out = _butterfly(h, blocks, plan[0], lead_identity)  # (N, d)
        ctx.save_for_backward(h, blocks, plan)
        ctx.lead_identity = lead_identity
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        h, blocks, plan = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False):
            grad_h, grad_blocks = _butterfly_backward(h, blocks, plan, ctx.lead_identity, grad_out,
                                                      ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_h, grad_blocks, None, None


class RecomputedBaseButterflyFunction(torch.autograd.Function):
    """``y = butterfly(h; blocks)`` for ``h = base(x)``, saving ``x`` instead of ``h``.

    The output-side ``recompute_base`` option (docs/perf/README.md). Forward is
    ``ButterflyFunction``'s on the given ``h``; but ``h`` is not kept: backward first
    recomputes ``h = base(x)`` under ``no_grad`` — one more base matmul, run under
    the autocast state the forward ran in so it yields the forward's dtype and
    values — then proceeds as ``ButterflyFunction``. The recomputed ``h`` lives only
    during this backward. Where the caller keeps ``x`` anyway (a LoRA branch on the
    same ``x``), this function adds no activation storage beyond the blocks.

    ``∂L/∂h`` is returned as usual; ``x`` gets no gradient from here: its gradient
    flows through the caller's own ``h = base(x)``. Exact when the base matmul is
    deterministic (same ``x`` and weights give the same ``h`` bit for bit), as a
    float or bitsandbytes 4-bit matmul is. Base hooks (``register_base_hook``
    observers) see the recomputation as a second call made with grad disabled.

    Inputs: ``h`` (N, d) = ``base(x)`` flattened, used only by forward; ``x``
    (..., d_in), the base input (pass it detached); ``blocks``, ``plan``,
    ``lead_identity`` as in ``ButterflyFunction``; ``base`` the ``BaseMatmul`` that
    made ``h`` from ``x``.
    """

    @staticmethod
    def forward(ctx, h: Tensor, x: Tensor, blocks: Tensor, plan: Tensor, lead_identity: bool,  # type: ignore[override]
                base: BaseMatmul) -> Tensor:
        device = h.device.type
        # Captured before our own autocast block: the state in which the caller ran base(x).
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            out = _butterfly(h, blocks, plan[0], lead_identity)  # (N, d)
        ctx.save_for_backward(x, blocks, plan)
        ctx.base, ctx.lead_identity, ctx.h_dtype, ctx.dim = base, lead_identity, h.dtype, h.shape[1]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None, None, None, None]:  # type: ignore[override]
        x, blocks, plan = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            h = ctx.base(x).reshape(-1, ctx.dim).to(ctx.h_dtype)  # (N, d), the forward's h again
        with torch.autocast(device, enabled=False):
            grad_h, grad_blocks = _butterfly_backward(h, blocks, plan, ctx.lead_identity, grad_out,
                                                      ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        del h
        return grad_h, None, grad_blocks, None, None, None


# Device types whose Cayley forward runs the float64 elimination (see CayleyFunction); the
# others (CUDA) run one batched solve_ex. benchmarks/op_counts.py empties it to count the GPU path.
ELIMINATION_DEVICES: set[str] = {"cpu"}


def skew_index(b: int) -> Tensor:
    """(2, b(b−1)/2): flat positions ``i b + j`` of the strict upper triangle (row 0) and of their mirror ``j b + i``."""
    rows, cols = torch.triu_indices(b, b, offset=1)
    return torch.stack([rows * b + cols, cols * b + rows])


class CayleyFunction(torch.autograd.Function):
    """``R = (I + S)(I − S)⁻¹ = 2 (I − S)⁻¹ − I`` for skew ``S`` given by its strict upper triangle ``q``.

    Forward: on CUDA ``torch.linalg.solve_ex`` (batched LU, no host sync); on the CPU
    (``ELIMINATION_DEVICES``) ``(I − S)⁻¹`` by Gauss–Jordan elimination over the whole batch at
    once, in float64 (``_skew_resolvent``), because LAPACK's per-matrix calls cost ~2 µs each for
    these 8 × 8 systems (measured 2.5–4× slower for 192–576 blocks) and float64 keeps the result
    correct to float32's last bit without pivoting.

    Backward needs no second solve: with ``Z = (I − S)⁻¹ = (R + I) / 2``, ``dR = 2 Z dS Z``,
    so ``∂L/∂S = 2 Zᵀ G Zᵀ = ½ (R + I)ᵀ G (R + I)ᵀ`` and, as ``S`` holds ``q`` above the
    diagonal and ``−q`` below, ``∂L/∂q = (∂L/∂S − ∂L/∂Sᵀ)`` at the upper-triangle positions.

    Inputs: ``q`` (..., b(b−1)/2) in float32 or wider; ``index`` from ``skew_index(b)``; ``b``.
    Output: (..., b, b) in ``q``'s dtype. Only ``R`` is kept for backward.
    """

    @staticmethod
    def forward(ctx, q: Tensor, index: Tensor, b: int) -> Tensor:  # type: ignore[override]
        with torch.autocast(q.device.type, enabled=False):
            if q.device.type in ELIMINATION_DEVICES:
                r = _skew_resolvent(q, index, b).mul_(2)  # 2 (I − S)⁻¹, (b, b, batch) in float64
                r.view(b * b, -1)[:: b + 1] -= 1  # − I
                r = r.permute(2, 0, 1).to(q.dtype, memory_format=torch.contiguous_format).view(*q.shape[:-1], b, b)
            else:
                skew = q.new_zeros(*q.shape[:-1], b * b)
                skew.index_copy_(-1, index[0], q)
                skew.index_copy_(-1, index[1], -q)
                skew = skew.view(*q.shape[:-1], b, b)  # (..., b, b), S = −Sᵀ
                eye = torch.eye(b, dtype=q.dtype, device=q.device)
                # solve_ex skips solve's invertibility check, which waits on the device once per call;
                # I − S is always invertible for skew S (its eigenvalues are 1 − iθ).
                r = torch.linalg.solve_ex(eye - skew, eye + skew)[0]
        ctx.save_for_backward(r, index)
        return r

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_r: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        r, index = ctx.saved_tensors
        b = r.shape[-1]
        with torch.autocast(r.device.type, enabled=False):
            # Contiguous (batch, b, b) operands: bmm on an expanded (stride-0) gradient falls back
            # to one small copy and matmul per block (measured 50× slower for 15 k blocks).
            z2 = (r + torch.eye(b, dtype=r.dtype, device=r.device)).view(-1, b, b).transpose(1, 2)  # 2 Zᵀ
            g = grad_r.to(r.dtype).contiguous().view(-1, b, b)
            grad_skew = torch.bmm(torch.bmm(z2, g), z2).mul_(0.5).view(-1, b * b)  # (batch, b²)
            n = index.shape[1]
            # gather, not index_select: 2× faster on (batch, b²) here
            grad_q = (torch.gather(grad_skew, 1, index[0].expand(grad_skew.shape[0], n))
                      - torch.gather(grad_skew, 1, index[1].expand(grad_skew.shape[0], n)))
        return grad_q.view(r.shape[:-2] + (n,)), None, None


def _skew_resolvent(q: Tensor, index: Tensor, b: int) -> Tensor:
    """``(I − S)⁻¹`` for every skew ``S`` of the batch, as (b, b, batch) float64 (batch last).

    In-place Gauss–Jordan inversion without pivoting, safe for ``I − S``: its symmetric part is
    ``I``, and every Schur complement ``I + S₂₂ + s sᵀ`` keeps a symmetric part ``≥ I``, so every
    pivot is ``≥ 1``. The batch is the last, contiguous axis, so each of the ``b`` steps is a few
    elementwise kernels over whole rows of the batch (measured 1.35× faster than eliminating
    ``[I − S | I + S]`` with the batch first, for 15 k blocks).
    """
    n = index.shape[1]
    qt = q.reshape(-1, n).t().to(torch.float64)  # (b(b−1)/2, batch)
    a = qt.new_zeros(b * b, qt.shape[1])
    a.index_copy_(0, index[0], -qt)  # I − S: −q above the diagonal
    a.index_copy_(0, index[1], qt)  # and +q below
    a[:: b + 1] = 1.0
    a = a.view(b, b, -1)
    for p in range(b):
        col = a[:, p].clone()  # (b, batch): the pivot and the multipliers of column p
        pivot = col[p].clone()
        col[p] = 0.0
        a[:, p] = 0.0
        a[p, p] = 1.0
        a[p] /= pivot  # row p of the inverse-in-progress
        a.addcmul_(col[:, None], a[p].clone()[None], value=-1)  # clear column p from the other rows
    return a
_ROW_IDENTITIES: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = {}


def _row_identity(c: int, d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(d, c): feature ``f`` holds a one in column ``f mod c`` — ``c`` tiled unit vectors as columns.

    Read-only and shared: one per (c, d, dtype, device) for the whole process (a model has a
    handful of widths), instead of a new ``d × c`` tensor per module and pass.
    """
    key = (c, d, dtype, torch.device(device))
    eye = _ROW_IDENTITIES.get(key)
    if eye is None:
        with torch.inference_mode(False):  # a normal tensor even if first made under inference mode
            eye = _ROW_IDENTITIES[key] = torch.eye(c, dtype=dtype, device=device).repeat(d // c, 1)
    return eye


def _composition_stages(blocks: Tensor, gathers: Tensor, c: int) -> list[Tensor]:
    """The input ``u_i`` (k, b, c) of every factor applied to ``_row_identity``; the last factor not run."""
    m, k, b, _ = blocks.shape
    d = k * b
    inputs = [_row_identity(c, d, blocks.dtype, blocks.device).view(k, b, c)]  # P_1 = I
    for i in range(1, m):
        z = torch.bmm(blocks[i - 1], inputs[-1]).view(d, c)
        inputs.append(z.index_select(0, gathers[i]).view(k, b, c))  # whole rows: contiguous copies
    return inputs


class ComposedButterflyFunction(torch.autograd.Function):
    """The diagonal blocks of ``R = B_m ⋯ B_1``: (d / c, c, c), ``c = b · 2^(m−1)``.

    ``R`` acts on each group of ``c`` consecutive features alike, so applying the factors
    to ``c`` tiled unit vectors (``_row_identity``, ``d × c``: column ``r`` holds ``e_r`` in every
    group) gives column ``r`` of every block at once: ``c`` columns through the factored path
    instead of ``d``. The features stay on the rows throughout, so every permutation gathers
    whole rows and the result is already laid out as ``(d / c, c, c)``. Backward runs the factors
    in reverse on the same identity, its stage inputs recomputed rather than kept.

    Inputs: ``blocks`` (m, k, b, b), ``plan`` from ``_gather_plan``, ``c``.
    """

    @staticmethod
    def forward(ctx, blocks: Tensor, plan: Tensor, c: int) -> Tensor:  # type: ignore[override]
        m, k, b, _ = blocks.shape
        with torch.autocast(blocks.device.type, enabled=False):
            u = _composition_stages(blocks, plan[0], c)[-1]
            z = torch.bmm(blocks[-1], u).view(k * b, c)
            out = z.index_select(0, plan[0, m])  # (d, c): row g c + i, column r = R[g c + i, g c + r]
        ctx.save_for_backward(blocks)
        ctx.plan, ctx.c = plan, c  # a constant index (a buffer or the bank's cached plan), not an activation
        return out.view(k * b // c, c, c)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (blocks,) = ctx.saved_tensors
        plan, c = ctx.plan, ctx.c
        m, k, b, _ = blocks.shape
        d = k * b
        with torch.autocast(blocks.device.type, enabled=False):
            inputs = _composition_stages(blocks, plan[0], c)
            g = grad_out.to(blocks.dtype).reshape(d, c).index_select(0, plan[1, m]).view(k, b, c)
            grad_blocks = torch.empty_like(blocks)
            for i in reversed(range(m)):
                grad_blocks[i] = torch.bmm(g, inputs[i].transpose(1, 2))  # (k, b, b)
                if i > 0:
                    g = torch.bmm(blocks[i].transpose(1, 2), g).view(d, c).index_select(0, plan[1, i]).view(k, b, c)
        return grad_blocks, None, None


# ---------------------------------------------------------------------------


_BANK_PLANS: dict[tuple[int, int, int, torch.device], Tensor] = {}


def _bank_plan(n_blocks: int, block_size: int, n_factors: int, device: torch.device) -> Tensor:
    """``_gather_plan`` for ``n_blocks`` blocks in a row, cached per shape (a model has a handful)."""
    key = (n_blocks, block_size, n_factors, torch.device(device))
    plan = _BANK_PLANS.get(key)
    if plan is None:
        with torch.inference_mode(False):  # a normal tensor even if first made under inference mode
            perms = [butterfly_permutation(i + 1, n_blocks, block_size) for i in range(n_factors)]
            plan = _BANK_PLANS[key] = _gather_plan(perms).to(device)
    return plan


def composed_bank(adapters: Sequence["BoftAdapter"]) -> list[tuple[list["BoftAdapter"], Tensor]]:
    """The composed ``R`` blocks of many adapters at once: ``(group, blocks)`` per (b, m, dtype, device).

    Adapters of one group are laid side by side along the feature axis: every butterfly
    permutation stays inside groups of ``2^(m−1)`` blocks, which divides each adapter's block
    count, so the permutations of the concatenation are the adapters' own, offset, and the
    composed blocks of the concatenation are each adapter's blocks in order (``blocks`` is
    ``(Σ d_i / c, c, c)``; tested against the per-adapter form). Adapters in the factored
    form or with sharded parameters are left out (they compute their own).
    """
    groups: dict[tuple[int, int, torch.dtype, torch.device], list[BoftAdapter]] = {}
    for adapter in adapters:
        q = adapter.boft_Q
        if adapter.form == "composed" and preparable(adapter, q):
            groups.setdefault((adapter.block_size, adapter.n_factors, q.dtype, q.device), []).append(adapter)
    banks = []
    for (b, m, _, device), group in groups.items():
        q = torch.cat([a.boft_Q for a in group], dim=1)  # (m, K, b(b−1)/2)
        q = q.to(torch.promote_types(q.dtype, torch.float32))
        cayley = CayleyFunction.apply(q, group[0].skew_positions, b)  # (m, K, b, b)
        if m == 1:
            blocks = cayley[0]
        else:
            blocks = ComposedButterflyFunction.apply(cayley, _bank_plan(q.shape[1], b, m, device), composed_size(b, m))
        banks.append((group, blocks))
    return banks


# ---------------------------------------------------------------------------


class BoftAdapter(Adapter):
    """Output side ``W' x = R (W x)``; input side ``W' x = W (R x)``; ``R`` orthogonal, ``R = I`` at start.

    Parameters: ``boft_Q`` of shape ``(m, k, b(b−1)/2)`` — ``m · k · b(b−1)/2`` per layer.
    The Cayley blocks (and, composed, ``R``'s blocks) are computed in the parameter dtype
    (at least float32, as ``torch.linalg.solve`` needs) once per call and cast to the
    activations' dtype for the matmuls; activations are never upcast.

    Attributes:
        form: ``"composed"`` or ``"factored"`` (see the module docstring), from
            ``butterfly_form(b, m)``; either may be set by hand (same values up to rounding).
        recompute_stages: factored form only: ``True`` (default) uses ``ButterflyFunction``;
            ``False`` the plain-autograd reference (same values, more memory).
        recompute_base: from the config (output side): ``rotate_base_output`` keeps
            ``x`` and recomputes ``h = W x`` in backward. Composed: instead of the output;
            factored: instead of ``h`` (``RecomputedBaseButterflyFunction``, with ``recompute_stages``).

    Raises:
        ValueError: ``d`` (``d_out`` or ``d_in`` by side) does not fit
            ``block_size`` and ``n_factors``; the message lists the values that would.
    """

    method = "boft"

    def __init__(self, d_in: int, d_out: int, config: BoftConfig) -> None:
        super().__init__(d_in, d_out)
        self.side = config.side
        d = d_out if config.side == "output" else d_in
        b, m = config.block_size, config.n_factors
        _check_fits(d, b, m, config.side)
        self.dim, self.block_size, self.n_factors, self.n_blocks = d, b, m, d // b
        self.composed_size = composed_size(b, m)
        self.form = butterfly_form(b, m)
        self.recompute_stages = True
        self.recompute_base = config.recompute_base
        self.boft_Q = nn.Parameter(torch.zeros(m, self.n_blocks, b * (b - 1) // 2))
        # Derived from the config, so not saved with the adapter.
        self.register_buffer("skew_positions", skew_index(b), persistent=False)  # (2, b(b-1)/2) flat, upper / mirror
        perms = [butterfly_permutation(i + 1, self.n_blocks, b) for i in range(m)]
        self.register_buffer("permutations", torch.stack(perms), persistent=False)  # (m, d)
        self.register_buffer("plan", _gather_plan(perms), persistent=False)  # (2, m + 1, d)
        self.register_buffer("plan_transposed", _gather_plan(perms[::-1]), persistent=False)

    def cayley_blocks(self) -> Tensor:
        """The ``(m, k, b, b)`` blocks ``(I + Q)(I − Q)⁻¹ = solve(I − Q, I + Q)`` (the factors commute)."""
        q = self.boft_Q
        q = q.to(torch.promote_types(q.dtype, torch.float32))
        return CayleyFunction.apply(q, self.skew_positions, self.block_size)

    def composed_blocks(self) -> Tensor:
        """``R`` as ``(d / c, c, c)`` diagonal blocks, ``c = b · 2^(m−1)``, in the Cayley blocks' dtype.

        Block ``g`` maps features ``g c … g c + c − 1`` to themselves; differentiable in ``boft_Q``.
        Taken from the model's batched preparation (``prepare_all``) when one is valid.
        """
        prepared = take(self, self.boft_Q)
        if prepared is not None:
            return prepared[0]
        blocks = self.cayley_blocks()  # (m, k, b, b)
        if self.n_factors == 1:  # P_1 = I: the Cayley blocks are R's blocks
            return blocks[0]
        return ComposedButterflyFunction.apply(blocks, self.plan, self.composed_size)

    @classmethod
    def prepare_all(cls, adapters: Sequence["BoftAdapter"]) -> None:
        """Every composed adapter's ``R`` blocks from one batched Cayley transform and composition."""
        for group, blocks in composed_bank(adapters):
            pieces = blocks.split([a.dim // a.composed_size for a in group])  # (k_i, c, c) each
            offer(group, [(piece,) for piece in pieces], [(a.boft_Q,) for a in group], blocks)

    def _check_dim(self, h: Tensor) -> None:
        if h.shape[-1] != self.dim:
            raise ValueError(f"expected activations with last dimension {self.dim}, got shape {tuple(h.shape)}")

    def _run(self, h: Tensor, blocks: Tensor, plan: Tensor, lead_identity: bool,
             source: tuple[Tensor, BaseMatmul] | None = None) -> Tensor:
        """Factored form. ``source = (x, base)`` with ``h = base(x)``: keep ``x`` for backward instead of ``h``."""
        self._check_dim(h)
        flat = h.reshape(-1, self.dim)  # (N, d)
        if self.recompute_stages and source is not None:
            x, base = source
            out = RecomputedBaseButterflyFunction.apply(flat, x.detach(), blocks, plan, lead_identity, base)
        elif self.recompute_stages:
            out = ButterflyFunction.apply(flat, blocks, plan, lead_identity)
        else:
            out = butterfly_reference(flat, blocks, plan[0], lead_identity)
        return out.reshape(h.shape)

    def _run_composed(self, h: Tensor, blocks: Tensor, keep: Keep, x: Tensor | None = None) -> Tensor:
        """Composed form: ``blockdiag(blocks) h`` keeping what ``keep`` says. h: (..., d) -> (..., d)."""
        self._check_dim(h)
        out = BlockDiagonalFunction.apply(h.reshape(-1, self.dim), blocks, None, None,
                                          None if x is None else x.detach(), keep)
        return out.view(h.shape)

    def rotate(self, h: Tensor) -> Tensor:
        """``R h`` along the last dimension. h: (..., d) -> (..., d), h's dtype; backward keeps ``h``."""
        if self.form == "composed":
            return self._run_composed(h, self.composed_blocks().to(h.dtype), Keep("input"))
        return self._run(h, self.cayley_blocks().to(h.dtype), self.plan, lead_identity=True)  # P_1 = I

    def rotate_base_output(self, x: Tensor, h: Tensor, base: BaseMatmul) -> Tensor:
        """``R h`` for ``h = base(x)`` (output side), keeping for backward: composed, the output
        (``h = Rᵀ y`` is rebuilt there); factored, ``h``; with ``recompute_base``, ``x`` (detached,
        ``h`` recomputed).

        x: (..., d_in), h: (..., d_out) -> (..., d_out), h's dtype.
        """
        if self.form == "composed":
            keep = Keep("base", base=base) if self.recompute_base else Keep("output", inverse="transpose")
            return self._run_composed(h, self.composed_blocks().to(h.dtype), keep, x)
        source = (x, base) if self.recompute_base else None
        return self._run(h, self.cayley_blocks().to(h.dtype), self.plan, lead_identity=True, source=source)

    def rotate_transposed(self, h: Tensor) -> Tensor:
        """``Rᵀ h = B_1ᵀ ⋯ B_mᵀ h`` along the last dimension. h: (..., d) -> (..., d)."""
        if self.form == "composed":
            return self._run_composed(h, self.composed_blocks().to(h.dtype).transpose(1, 2), Keep("input"))
        blocks = self.cayley_blocks().to(h.dtype).flip(0).transpose(-1, -2)  # factors reversed, blocks transposed
        return self._run(h, blocks, self.plan_transposed, lead_identity=self.n_factors == 1)  # leads with P_m

    def dense_rotation(self) -> Tensor:
        """The ``d × d`` matrix ``R`` (for tests and merging only)."""
        eye = torch.eye(self.dim, dtype=torch.promote_types(self.boft_Q.dtype, torch.float32), device=self.boft_Q.device)
        return self.rotate(eye).t()  # row i of rotate(I) is R e_i

    def forward(self, x: Tensor, base: BaseMatmul) -> Tensor:
        if self.side == "output":
            return self.rotate_base_output(x, base(x), base)  # (..., d_out)
        return base(self.rotate(x))  # (..., d_out)

    def merged_weight(self, weight: Tensor) -> Tensor:
        """``R W`` (output side: rotate every column) or ``W R`` (input side: ``Rᵀ`` on every row)."""
        if self.side == "output":
            return self.rotate(weight.t()).t()
        return self.rotate_transposed(weight)

    def unmerged_weight(self, merged: Tensor) -> Tensor:
        """``Rᵀ W'`` or ``W' Rᵀ``: exact inverse because ``R`` is orthogonal."""
        if self.side == "output":
            return self.rotate_transposed(merged.t()).t()
        return self.rotate(merged)

    def extra_repr(self) -> str:
        extra = ", recompute_base=True" if self.recompute_base else ""
        return (f"side={self.side}, d={self.dim}, block_size={self.block_size}, n_factors={self.n_factors}, "
                f"form={self.form}{extra}")
