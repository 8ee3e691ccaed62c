"""The Hybrid's mixing coefficient λ: schedules, the gradient-norm rule, logging.

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

Everything stays in tensors (no host sync per layer per step).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

SCHEDULES = ("adaptive", "fixed", "anneal")
NORM_RULES = ("relative", "paper_literal")
_EPS = 1e-12


@dataclass(frozen=True)
class MixingRule:
    """How λ starts and moves; built from ``HybridConfig`` (see its fields)."""

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
                    "call hybridpeft.mixing.set_anneal_steps(model, n) or train with HybridPeftCallback"
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


def reduce_norms(norms: Tensor) -> Tensor:
    """Root-mean-square of ``norms`` over the ranks of the default process group (identity without one).

    Data parallel: every rank holds the same gradients, so this is exact. Sharded
    (FSDP): each rank holds a shard, so this is the full norm / √world — the same
    factor for both branches, which both rules are invariant to.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return norms
    squares = norms.pow(2)
    dist.all_reduce(squares, op=dist.ReduceOp.SUM)
    return (squares / dist.get_world_size()).sqrt()


# ---------------------------------------------------------------------------
# Model-level helpers


def _hybrid_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .adapters.hybrid import HybridAdapter
    from .inject import adapted_layers

    return [(name, layer.adapter) for name, layer in adapted_layers(model) if isinstance(layer.adapter, HybridAdapter)]


def mixing_state(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per Hybrid layer: ``{"lambda", "g_lora", "g_boft", "step"}`` (norms are NaN before the first step).

    One device→host transfer for the whole model.
    """
    layers = _hybrid_layers(model)
    if not layers:
        return {}
    device = layers[0][1].mix_lambda.device  # layers may sit on several devices (pipeline/model parallel)
    rows = torch.stack([
        torch.stack([a.mix_lambda.float(), a.grad_norm_lora.float(), a.grad_norm_boft.float(), a.mix_step.float()]).to(device)
        for _, a in layers
    ]).tolist()
    return {
        name: {"lambda": lam, "g_lora": gl, "g_boft": gb, "step": int(step)}
        for (name, _), (lam, gl, gb, step) in zip(layers, rows)
    }


def set_anneal_steps(model: nn.Module, steps: int) -> None:
    """Give every Hybrid layer the length of the ``"anneal"`` schedule (in optimizer steps)."""
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"steps={steps!r} is invalid: expected a positive integer")
    from .inject import config_of

    for _, adapter in _hybrid_layers(model):
        adapter.rule = replace(adapter.rule, anneal_steps=steps)
    config = config_of(model)
    if hasattr(config, "anneal_steps"):
        config.anneal_steps = steps  # so a saved adapter_config.json carries it


def needs_anneal_steps(model: nn.Module) -> bool:
    return any(a.rule.schedule == "anneal" and a.rule.anneal_steps is None for _, a in _hybrid_layers(model))
