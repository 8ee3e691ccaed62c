"""Tiny random-init models shared by the tests (seeded).

In memory (eval mode) for the adapter tests; and ``save_tiny_causal_lm``: a Llama with a
character-level tokenizer saved as a normal model directory, which loads in milliseconds
through the same ``from_pretrained`` path as a real model and trains in milliseconds per
step, for tests of the training machinery. These models know nothing; they only have
the shapes of a Llama (``q/k/v/o_proj``, ``gate/up/down_proj``) or a GPT-2.
"""
from __future__ import annotations

import os
import string
from pathlib import Path

import torch
import transformers
from torch import nn


def output(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The model's output tensor: a plain module's result, or a transformers model's logits."""
    out = model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.3) -> None:
    """Move every trainable tensor by seeded-by-caller Gaussian noise of std ``scale``."""
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p) * scale)


def tiny_llama(dtype=torch.float32, kv_heads=2):
    """kv_heads=4 makes k/v_proj 32 wide, which BOFT b8 m3 needs (d divisible by b·2^(m−1))."""
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(dtype=torch.float32, **config):
    cfg = transformers.GPT2Config(**{"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, **config})
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 10)).to(dtype)


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
