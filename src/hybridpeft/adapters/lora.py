"""LoRA: a trainable low-rank branch beside the frozen weight."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import distributed
from ..checks import check, is_int, is_number
from .config import AdapterConfig
from .base import Adapter, BaseMatmul, OwnedBaseMatmul


@dataclass
class LoraConfig(AdapterConfig):
    """Args:
        r: rank of the update.
        alpha: scale numerator; the branch is multiplied by ``alpha / r``
            (``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout on the branch input.
        rslora: rank-stabilized scaling.
        norm_bound: if set (ρ > 0), after each optimizer step ``‖ΔW‖_F`` is kept
            at most ``ρ ‖W‖_F`` by rescaling A and B (the paper's eq. 2).
    """

    method = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    norm_bound: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(is_int(self.r) and self.r > 0, "r", self.r, "a positive integer")
        check(is_number(self.alpha) and self.alpha > 0, "alpha", self.alpha, "a positive number")
        check(is_number(self.dropout) and 0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a number in [0, 1)")
        check(self.norm_bound is None or (is_number(self.norm_bound) and self.norm_bound > 0), "norm_bound",
              self.norm_bound, "None or a positive number")

    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoraAdapter(Adapter):
    """``W' x = W x + s · B (A x)``, ``A: (r, d_in)``, ``B: (d_out, r)``, ``s = α / r``.

    A starts Kaiming-uniform and B at zero, so ``W' = W`` at initialization.
    ``ΔW = s B A`` does not depend on ``W``: merging adds it, unmerging subtracts it.

    Raises:
        ValueError: if ``r`` exceeds ``min(d_in, d_out)``.
    """

    method = "lora"

    def __init__(self, d_in: int, d_out: int, config: LoraConfig) -> None:
        super().__init__(d_in, d_out)
        check(config.r <= min(d_in, d_out), "r", config.r, f"at most min(d_in, d_out) = {min(d_in, d_out)} for this layer")
        self.scaling = config.scaling()
        self.norm_bound = config.norm_bound
        self.lora_A = nn.Parameter(torch.empty(config.r, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, config.r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.register_buffer("base_norm", torch.zeros(()), persistent=False)  # ‖W‖_F, set in bind()

    def bind(self, weight: Tensor) -> None:
        if self.norm_bound is not None:
            self.base_norm.fill_(weight.float().norm())

    def factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(A, B)``, shapes (r, d_in) and (d_out, r), in ``dtype``: the branch is ``s · B (A x)``.

        The hook through which a subclass widens the branch (LoRA-GA appends its frozen
        start); the small factors are cast, never the N × d activations.
        """
        return self.lora_A.to(dtype), self.lora_B.to(dtype)

    def branch(self, x: Tensor) -> Tensor:
        """The low-rank term ``s · B A x`` alone. x: (..., d_in) -> (..., d_out)."""
        A, B = self.factors(x.dtype)
        return (self.dropout(x) @ A.t() * self.scaling) @ B.t()  # (..., r) -> (..., d_out)

    def forward(self, x: Tensor, base: BaseMatmul) -> Tensor:
        flat = x.reshape(-1, self.d_in)  # (N, d_in): h = base(flat) is 2-D, so adding into it needs no view
        h = base(flat)  # (N, d_out)
        A, B = self.factors(x.dtype)
        u = self.dropout(flat) @ A.t() * self.scaling  # (N, r); scaling the rank-r side is cheaper
        return add_low_rank(h, u, B, owned=isinstance(base, OwnedBaseMatmul)).view(*x.shape[:-1], self.d_out)

    def delta_weight(self) -> Tensor:
        return self.scaling * self.lora_B @ self.lora_A  # (d_out, d_in)

    def merged_weight(self, weight: Tensor) -> Tensor:
        return weight + self.delta_weight().to(weight.dtype)

    def unmerged_weight(self, merged: Tensor) -> Tensor:
        return merged - self.delta_weight().to(merged.dtype)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.norm_bound is None or self.base_norm.item() == 0:
            return
        limit = self.norm_bound * self.base_norm
        # Sharded (FSDP) factors are gathered: r × d each, and every rank must get the same norm.
        norm = self.scaling * lowrank_frobenius(distributed.full(self.lora_B), distributed.full(self.lora_A))
        if norm > limit:  # rescale both factors equally so their balance is kept
            factor = (limit / norm).sqrt()
            distributed.local(self.lora_A).mul_(factor)
            distributed.local(self.lora_B).mul_(factor)


def add_low_rank(h: Tensor, u: Tensor, b: Tensor, owned: bool) -> Tensor:
    """``h + u bᵀ`` for h: (N, d_out), u: (N, r), b: (d_out, r), the add fused into the GEMM.

    ``owned`` (``h`` is a new tensor nothing else refers to): accumulate into ``h`` itself
    (``addmm_``, the GEMM with β = 1 on ``h``). Otherwise, or where autograd forbids it (``h``
    a leaf that requires grad), ``torch.addmm``, which first copies ``h`` into a new output.
    Measured per module on CPU (``benchmarks/lora_forms.py``): the copy is the only
    difference; both are faster than ``h + (u bᵀ)`` (one more pass) and PEFT's form.
    """
    if owned and h.is_contiguous() and not (h.is_leaf and h.requires_grad):
        return h.addmm_(u.to(h.dtype), b.t().to(h.dtype))  # in place: autocast does not cast for us
    return torch.addmm(h, u, b.t())


def lowrank_frobenius(B: Tensor, A: Tensor) -> Tensor:
    """``‖B A‖_F`` from r × r Gram matrices: ``trace((BᵀB)(AAᵀ))``, no d_out × d_in product."""
    return ((B.t() @ B) * (A @ A.t())).sum().clamp_min(0).sqrt()
