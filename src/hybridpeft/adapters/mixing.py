"""The Hybrid's mixing coefficient λ per layer: schedules and the gradient-norm rule.

Per adapted layer, ``y = λ h + (1 − λ) R h + λ · lora(x)``; λ is a buffer that
``hybridpeft.after_optimizer_step(model)`` moves once per optimizer step:

- ``"adaptive"`` (default): with ``g_L = ‖∇_{A,B} L‖`` and ``g_B = ‖∇_Q L‖``,

      λ ← clamp(ema · λ + (1 − ema) · t, λ_min, λ_max),

  where the target ``t`` follows ``norm_rule``:

  * ``"relative"`` (default): ``t = a / (a + b)``, ``a = g_L / λ``, ``b = g_B / (1 − λ)``.
    The LoRA branch enters the output multiplied by λ, so its gradient carries a
    factor λ (and the BOFT branch's a factor ``1 − λ``); dividing it out measures
    how strongly the loss pulls on each branch itself.
  * ``"paper_literal"``: ``t = g_L / (g_L + g_B)`` (the paper's Algorithm 2). Then
    ``t = λa / (λa + (1 − λ)b)``, which exceeds λ whenever ``a > b``: positive
    feedback that drives λ to a clamp bound (shown by ``tests/test_hybrid.py``).

  A step without gradients (both norms zero or not finite) leaves λ unchanged.
- ``"fixed"``: λ = ``lam_fixed`` always (the paper's ablation uses 0.25, 0.5, 0.75).
- ``"anneal"``: ``λ_t = start + (end − start) · min(t / T, 1)`` after ``t`` optimizer
  steps (``T = anneal_steps``; the Trainer callback fills it from ``max_steps``).

Everything stays in tensors (no host sync per layer per step), and
``update_lambdas`` moves all layers of a model together: one fused norm over every
branch gradient, one all-reduce and one vectorized rule step, instead of a dozen
small kernels and a collective per layer.

The model-level views (``mixing_state``, ``set_anneal_steps``) are in ``hybridpeft.api``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn

from .. import distributed
from ..checks import check, is_int, is_number

if TYPE_CHECKING:
    from .hybrid import HybridAdapter

SCHEDULES = ("adaptive", "fixed", "anneal")
NORM_RULES = ("relative", "paper_literal")
_EPS = 1e-12


def _unit(value: object) -> bool:
    return is_number(value) and 0.0 <= value <= 1.0


@dataclass(frozen=True)
class MixingRule:
    """How λ starts and moves; built from ``HybridConfig``, whose λ fields take their names and
    defaults from here (see its docstring for their meaning).

    Raises:
        ValueError: naming the field and value, for a schedule or norm rule not known, a λ
            outside its range, or an ``ema`` outside [0, 1).
    """

    schedule: str = "adaptive"
    lam_init: float = 0.5
    lam_fixed: float = 0.5
    anneal_start: float = 0.75
    anneal_end: float = 0.25
    anneal_steps: int | None = None
    ema: float = 0.9
    lam_min: float = 0.05
    lam_max: float = 0.95
    norm_rule: str = "relative"

    def __post_init__(self) -> None:
        check(self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {list(SCHEDULES)}")
        check(self.norm_rule in NORM_RULES, "norm_rule", self.norm_rule, f"one of {list(NORM_RULES)}")
        check(_unit(self.lam_min) and self.lam_min > 0, "lam_min", self.lam_min, "a number in (0, 1]")
        check(_unit(self.lam_max) and self.lam_max < 1 and self.lam_max >= self.lam_min, "lam_max", self.lam_max,
              f"a number in [lam_min={self.lam_min}, 1)")
        check(_unit(self.lam_init) and self.lam_min <= self.lam_init <= self.lam_max, "lam_init", self.lam_init,
              f"a number in [lam_min, lam_max] = [{self.lam_min}, {self.lam_max}]")
        check(_unit(self.lam_fixed), "lam_fixed", self.lam_fixed, "a number in [0, 1]")
        check(_unit(self.anneal_start), "anneal_start", self.anneal_start, "a number in [0, 1]")
        check(_unit(self.anneal_end), "anneal_end", self.anneal_end, "a number in [0, 1]")
        check(self.anneal_steps is None or (is_int(self.anneal_steps) and self.anneal_steps > 0),
              "anneal_steps", self.anneal_steps, "None or a positive integer")
        check(is_number(self.ema) and 0.0 <= self.ema < 1.0,
              "ema", self.ema, "a number in [0, 1)")

    def initial(self) -> float:
        return {"adaptive": self.lam_init, "fixed": self.lam_fixed, "anneal": self.anneal_start}[self.schedule]

    def next(self, lam: Tensor, step: Tensor, g_lora: Tensor, g_boft: Tensor) -> Tensor:
        """λ after optimizer step number ``step`` (1 for the first), given the branch gradient norms.

        Args:
            lam, g_lora, g_boft: 0-dim float tensors. step: 0-dim integer tensor.

        Raises:
            ValueError: ``schedule="anneal"`` with ``anneal_steps`` unset.
        """
        if self.schedule == "fixed":
            return torch.full_like(lam, self.lam_fixed)
        if self.schedule == "anneal":
            if self.anneal_steps is None:
                raise ValueError(
                    "anneal_steps=None is invalid for schedule='anneal': set HybridConfig.anneal_steps, "
                    "call hybridpeft.api.set_anneal_steps(model, n) or train with HybridPeftCallback"
                )
            frac = (step.to(lam.dtype) / self.anneal_steps).clamp(max=1.0)
            return self.anneal_start + (self.anneal_end - self.anneal_start) * frac
        target = mixing_target(lam, g_lora, g_boft, self.norm_rule)
        moved = (self.ema * lam + (1.0 - self.ema) * target).clamp(self.lam_min, self.lam_max)
        return torch.where(torch.isfinite(target), moved, lam)


def mixing_target(lam: Tensor, g_lora: Tensor, g_boft: Tensor, norm_rule: str) -> Tensor:
    """The λ the norms point to (before EMA and clamping); NaN when there is no gradient."""
    if norm_rule == "relative":
        a, b = g_lora / lam.clamp_min(_EPS), g_boft / (1.0 - lam).clamp_min(_EPS)
    else:
        a, b = g_lora, g_boft
    total = a + b
    return torch.where(total > 0, a / total.clamp_min(_EPS), torch.full_like(total, float("nan")))


def grad_norm(params: list[nn.Parameter]) -> Tensor:
    """``sqrt(Σ ‖p.grad‖²)`` in float32 over the parameters that have a gradient (0 if none)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else "cpu")
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum().sqrt()


def branch_norms(adapters: Sequence["HybridAdapter"], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """(n, 2): each adapter's ``[‖∇ LoRA-GA branch‖, ‖∇ BOFT branch‖]`` of the *whole* gradients,
    from one fused norm kernel and (under ``torch.distributed``) one all-reduce.

    Each rank adds ``square_share(g) · ‖local(g)‖²`` per gradient (see ``hybridpeft.distributed``):
    sharded (FSDP) gradients count their piece once, replicated (DDP) ones ``1/world`` each, so
    the all-reduced sum is ``‖g‖²`` either way and every rank gets the same value.
    Parameters without a gradient count as 0. Computed in ``dtype`` or wider if a gradient
    is wider (bf16 gradients are summed in float32).
    """
    grads: list[Tensor] = []
    shares: list[float] = []
    segment: list[int] = []  # row-major index into the (n, 2) result
    for i, adapter in enumerate(adapters):
        for branch, module in enumerate((adapter.lora, adapter.boft)):
            for p in module.parameters():
                if p.grad is not None:
                    grads.append(distributed.local(p.grad.detach()))
                    shares.append(distributed.square_share(p.grad))
                    segment.append(2 * i + branch)
                    dtype = torch.promote_types(dtype, p.grad.dtype)
    squares = torch.zeros(2 * len(adapters), device=device, dtype=dtype)
    if grads:
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=dtype)).to(device)  # (n_grads,)
        weights = torch.tensor(shares, device=device, dtype=dtype)  # (n_grads,)
        squares.index_add_(0, torch.tensor(segment, device=device), norms.pow(2) * weights)
    return distributed.all_reduce_sum(squares).sqrt().view(len(adapters), 2)


@torch.no_grad()
def update_lambdas(adapters: Sequence["HybridAdapter"]) -> None:
    """Move λ of every given Hybrid layer one optimizer step, all layers at once.

    Layers are grouped by (rule, device, λ dtype); per group the branch norms come from one
    fused kernel, are all-reduced across ranks in one collective, and the rule runs
    on the (n,) vector of λ. Then each branch's own ``after_optimizer_step`` runs.

    Raises:
        ValueError: an ``"anneal"`` rule without ``anneal_steps`` (nothing is changed).
    """
    groups: dict[tuple[MixingRule, torch.device, torch.dtype], list["HybridAdapter"]] = {}
    for adapter in adapters:
        lam = adapter.mix_lambda
        groups.setdefault((adapter.rule, lam.device, lam.dtype), []).append(adapter)
    updates = []
    for (rule, device, dtype), group in groups.items():
        norms = branch_norms(group, device, dtype).to(dtype)  # (n, 2), identical on every rank
        lam = torch.stack([a.mix_lambda for a in group])  # (n,)
        step = torch.stack([a.mix_step for a in group]) + 1  # (n,)
        updates.append((group, rule.next(lam, step, norms[:, 0], norms[:, 1]), step, norms))  # may raise
    for group, lam, step, norms in updates:  # only now, so a refused group leaves every λ as it was
        torch._foreach_copy_([a.mix_lambda for a in group], list(lam.unbind()))
        torch._foreach_copy_([a.mix_step for a in group], list(step.unbind()))
        torch._foreach_copy_([a.grad_norm_lora for a in group], list(norms[:, 0].unbind()))
        torch._foreach_copy_([a.grad_norm_boft for a in group], list(norms[:, 1].unbind()))
        for adapter in group:
            adapter.lora.after_optimizer_step()
            adapter.boft.after_optimizer_step()


