"""Model-level operations: merge, disable, count, save and load adapters; per-step work; the Hybrid's λ per layer."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed
from ._version import __version__
from .adapters.base import Adapter
from .adapters.config import AdapterConfig
from .adapters.mixing import MixingRule
from .checks import check
from .fsdp import gather_model, is_sharded_model
from .inject import (CONFIG_ATTR, _replace, _trainable_module_names, adapted_layers, config_of, inject,
                     remove_prepare_hook, undo_on_error)

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _refuse_sharded(model: nn.Module, what: str) -> None:
    if is_sharded_model(model):
        raise RuntimeError(f"cannot {what} a sharded (FSDP) model in place: each rank holds only pieces of W. "
                           "hybridpeft.merge_and_unload(model) gathers it into a plain merged model on rank 0")


def merge(model: nn.Module) -> nn.Module:
    """Write every adapter into its frozen weight (refused if already merged).

    Raises:
        RuntimeError: some layer is already merged, or has a 4-bit base (checked
            before anything is merged; the message names the layer and says what
            to do instead).
    """
    _refuse_sharded(model, "merge")
    layers = adapted_layers(model)
    for name, layer in layers:
        if layer.quantized:
            raise RuntimeError(f"cannot merge {name!r}: it has a {layer.quant_kind} (bitsandbytes) base weight. "
                               "Use hybridpeft.merge_and_unload(model) for a float model with the merged weights, "
                               "or load the saved adapter onto the unquantized base model and merge there")
    for _, layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    _refuse_sharded(model, "unmerge")
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: adapters are bypassed (merged ones temporarily unmerged)."""
    layers = [layer for _, layer in adapted_layers(model)]
    previous = [(layer.disabled, layer.merged) for layer in layers]
    try:
        for layer in layers:
            if layer.merged:
                layer.unmerge()
            layer.disabled = True
        yield model
    finally:
        for layer, (was_disabled, was_merged) in zip(layers, previous):
            layer.disabled = was_disabled
            if was_merged and not layer.merged:
                layer.merge()


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name → parameter for everything that trains (adapters and trainable modules)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model).values())


@torch.no_grad()
def after_optimizer_step(model: nn.Module) -> None:
    """Per-step adapter bookkeeping: Hybrid λ updates, LoRA norm bounds, re-orthonormalization.

    Call once after each ``optimizer.step()`` and before ``zero_grad()`` (the
    Hybrid reads the branch gradients).
    """
    by_class: dict[type[Adapter], list[Adapter]] = {}
    for _, layer in adapted_layers(model):
        by_class.setdefault(type(layer.adapter), []).append(layer.adapter)
    for cls, adapters in by_class.items():
        cls.after_optimizer_step_all(adapters)  # e.g. every Hybrid layer's λ in one go


update_mixing = after_optimizer_step


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what the adapter owns: adapter tensors plus ``trainable_modules``; no base weights."""
    config = config_of(model)
    if config.method == "full":
        return {k: v for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model):
        for key, value in layer.adapter.state_dict().items():
            state[f"{name}.adapter.{key}"] = value
    for name in _trainable_module_names(model, config):
        for key, value in model.get_submodule(name).state_dict().items():
            state[f"{name}.{key}"] = value
    return state


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``adapter_state_dict`` as whole CPU tensors, ready to write; ``{}`` on ranks other than 0
    when the model is sharded.

    Sharded (FSDP) tensors are all-gathered, so under FSDP every rank must call this
    (rank 0 keeps the result; the others drop each tensor as soon as it is gathered).
    """
    sharded = is_sharded_model(model)
    state = distributed.gather_tensors(adapter_state_dict(model), rank0_only=sharded)
    if sharded and distributed.rank() != 0:
        return {}
    return _unshare({k: v.contiguous() for k, v in state.items()})


def write_adapter(tensors: dict[str, torch.Tensor], config: AdapterConfig, path: str | os.PathLike) -> Path:
    """Write ``adapter.safetensors`` (``tensors``) and ``adapter_config.json`` (``config``) into ``path``."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt", "hybridpeft": __version__})
    meta = {**config.to_dict(), "hybridpeft_version": __version__}
    (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` into directory ``path``.

    A sharded (FSDP) model is gathered first: every rank must call this, and rank 0 alone
    writes (the whole tensors, once). Returns ``path``.
    """
    tensors = adapter_tensors(model)
    if is_sharded_model(model) and distributed.rank() != 0:
        return Path(path)
    return write_adapter(tensors, config_of(model), path)


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied embeddings); store copies.
    seen: set[int] = set()
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            state[key] = value.clone()
        seen.add(ptr)
    return state


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """The validated config of the adapter in directory ``path``.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` there.
        ValueError: it is not a JSON object, or a field is invalid (the message names the file).
    """
    config_path = Path(path) / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {path}")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config_path} is invalid: expected a JSON object of adapter settings, "
                         f"found a JSON {type(data).__name__}")
    data.pop("hybridpeft_version", None)
    if "peft_type" in data and "method" not in data:  # same file name, HF PEFT's format
        raise ValueError(f"{config_path} describes an HF PEFT adapter (peft_type={data['peft_type']!r}), not a "
                         "hybridpeft one: read it with hybridpeft.load_peft(model, path)")
    try:
        return AdapterConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{config_path}: {err}") from None


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter.safetensors`` in directory ``path`` (safetensors: no code runs).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: it is not a readable safetensors file, or a floating-point tensor holds
            NaN or ±inf (the key is named).
    """
    weights = Path(path) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {path}")
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error type for corrupt headers and truncation
        raise ValueError(f"{weights} is not a readable safetensors file: {err}") from None
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{weights}: key {key!r} holds non-finite values (NaN or inf); refusing to load it")
    return tensors


def _fit_problems(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> list[str]:
    """Every way ``loaded`` does not fit the model's adapter tensors ``expected`` (empty if it fits).

    A floating-point model tensor takes only a floating-point one (an integer or bool tensor
    there is refused: converting it would silently load nonsense); an integer model tensor
    (e.g. the Hybrid's step counter) takes only an integer one.
    """
    problems = []
    missing, unexpected = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
    if missing or unexpected:
        problems.append(f"missing keys {missing}, unexpected keys {unexpected}")
    for key in sorted(set(expected) & set(loaded)):
        target, value = expected[key], loaded[key]
        if value.shape != target.shape:
            problems.append(f"key {key!r}: saved shape {tuple(value.shape)} != model shape {tuple(target.shape)}")
        if target.is_floating_point() != value.is_floating_point() or (value.dtype == torch.bool) != (target.dtype == torch.bool):
            problems.append(f"key {key!r}: saved dtype {str(value.dtype).replace('torch.', '')} cannot be loaded into "
                            f"the model's {str(target.dtype).replace('torch.', '')} tensor")
    return problems


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Re-create the adapters described in ``path`` on ``model`` (a base model, or one
    already injected with the same method) and load their tensors.

    Everything is checked before any tensor is written (config, file, keys, shapes,
    dtypes, finiteness); if anything is wrong the model is left exactly as it was
    (a base model gets no adapters).

    Raises:
        ValueError: a key is missing or unexpected, a shape or dtype does not fit, a value is
            not finite (each named), the config is invalid, or the method differs.
    """
    config = read_adapter_config(path)
    loaded = read_adapter_tensors(path)
    if hasattr(model, CONFIG_ATTR):
        if config_of(model).method != config.method:
            raise ValueError(f"model carries method={config_of(model).method!r}, adapter has {config.method!r}")
    with undo_on_error(model):
        if not hasattr(model, CONFIG_ATTR):
            inject(model, config)
        expected = adapter_state_dict(model)
        problems = _fit_problems(expected, loaded)
        if problems:
            raise ValueError(f"adapter in {path} does not fit this model: " + "; ".join(problems))
    with torch.no_grad():
        for key, target in expected.items():
            distributed.assign(target, loaded[key])  # a sharded (FSDP) tensor keeps this rank's piece
    return model


def merge_and_unload(model: nn.Module) -> nn.Module | None:
    """Merge every adapter and put the plain layers back: a model with no hybridpeft inside.

    A layer with a 4-bit (bitsandbytes) base becomes a plain ``nn.Linear`` holding
    the dequantized, merged ``W'`` in float (the dtype ``W`` had before quantization;
    see ``AdaptedLinear.to_float_linear``); re-quantizing it would lose the adaptation.
    The model's other 4-bit layers stay as they are.

    A sharded (FSDP) model is first gathered into a plain copy on rank 0's CPU
    (``hybridpeft.fsdp.gather_model``; every rank must call this): rank 0 gets the merged
    plain model, the other ranks ``None``; the sharded model is left as it was.
    """
    if is_sharded_model(model):
        plain = gather_model(model, rank0_only=True)
        return None if plain is None else merge_and_unload(plain)
    for name, layer in adapted_layers(model):
        if layer.quantized:
            _replace(model, name, layer.to_float_linear())
            continue
        if not layer.merged:
            layer.merge()
        _replace(model, name, layer.base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    remove_prepare_hook(model)
    return model


# ---------------------------------------------------------------------------
# Mixed layers (the Hybrid's λ)


def _mixed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, adapter) of every adapted layer whose adapter mixes branches by a ``MixingRule``."""
    return [(name, layer.adapter) for name, layer in adapted_layers(model)
            if isinstance(getattr(layer.adapter, "rule", None), MixingRule)]


def mixing_state(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per Hybrid layer: ``{"lambda", "g_lora", "g_boft", "step"}`` (norms are NaN before the first step).

    One device→host transfer for the whole model.
    """
    layers = _mixed_layers(model)
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
    check(isinstance(steps, int) and steps > 0, "steps", steps, "a positive integer")
    for _, adapter in _mixed_layers(model):
        adapter.rule = replace(adapter.rule, anneal_steps=steps)
    config = config_of(model)
    if hasattr(config, "anneal_steps"):
        config.anneal_steps = steps  # so a saved adapter_config.json carries it


def needs_anneal_steps(model: nn.Module) -> bool:
    """Whether some Hybrid layer runs the ``"anneal"`` schedule without a length yet."""
    return any(a.rule.schedule == "anneal" and a.rule.anneal_steps is None for _, a in _mixed_layers(model))
