"""Find target modules in any torch model and wrap them with adapters."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .adapters import adapter_class
from .adapters.base import AdaptedLinear, is_supported_layer, keep_trainable_layout, layer_shape
from .adapters.config import AdapterConfig
from .patterns import select

CONFIG_ATTR = "hybridpeft_config"


def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


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
    candidates = _module_names(model)
    for pattern in patterns:
        hits = select(candidates, pattern, "target_modules")
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
    All or nothing: if any target cannot be adapted, the model is left as it was.

    Raises:
        ValueError: the model already carries adapters, or a target is unusable
            (the message names the module and the config field).
    """
    if hasattr(model, CONFIG_ATTR):
        raise ValueError("model already has hybridpeft adapters; load into a fresh base model")
    keep_trainable_layout(model)  # 4-bit layers an earlier eval pass repacked would pass no gradient
    with undo_on_error(model):
        if config.method != "full":
            wrapped = [(name, _host(model.get_submodule(name), adapter)) for name, adapter in _build_adapters(model, config)]
            for p in model.parameters():
                p.requires_grad_(False)
            for name, layer in wrapped:
                _replace(model, name, layer)
            for name in _trainable_module_names(model, config):
                for p in model.get_submodule(name).parameters():
                    p.requires_grad_(True)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        setattr(model, CONFIG_ATTR, config)
    if prepare_adapters not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(prepare_adapters)
    return model


def prepare_adapters(model: nn.Module, args: object = None) -> None:
    """Forward pre-hook that ``inject`` puts on the model: each adapter class's ``prepare_all``
    with the adapters of every unmerged, enabled layer (BOFT and the Hybrid batch their
    parameter-side work across layers there; see ``hybridpeft.adapters.prepared``)."""
    if not hasattr(model, CONFIG_ATTR):  # merged and unloaded
        return
    by_class: dict[type, list[nn.Module]] = {}
    for _, layer in adapted_layers(model):
        if not (layer.merged or layer.disabled):
            by_class.setdefault(type(layer.adapter), []).append(layer.adapter)
    for cls, adapters in by_class.items():
        cls.prepare_all(adapters)


def remove_prepare_hook(model: nn.Module) -> None:
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is prepare_adapters:
            del model._forward_pre_hooks[key]


def _build_adapters(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """(target name, its new adapter) for every target, before any layer is touched."""
    cls = adapter_class(config.method)
    built = []
    for name in find_targets(model, config.target_modules):
        layer = model.get_submodule(name)
        d_in, d_out = layer_shape(layer)
        try:
            adapter = cls.for_layer(name, d_in, d_out, config)
        except ValueError as err:
            raise ValueError(f"cannot adapt {name!r} (d_in={d_in}, d_out={d_out}): {err}") from None
        weight = layer.weight
        adapter.to(device=weight.device, dtype=_dtype(config, weight))
        built.append((name, adapter))
    return built


def _host(layer: nn.Module, adapter: nn.Module) -> AdaptedLinear:
    # The host takes the replaced layer's train/eval mode: an adapter's dropout must not
    # switch on inside a model that was put in eval mode before injection.
    return AdaptedLinear(layer, adapter).train(layer.training)


@contextlib.contextmanager
def undo_on_error(model: nn.Module) -> Iterator[None]:
    """If the block raises, put ``model`` back as it was on entry: the original layers in place
    of any ``AdaptedLinear`` added inside the block, no adapter config unless it had one, and
    every parameter's ``requires_grad`` as before."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    had_config = hasattr(model, CONFIG_ATTR)
    before = {id(m) for _, m in adapted_layers(model)}
    try:
        yield
    except BaseException:
        for name, layer in adapted_layers(model):
            if id(layer) not in before:
                _replace(model, name, layer.base_layer)
        if not had_config and hasattr(model, CONFIG_ATTR):
            delattr(model, CONFIG_ATTR)
        if not had_config:
            remove_prepare_hook(model)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def _trainable_module_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    names: list[str] = []
    candidates = _module_names(model)
    for pattern in config.trainable_modules:
        hits = select(candidates, pattern, "trainable_modules")
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
