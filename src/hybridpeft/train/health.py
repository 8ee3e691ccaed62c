"""Are the weights still numbers? The check made before every checkpoint is written.

A step whose loss or gradient norm is not finite is skipped by the loop, but an
update can still leave NaN or ±inf behind (an overflowing step, a bad λ update, a
corrupt optimizer state). Such weights must never be saved: a resume would start
from them at any learning rate and fail again. ``non_finite_names`` lists every
trainable parameter, and every floating-point optimizer state tensor, that holds a
non-finite value (for a sharded parameter, this rank's shard).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch


def optimizer_states(optimizer: Any) -> dict[Any, dict[str, Any]]:
    """parameter → its optimizer state, through accelerate's wrapper and a ``CombinedOptimizer``."""
    inner = getattr(optimizer, "optimizer", optimizer)
    states: dict[Any, dict[str, Any]] = {}
    for part in getattr(inner, "optimizers", [inner]):
        states.update(getattr(part, "state", {}))
    return states


def _finite(tensor: torch.Tensor) -> bool:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor: this rank's shard
    return bool(torch.isfinite(local.detach()).all())


def non_finite_names(model: torch.nn.Module, params: Iterable[torch.nn.Parameter], optimizer: Any) -> list[str]:
    """Names of the trainable parameters (and optimizer state entries) that hold NaN or ±inf."""
    names = {id(p): n for n, p in model.named_parameters()}
    states = optimizer_states(optimizer)
    bad = []
    for p in params:
        name = names.get(id(p), "?")
        if not _finite(p):
            bad.append(name)
        for key, value in states.get(p, {}).items():
            if torch.is_tensor(value) and value.is_floating_point() and not _finite(value):
                bad.append(f"optimizer state {key!r} of {name}")
    return bad
