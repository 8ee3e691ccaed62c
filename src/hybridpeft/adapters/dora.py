"""DoRA (Liu et al. 2024, arXiv 2402.09353): LoRA with a learned magnitude per output row.

With ``V = W + s B A`` (d_out, d_in) and ``‖V‖_c`` the norm of each output row of
``V`` (over the input dimension; PEFT calls it the column-wise norm of ``Vᵀ``),

    W' = diag(m / ‖V‖_c) · V,        y = (m / ‖V‖_c) ⊙ (W x + s B A x) + b,

``m`` (d_out,) trainable, starting at ``‖W‖_c`` so ``W' = W`` at initialization
(``B = 0`` as in LoRA). As in the DoRA paper's §4.3 and in HF PEFT, ``‖V‖_c`` is
treated as a constant in backward (detached): ``m``, ``A`` and ``B`` get the
gradients PEFT gives them.

The norm without a dense ``V``: for each output row ``i``,

    ‖V_i‖² = ‖W_i‖² + 2 s ⟨W_i, (BA)_i⟩ + s² ‖(BA)_i‖²
           = ‖W_i‖² + s Σ_k B_ik (2 W Aᵀ + s B (A Aᵀ))_ik,

with ``‖W_i‖`` computed once in ``bind`` and ``W Aᵀ`` (d_out, r) obtained as the
base matmul of the ``r`` rows of ``A`` — so a step costs one ``r``-token base
matmul and ``O(d·r)`` memory, never a ``d_out × d_in`` temporary (PEFT builds
``B A`` and ``W + s B A`` densely every forward). It also runs on a 4-bit base.

Dropout (``dropout > 0``, training) follows PEFT's convention: the rescaling and
the branch see the dropped-out input while the plain base output does not,
``y = W x + (m/‖V‖_c − 1) ⊙ W x̃ + (m/‖V‖_c) ⊙ s B A x̃ + b`` (one more base matmul).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import check
from .base import BaseMatmul
from .lora import LoraAdapter, LoraConfig


@dataclass
class DoraConfig(LoraConfig):
    """LoRA's fields (``r``, ``alpha``, ``dropout``, ``rslora``); ``norm_bound`` is refused
    (the magnitude vector, not ``‖BA‖``, sets the size of the update)."""

    method = "dora"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.norm_bound is None, "norm_bound", self.norm_bound,
              "None for DoRA (the magnitude m, not ‖BA‖, sets the size of W')")


class DoraAdapter(LoraAdapter):
    """``W' = diag(m / ‖W + s B A‖_c) (W + s B A)``; see the module docstring.

    Tensors: ``lora_A`` (r, d_in), ``lora_B`` (d_out, r) as in ``LoraAdapter``;
    ``magnitude`` (d_out,) trainable; ``base_row_norm`` (d_out,) = ``‖W_i‖``, a
    non-persistent buffer set in ``bind`` (so the frozen ``W`` must not change
    after injection; ``merge`` reads ``W`` itself).
    """

    method = "dora"

    def __init__(self, d_in: int, d_out: int, config: DoraConfig) -> None:
        super().__init__(d_in, d_out, config)
        self.magnitude = nn.Parameter(torch.ones(d_out))  # set to ‖W_i‖ in bind()
        self.register_buffer("base_row_norm", torch.ones(d_out), persistent=False)
        self.register_buffer("merge_norm", torch.empty(0), persistent=False)  # ‖V‖_c at merge time, for unmerge

    @torch.no_grad()
    def bind(self, weight: Tensor) -> None:
        super().bind(weight)
        norm = torch.linalg.vector_norm(weight.to(_math_dtype(weight.dtype)), dim=1)  # (d_out,)
        self.base_row_norm.copy_(norm)
        # m starts as the same rounded numbers the forward pass will divide by: m / ‖V‖_c is exactly 1
        self.magnitude.copy_(self.base_row_norm)

    @torch.no_grad()
    def row_norm(self, base: BaseMatmul, dtype: torch.dtype) -> Tensor:
        """``‖W_i + s (BA)_i‖`` for every output row (d_out,), detached, in float32 at least.

        ``‖V_i‖² = ‖W_i‖² + s Σ_k B_ik (2 W Aᵀ + s B A Aᵀ)_ik``: one base matmul of A's r rows,
        one r × r Gram matrix, one fused ``addmm`` and a row-wise dot product.
        """
        math = _math_dtype(self.lora_A.dtype)
        a, b = self.lora_A.to(math), self.lora_B.to(math)  # (r, d_in), (d_out, r)
        w_at = base(self.lora_A.to(dtype)).to(math).t()  # (r, d_out) -> W Aᵀ (d_out, r)
        s = self.scaling
        z = torch.addmm(w_at, b, a @ a.t(), beta=2.0, alpha=s)  # 2 W Aᵀ + s B (A Aᵀ), (d_out, r)
        sq = torch.add(self.base_row_norm.to(math).square(), torch.linalg.vecdot(b, z), alpha=s)  # (d_out,)
        # A zero row (W_i = 0, B_i = 0) would give 0/0 (its output row is 0 whatever the scale); rounding
        # may push an almost-zero ‖V_i‖² below 0. At init (B = 0) this is ‖W_i‖² and sqrt gives ‖W_i‖ exactly.
        return sq.clamp_min_(torch.finfo(math).tiny).sqrt_()

    def forward(self, x: Tensor, base: BaseMatmul) -> Tensor:
        h = base(x)  # (..., d_out)
        norm = self.row_norm(base, x.dtype)  # (d_out,), no grad
        # cast before dividing, as bind() rounded m: at init the ratio is exactly 1
        scale = (self.magnitude / norm.to(self.magnitude.dtype)).to(x.dtype)  # (d_out,)
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            u = x @ A.t() * self.scaling  # (..., r)
            v = torch.addmm(h.reshape(-1, self.d_out), u.reshape(-1, u.shape[-1]), B.t()).view_as(h)  # (W + sBA) x
            return v * scale
        dropped = self.dropout(x)  # PEFT's convention, see the module docstring
        lora = (dropped @ A.t() * self.scaling) @ B.t()  # (..., d_out)
        return h + (scale - 1) * base(dropped) + scale * lora

    def merged_weight(self, weight: Tensor) -> Tensor:
        v = weight + self.delta_weight().to(weight.dtype)  # (d_out, d_in)
        norm = torch.linalg.vector_norm(v, dim=1).detach()  # (d_out,)
        self.merge_norm = norm
        return (self.magnitude.to(weight.dtype) / norm).unsqueeze(1) * v

    def unmerged_weight(self, merged: Tensor) -> Tensor:
        if self.merge_norm.numel() != self.d_out:
            raise RuntimeError("DoRA unmerge needs the row norms recorded by merge(); this adapter was not merged")
        scale = self.magnitude.to(merged.dtype) / self.merge_norm.to(merged.dtype)  # (d_out,)
        return merged / scale.unsqueeze(1) - self.delta_weight().to(merged.dtype)

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scaling={self.scaling:g}"


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)
