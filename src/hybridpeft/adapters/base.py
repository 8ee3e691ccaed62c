"""The adapter interface and the layer that hosts an adapter.

An ``Adapter`` is a strategy for changing one frozen linear map ``h = W x``.
It never owns or rewrites ``W``: its ``forward`` receives the activations and a
callable that computes ``W x``, so each method decides whether it needs the
base output (BOFT, unitary, Hybrid), a transformed input (input-side BOFT) or
only an additive branch (LoRA). Dense ``d × d`` forms appear only in
``merged_weight`` / ``unmerged_weight``.

``AdaptedLinear`` wraps an ``nn.Linear`` or a GPT-2 ``Conv1D`` and adds one
adapter; it handles the bias, merging, disabling and weight layout.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BaseMatmul = Callable[[Tensor], Tensor]  # x (..., d_in) -> W x (..., d_out), no bias


class Adapter(nn.Module):
    """Base class of every method's per-layer strategy.

    Subclasses set ``method`` and implement ``forward``, ``merged_weight`` and
    ``unmerged_weight``. Hooks with defaults: ``manifold_parameters`` (tensors
    that a Riemannian optimizer must update instead of AdamW) and
    ``after_optimizer_step`` (called once per optimizer step, e.g. to update a
    mixing coefficient or enforce a norm bound).
    """

    method: str = "base"

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.d_in = d_in
        self.d_out = d_out

    def forward(self, x: Tensor, base: BaseMatmul) -> Tensor:  # pragma: no cover - interface
        """Return the adapted ``W' x`` (no bias) for activations ``x`` of shape (..., d_in)."""
        raise NotImplementedError

    def merged_weight(self, weight: Tensor) -> Tensor:  # pragma: no cover - interface
        """Return ``W'`` for the original ``W`` (d_out, d_in)."""
        raise NotImplementedError

    def unmerged_weight(self, merged: Tensor) -> Tensor:  # pragma: no cover - interface
        """Invert ``merged_weight``: return ``W`` given ``W'``."""
        raise NotImplementedError

    def bind(self, weight: Tensor) -> None:
        """Called once by the host layer with the frozen ``W`` (d_out, d_in), detached."""
        return None

    def manifold_parameters(self) -> list[nn.Parameter]:
        return []

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        return None


def weight_of(layer: nn.Module) -> Tensor:
    """The layer's weight as (d_out, d_in), whatever its storage layout."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if _is_conv1d(layer):  # GPT-2 Conv1D stores (d_in, d_out)
        return layer.weight.t()
    raise TypeError(f"unsupported layer type {type(layer).__name__}")


def _is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and layer.weight.dim() == 2


def is_supported_layer(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or _is_conv1d(layer)


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported layer."""
    d_out, d_in = weight_of(layer).shape
    return d_in, d_out


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus one adapter: ``y = adapter(x, W·) + b``.

    Args:
        base_layer: the original ``nn.Linear`` or ``Conv1D``; its parameters are frozen.
        adapter: the strategy that adapts ``W x``.
    """

    def __init__(self, base_layer: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.merged = False
        self.disabled = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        adapter.bind(self.weight.detach())

    @property
    def weight(self) -> Tensor:
        return weight_of(self.base_layer)

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def _base_matmul(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)  # (..., d_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        y = self.adapter(x, self._base_matmul)  # (..., d_out)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def merge(self) -> None:
        """Write the adaptation into ``W``; a second call is refused."""
        if self.merged:
            raise RuntimeError("layer is already merged; unmerge() it first")
        self._write_weight(self.adapter.merged_weight(self._weight_for_math()))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("layer is not merged")
        self._write_weight(self.adapter.unmerged_weight(self._weight_for_math()))
        self.merged = False

    def _weight_for_math(self) -> Tensor:
        # Merging in float32 at least: a bf16 product of two bf16 matrices loses bits we can keep.
        w = self.weight.detach()
        return w.to(torch.promote_types(w.dtype, torch.float32))

    def _write_weight(self, new_weight: Tensor) -> None:
        target = self.base_layer.weight
        value = new_weight if isinstance(self.base_layer, nn.Linear) else new_weight.t()
        target.copy_(value.to(target.dtype))

    def extra_repr(self) -> str:
        return f"merged={self.merged}, disabled={self.disabled}"
