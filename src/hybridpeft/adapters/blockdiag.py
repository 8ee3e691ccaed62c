"""Block-diagonal maps on activations, with a backward that can keep the output instead of the input.

    y = blockdiag(M_1, …, M_k) h + u vᵀ,

``h`` (N, d) cut into ``k`` consecutive groups of ``c`` features (``d = k c``), group ``g``
multiplied by ``M_g`` (c × c); the optional low-rank term ``u vᵀ`` (``u``: (N, r),
``v``: (d, r)) is the Hybrid's LoRA branch, added inside the same function so that the
function's output is the module's output. The output-side BOFT (its butterfly factors
composed into blocks), the full-capacity unitary and the Hybrid run through it.

Backward needs ``h`` for ``∂L/∂M_g = Σ_n g_{n,g} h_{n,g}ᵀ``; ``Keep`` says where it comes from:

* ``"output"``: keep ``y`` only. ``h`` itself is never rebuilt: as ``y − u vᵀ = M h`` per
  group, the weight gradient follows from ``y`` through a ``c × c`` product per block,

      Σ_n g_n h_nᵀ = (Σ_n g_n y_nᵀ − (gᵀu)_g v_gᵀ) M⁻ᵀ,

  (``(gᵀu)_g``, ``v_g``: the rows of group ``g``; ``gᵀu`` is ``∂L/∂v``, computed anyway), with
  ``M⁻ᵀ = M`` for orthogonal blocks (``inverse="transpose"``) or a per-block inverse
  (``inverse="solve"``; ``Keep.inverse_blocks`` may bring it precomputed). No pass over the
  ``N × d`` activations beyond the two every backward makes. ``y`` is the module's output,
  which the next layer usually keeps anyway (RoPE, attention, SiLU and the MLP product all
  save their input), so this costs no activation memory of its own. The result carries
  the rounding of ``y`` times ``cond(M)``; a ``guard`` (a device flag computed in forward,
  read in backward) switches to recomputing ``h = base(x)`` where ``M`` may be ill-conditioned.
* ``"input"``: keep ``h``.
* ``"base"``: keep the base input ``x`` and recompute ``h = base(x)`` in backward (one more base
  matmul), under the autocast state of the forward.

The other gradients: ``∂L/∂h = blockdiag(M_gᵀ) g``, ``∂L/∂u = g v``, ``∂L/∂v = gᵀ u``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

KEEPS = ("output", "input", "base")
INVERSES = ("transpose", "solve")


def block_apply(h: Tensor, blocks: Tensor, transpose: bool = False) -> Tensor:
    """``blockdiag(M) h`` (or ``blockdiag(Mᵀ) h``) for h: (N, d), blocks: (k, c, c) -> (N, d), contiguous."""
    n, d = h.shape
    k, c, _ = blocks.shape
    out = torch.empty(n, d, dtype=h.dtype, device=h.device)
    rhs = blocks if transpose else blocks.transpose(1, 2)  # row layout: y_g = h_g M_gᵀ
    # (k, N, c) strided views on both sides: no transposing copy of the activations
    torch.bmm(h.view(n, k, c).transpose(0, 1), rhs, out=out.view(n, k, c).transpose(0, 1))
    return out


def block_grad(g: Tensor, h: Tensor, c: int) -> Tensor:
    """``Σ_n g_{n,g} h_{n,g}ᵀ`` per group: (N, d), (N, d) -> (k, c, c)."""
    n, d = g.shape
    k = d // c
    return torch.bmm(g.view(n, k, c).permute(1, 2, 0), h.view(n, k, c).transpose(0, 1))  # (k, c, N) @ (k, N, c)


class LateFlag:
    """A boolean computed on the device in forward and read on the host in backward.

    On CUDA the value is copied to pinned memory behind an event, so reading it later waits
    for that copy only, not for the whole stream (no host sync per module in forward).
    """

    def __init__(self, value: Tensor) -> None:
        self.event = None
        if value.device.type == "cuda":
            self.host = torch.empty(value.shape, dtype=torch.bool, pin_memory=True)
            self.host.copy_(value, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = value.detach()

    def get(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host)


class LateFlags(LateFlag):
    """A vector of flags copied to the host once, read entry by entry (``view(i)``)."""

    def __init__(self, values: Tensor) -> None:
        super().__init__(values)
        self.values: list[bool] | None = None

    def entry(self, i: int) -> bool:
        if self.values is None:
            if self.event is not None:
                self.event.synchronize()
            self.values = self.host.tolist()
        return self.values[i]

    def view(self, i: int) -> "FlagView":
        return FlagView(self, i)


@dataclass
class FlagView:
    """Entry ``index`` of a ``LateFlags``, read like a ``LateFlag``."""

    flags: LateFlags
    index: int

    def get(self) -> bool:
        return self.flags.entry(self.index)


@dataclass
class Keep:
    """What ``BlockDiagonalFunction`` keeps for backward; see the module docstring.

    Args:
        kind: ``"output"``, ``"input"`` or ``"base"``.
        inverse: for ``"output"``: ``"transpose"`` (orthogonal blocks) or ``"solve"``.
        base: the ``BaseMatmul`` that made ``h`` from ``x`` (``"base"``, and ``"output"`` with a guard).
        guard: for ``"output"``: an object whose ``get()`` is ``True`` in backward when the
            gradient from ``y`` is accurate; ``False`` recomputes ``h = base(x)`` instead
            (a ``LateFlag``, or one entry of a ``LateFlags``).
        inverse_blocks: for ``"output"`` with ``inverse="solve"``: ``M⁻¹`` per block, already
            computed (no grad; e.g. for every layer at once), instead of a solve in backward.
    """

    kind: str = "output"
    inverse: str = "transpose"
    base: Callable[[Tensor], Tensor] | None = None
    guard: "LateFlag | FlagView | None" = None
    inverse_blocks: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in KEEPS:
            raise ValueError(f"kind={self.kind!r} is invalid: expected one of {list(KEEPS)}")
        if self.inverse not in INVERSES:
            raise ValueError(f"inverse={self.inverse!r} is invalid: expected one of {list(INVERSES)}")
        if (self.kind == "base" or self.guard is not None) and self.base is None:
            raise ValueError(f"kind={self.kind!r} with a guard or recomputation needs base")


class BlockDiagonalFunction(torch.autograd.Function):
    """``y = blockdiag(blocks) h + u vᵀ``; what backward keeps is set by ``keep`` (see ``Keep``).

    Inputs: ``h`` (N, d); ``blocks`` (k, c, c) in ``h``'s dtype; ``u`` (N, r) and ``v`` (d, r)
    or both ``None``; ``x`` the base input (used by ``"base"`` and a guarded ``"output"``;
    pass it detached, or ``None``); ``keep``. Autocast is off inside: the caller chose the dtype.
    """

    @staticmethod
    def forward(ctx, h: Tensor, blocks: Tensor, u: Tensor | None, v: Tensor | None,  # type: ignore[override]
                x: Tensor | None, keep: Keep) -> Tensor:
        device = h.device.type
        # The state in which the caller ran base(x), for a recomputation in backward.
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            y = block_apply(h, blocks)  # (N, d)
            if u is not None:
                y.addmm_(u, v.t())  # fresh tensor: add the low-rank term in place
        kept = {"output": y, "input": h, "base": None}[keep.kind]
        # x only where backward may recompute h from it: an unguarded "output" never reads it,
        # and keeping it would hold an (N, d_in) activation per module for nothing.
        needs_x = keep.kind == "base" or keep.guard is not None
        ctx.save_for_backward(kept, blocks, u, v, x if needs_x else None)
        ctx.keep, ctx.h_dtype, ctx.dim = keep, h.dtype, h.shape[1]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        kept, blocks, u, v, x = ctx.saved_tensors
        need_h, need_blocks, need_u, need_v = ctx.needs_input_grad[:4]
        g = grad_y.to(ctx.h_dtype).contiguous()  # (N, d)
        with torch.autocast(g.device.type, enabled=False):
            grad_h = block_apply(g, blocks, transpose=True) if need_h else None
            grad_u = g @ v if need_u else None  # (N, r)
            grad_v = g.t() @ u if need_v or (need_blocks and u is not None) else None  # (d, r)
            grad_blocks = _blocks_grad(ctx, g, kept, blocks, u, v, x, grad_v) if need_blocks else None
        return grad_h, grad_blocks, grad_u, grad_v if need_v else None, None, None


def _blocks_grad(ctx, g: Tensor, kept: Tensor | None, blocks: Tensor, u: Tensor | None, v: Tensor | None,
                 x: Tensor | None, grad_v: Tensor | None) -> Tensor:
    """``Σ_n g_n h_nᵀ`` per group, (k, c, c), by the rule in ``ctx.keep`` (see the module docstring)."""
    keep: Keep = ctx.keep
    c = blocks.shape[1]
    if keep.kind == "input":
        return block_grad(g, kept, c)
    if keep.kind == "base" or (keep.guard is not None and not keep.guard.get()):
        device, enabled, dtype = ctx.autocast
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            h = keep.base(x).reshape(-1, ctx.dim).to(ctx.h_dtype)  # (N, d), the forward's h again
        return block_grad(g, h, c)
    # From the output: Σ g hᵀ = (Σ g yᵀ − (gᵀu)_g v_gᵀ) M⁻ᵀ, all in (k, c, c) once Σ g yᵀ is formed.
    low = blocks.dtype.itemsize < 4
    wide = torch.promote_types(blocks.dtype, torch.float32)
    gram = block_grad(g, kept, c).to(wide)  # (k, c, c)
    if u is not None:
        k = blocks.shape[0]
        gram -= torch.bmm(grad_v.view(k, c, -1).to(wide), v.view(k, c, -1).transpose(1, 2).to(wide))
    if keep.inverse == "transpose" and not low:
        return torch.bmm(gram, blocks)  # M⁻ᵀ = M
    # bf16/fp16 blocks are orthogonal only to their rounding (~2⁻⁸): the exact inverse of the rounded
    # blocks themselves, in float32, keeps the result off by the rounding of y and the gram only.
    given = keep.inverse_blocks is not None and not low  # a precomputed inverse is of the unrounded blocks
    inverse = keep.inverse_blocks if given else block_inverse(blocks.to(wide))
    return torch.bmm(gram, inverse.to(wide).transpose(1, 2)).to(blocks.dtype)


def block_inverse(blocks: Tensor) -> Tensor:
    """``M_g⁻¹`` for every block, solved in at least float32 and returned in the blocks' dtype."""
    wide = blocks.to(torch.promote_types(blocks.dtype, torch.float32))
    eye = torch.eye(blocks.shape[-1], dtype=wide.dtype, device=wide.device)
    # solve_ex: no host wait for an invertibility check (callers guard the conditioning)
    return torch.linalg.solve_ex(wide, eye.expand_as(wide))[0].to(blocks.dtype)
