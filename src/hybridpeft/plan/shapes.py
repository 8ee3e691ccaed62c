"""Model shapes for the planner: named shapes, a config.json, a local directory or a hub id — no weights.

``resolve_config`` turns the ``--model`` argument into a transformers config; ``inventory``
builds the model on the meta device (no memory, no weights) and lists what the byte
formulas need: every parameter (with the decoder layer it belongs to), the adapted linear
layers and their shapes, and the dimensions of the activation formulas.

Named shapes copy the public configs of the paper's models (DESIGN §5) and the CPU
benchmark shapes (``benchmarks/perf_models.py``, SmolLM2-135M).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

LLAMA_TYPES = ("llama", "mistral", "qwen2")
BLOOM_TYPES = ("bloom",)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOOM_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def _llama(hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, vocab: int, tie: bool) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "tie_word_embeddings": tie, "max_position_embeddings": 131072}


NAMED_SHAPES: dict[str, dict[str, Any]] = {
    # the paper's models (public configs)
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, 128256, False),
    "llama-3.3-70b": _llama(8192, 28672, 80, 64, 8, 128256, False),
    "llama-3.1-405b": _llama(16384, 53248, 126, 128, 8, 128256, False),
    "bloomz-7b1": {"model_type": "bloom", "hidden_size": 4096, "n_layer": 30, "n_head": 32, "vocab_size": 250880},
    "wizard-vicuna-30b": _llama(6656, 17920, 60, 52, 52, 32000, False),
    # CPU shapes of benchmarks/perf_models.py and the offline SmolLM2
    "tiny": _llama(64, 128, 2, 4, 2, 256, False),
    "cpu-small": _llama(512, 1536, 8, 8, 4, 8192, False),
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, 128256, True),
    "smollm2-135m": _llama(576, 1536, 30, 9, 3, 49152, True),
}


class PlanInputError(ValueError):
    """A bad planner input: the message names the field and the value (the CLI exits 2)."""


def resolve_config(model: str):
    """A transformers config for a named shape, a ``config.json``, a directory holding one, or a hub id.

    Raises:
        PlanInputError: the name is none of these (the hub is tried last; offline it fails).
    """
    from transformers import AutoConfig, CONFIG_MAPPING

    if model in NAMED_SHAPES:
        data = dict(NAMED_SHAPES[model])
        return CONFIG_MAPPING[data.pop("model_type")](**data)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise PlanInputError(f"model={model!r} is invalid: no config.json at {path}")
        try:
            data = json.loads(path.read_text())
            return CONFIG_MAPPING[data.pop("model_type")](**data)
        except (ValueError, KeyError, TypeError) as err:
            raise PlanInputError(f"model={model!r} is invalid: {path} is not a transformers config.json ({err})") from None
    try:
        return AutoConfig.from_pretrained(model)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated repo: all one message
        names = ", ".join(NAMED_SHAPES)
        raise PlanInputError(f"model={model!r} is invalid: not a named shape ({names}), a config.json, a directory "
                             f"with one, or a reachable hub id ({type(err).__name__})") from None


@dataclass(frozen=True)
class Dims:
    """What the activation formulas read: widths, heads, vocabulary and the family's layout."""

    family: str  # "llama" or "bloom"
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool


@dataclass
class Linear:
    """One linear layer of the decoder: its qualified name, short name, shape and decoder layer."""

    name: str
    short: str
    d_in: int
    d_out: int
    layer: int | None
    bias: bool = False


@dataclass
class Inventory:
    """Parameters and linear layers of a model built on the meta device."""

    dims: Dims
    param_numel: dict[str, int]  # every parameter (tied ones once)
    param_layer: dict[str, int | None]  # decoder layer index, None outside the layers
    linears: dict[str, Linear]  # every nn.Linear (the head included)
    head: str | None  # the output head's name
    targets: list[str] = field(default_factory=list)

    def linear_weight_numel(self, names) -> int:
        return sum(self.linears[n].d_in * self.linears[n].d_out for n in names)


def family_of(config) -> str:
    if config.model_type in LLAMA_TYPES:
        return "llama"
    if config.model_type in BLOOM_TYPES:
        return "bloom"
    raise PlanInputError(f"model_type={config.model_type!r} is invalid: the planner knows the llama family "
                         f"({', '.join(LLAMA_TYPES)}) and bloom")


def dims_of(config) -> Dims:
    family = family_of(config)
    if family == "llama":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return Dims("llama", config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                    config.num_key_value_heads or heads, head_dim, config.vocab_size,
                    bool(config.tie_word_embeddings))
    heads = config.n_head
    return Dims("bloom", config.hidden_size, 4 * config.hidden_size, config.n_layer, heads, heads,
                config.hidden_size // heads, config.vocab_size, True)


def default_targets(family: str) -> list[str]:
    return list(LLAMA_TARGETS if family == "llama" else BLOOM_TARGETS)


def meta_model(config) -> nn.Module:
    """The causal LM of ``config`` with every tensor on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def inventory(config, target_modules: list[str] | None = None) -> Inventory:
    """Build the model on the meta device and list its parameters and linear layers.

    Args:
        config: a transformers config (``resolve_config``).
        target_modules: adapter targets (names, suffixes, ``re:`` patterns or ``"all-linear"``,
            as ``inject`` reads them); ``None``: the family's seven (or four) projections.

    Raises:
        PlanInputError: a target pattern matches nothing or an unsupported module.
    """
    from ..inject import find_targets

    dims = dims_of(config)
    model = meta_model(config)
    param_numel = {n: p.numel() for n, p in model.named_parameters()}
    head_module = model.get_output_embeddings()
    head = next((n for n, m in model.named_modules() if m is head_module), None)
    linears = {n: Linear(n, n.rsplit(".", 1)[-1], m.in_features, m.out_features, _layer_index(n), m.bias is not None)
               for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    try:
        targets = find_targets(model, target_modules or default_targets(dims.family))
    except ValueError as err:
        raise PlanInputError(str(err)) from None
    return Inventory(dims, param_numel, {n: _layer_index(n) for n in param_numel}, linears, head, targets)
