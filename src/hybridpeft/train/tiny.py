"""A tiny random-init Llama with a character-level tokenizer, saved as a normal model dir.

For tests and smoke runs of the training machinery: loads in milliseconds
through the same ``from_pretrained`` path as a real model, needs no download,
and trains in milliseconds per step. It knows nothing; it only has the shapes
of a Llama (``q/k/v/o_proj``, ``gate/up/down_proj``).
"""
from __future__ import annotations

import os
import string
from pathlib import Path

import torch

CHARS = string.ascii_letters + string.digits + " .,:;?!'\"-+*/=()\n"


def char_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per character (plus pad/eos/unk)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character alone
    backend.decoder = decoders.Fuse()  # join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tiny_causal_lm(path: str | os.PathLike, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """Write a random-init ``LlamaForCausalLM`` (hidden ``hidden_size``) and its tokenizer to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(path)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def smoke_overrides(model_dir: str | os.PathLike, run_dir: str | os.PathLike, steps: int = 8) -> list[str]:
    """``--set`` overrides for a seconds-long job on the tiny model (tests, CI smoke runs)."""
    return [
        f"model.name={model_dir}", f"output.run_dir={run_dir}", f"train.max_steps={steps}",
        "train.batch_size=4", "train.lr=1e-2", "train.save_every=2", "train.progress=false",
        "data.train_limit=48", "data.val_limit=8", "data.max_length=96",
        "eval.every=4", "eval.limit=8", "eval.batch_size=8",
        "adapter.target_modules=[q_proj,v_proj]",
    ]
