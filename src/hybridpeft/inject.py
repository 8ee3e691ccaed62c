"""Find target modules in any torch model and wrap them with adapters."""
from __future__ import annotations

import re

import torch
from torch import nn

from .adapters import adapter_class
from .adapters.base import AdaptedLinear, is_supported_layer, layer_shape
from .adapters.config import AdapterConfig

CONFIG_ATTR = "hybridpeft_config"


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def find_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Qualified names of the modules that ``patterns`` select.

    Raises:
        ValueError: a pattern matches nothing, or matches a module type we cannot adapt.
    """
    if patterns == ["all-linear"]:
        head = _output_head(model)
        return [n for n, m in model.named_modules() if is_supported_layer(m) and m is not head and n != "lm_head"]
    names: list[str] = []
    for pattern in patterns:
        hits = [n for n, _ in model.named_modules() if n and _matches(n, pattern)]
        if not hits:
            raise ValueError(f"target_modules entry {pattern!r} matches no module of {type(model).__name__}")
        for name in hits:
            module = model.get_submodule(name)
            if not is_supported_layer(module):
                raise ValueError(
                    f"target_modules entry {pattern!r} selects {name!r} of type {type(module).__name__}; "
                    "only float nn.Linear, transformers Conv1D and bitsandbytes Linear4bit can be adapted"
                )
            if name not in names:
                names.append(name)
    return names


def _dtype(config: AdapterConfig, weight: torch.Tensor) -> torch.dtype:
    if config.adapter_dtype is not None:
        return getattr(torch, config.adapter_dtype)
    # a 4-bit base stores packed uint8 codes: its adapter trains in float32 (as QLoRA does)
    return weight.dtype if weight.is_floating_point() else torch.float32


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap every target module of ``model`` with ``config``'s adapter, in place.

    Everything else is frozen (``full`` instead unfreezes everything). Returns ``model``.

    Raises:
        ValueError: the model already carries adapters, or a target is unusable
            (the message names the module and the config field).
    """
    if hasattr(model, CONFIG_ATTR):
        raise ValueError("model already has hybridpeft adapters; load into a fresh base model")
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        setattr(model, CONFIG_ATTR, config)
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    cls = adapter_class(config.method)
    for name in find_targets(model, config.target_modules):
        layer = model.get_submodule(name)
        d_in, d_out = layer_shape(layer)
        try:
            adapter = cls(d_in, d_out, config)
        except ValueError as err:
            raise ValueError(f"cannot adapt {name!r} (d_in={d_in}, d_out={d_out}): {err}") from None
        weight = layer.weight
        adapter.to(device=weight.device, dtype=_dtype(config, weight))
        _replace(model, name, AdaptedLinear(layer, adapter))
    for name in _trainable_module_names(model, config):
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    return model


def _trainable_module_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    names = []
    for pattern in config.trainable_modules:
        hits = [n for n, _ in model.named_modules() if n and _matches(n, pattern)]
        if not hits:
            raise ValueError(f"trainable_modules entry {pattern!r} matches no module of {type(model).__name__}")
        names += [h for h in hits if h not in names]
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapted_layers(model: nn.Module) -> list[tuple[str, AdaptedLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]


def config_of(model: nn.Module) -> AdapterConfig:
    if not hasattr(model, CONFIG_ATTR):
        raise ValueError("model has no hybridpeft adapters; call hybridpeft.inject(model, config) first")
    return getattr(model, CONFIG_ATTR)
