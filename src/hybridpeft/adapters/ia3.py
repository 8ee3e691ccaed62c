"""(IA)³ (Liu et al. 2022, arXiv 2205.05638): a learned scale per channel.

For a frozen ``y = W x + b`` and a trainable vector ``l``:

- an ordinary target scales the layer's whole output, ``y = l ⊙ (W x + b)``,
  i.e. ``W' = diag(l) W`` and ``b' = l ⊙ b`` (``l``: (d_out,));
- a *feedforward* target scales its input, ``y = W (l ⊙ x) + b``, i.e.
  ``W' = W diag(l)``, ``b' = b`` (``l``: (d_in,)) — in a transformer MLP that is
  the scale on the activations entering the down projection.

``l`` starts at 1, so ``W' = W``. This is HF PEFT's ``IA3Config`` semantics,
including its defaults for Llama-style models: targets ``k_proj``, ``v_proj``,
``down_proj``, of which ``down_proj`` is feedforward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..checks import check
from ..patterns import select
from .base import Adapter, BaseMatmul
from .config import AdapterConfig

IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)


@dataclass
class IA3Config(AdapterConfig):
    """Args:
        target_modules: as for every method; default PEFT's Llama targets ``k_proj``,
            ``v_proj``, ``down_proj``.
        feedforward_modules: the targets whose *input* is scaled (same pattern rules);
            with plain-name targets each entry must be one of ``target_modules`` (as PEFT
            requires). Default (``None``): ``["down_proj"]`` if it is a target (or the
            targets are a regex or ``"all-linear"``), else none.
    """

    method = "ia3"
    target_modules: list[str] = field(default_factory=lambda: list(IA3_TARGETS))
    feedforward_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.feedforward_modules is None:
            targets = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)
            plain = targets != ["all-linear"] and not any(t.startswith("re:") for t in targets)
            self.feedforward_modules = [p for p in IA3_FEEDFORWARD if p in targets or not plain]
        if isinstance(self.feedforward_modules, str):
            self.feedforward_modules = [self.feedforward_modules]
        self.feedforward_modules = list(self.feedforward_modules)
        super().__post_init__()
        for pattern in self.feedforward_modules:
            check(isinstance(pattern, str) and pattern != "", "feedforward_modules", pattern, "non-empty strings")
        if self.target_modules != ["all-linear"] and not any(p.startswith("re:") for p in self.target_modules):
            outside = [p for p in self.feedforward_modules if not p.startswith("re:") and p not in self.target_modules]
            check(not outside, "feedforward_modules", outside, f"a subset of target_modules {self.target_modules}")


class IA3Adapter(Adapter):
    """``y = l ⊙ (W x)`` (+ ``l ⊙ b`` by the host), or ``y = W (l ⊙ x)`` when ``feedforward``.

    Tensor: ``ia3_l`` — (d_out,), or (d_in,) for a feedforward layer — trainable, ones at start.
    """

    method = "ia3"

    def __init__(self, d_in: int, d_out: int, config: IA3Config, feedforward: bool = False) -> None:
        super().__init__(d_in, d_out)
        self.feedforward = feedforward
        self.ia3_l = nn.Parameter(torch.ones(d_in if feedforward else d_out))

    @classmethod
    def for_layer(cls, name: str, d_in: int, d_out: int, config: IA3Config) -> "IA3Adapter":
        return cls(d_in, d_out, config, feedforward=any(select([name], p, "feedforward_modules")
                                                         for p in config.feedforward_modules))

    def forward(self, x: Tensor, base: BaseMatmul) -> Tensor:
        l = self.ia3_l.to(x.dtype)
        if self.feedforward:
            return base(x * l)  # (..., d_in) scaled -> (..., d_out)
        return base(x) * l  # (..., d_out)

    def merged_weight(self, weight: Tensor) -> Tensor:
        l = self.ia3_l.to(weight.dtype)
        return weight * l if self.feedforward else weight * l.unsqueeze(1)  # columns / rows of (d_out, d_in)

    def unmerged_weight(self, merged: Tensor) -> Tensor:
        l = self._invertible().to(merged.dtype)
        return merged / l if self.feedforward else merged / l.unsqueeze(1)

    def merged_bias(self, bias: Tensor) -> Tensor:
        return bias if self.feedforward else bias * self.ia3_l.to(bias.dtype)

    def unmerged_bias(self, merged: Tensor) -> Tensor:
        return merged if self.feedforward else merged / self._invertible().to(merged.dtype)

    def _invertible(self) -> Tensor:
        zeros = int((self.ia3_l == 0).sum())
        if zeros:
            raise RuntimeError(f"cannot unmerge IA³: {zeros} entries of ia3_l are 0, so the merged weight lost "
                               "those rows/columns of W; reload the base model instead")
        return self.ia3_l.detach()

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}"
