"""Random-init Llama models of named sizes, the shared batch, and the NF4 base.

The GPU shapes copy the public configs of Llama-3.2-1B and Llama-3.1-8B (width,
depth, heads, GQA, MLP width, vocabulary, tied head for 1B); weights are random,
which is all a step-time benchmark needs. ``tiny`` exists for tests and dry runs,
``cpu-small`` for the CPU table (every projection width a multiple of 32, so a
BOFT with 8×8 blocks and 3 butterfly factors fits every target).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelSize:
    """Architecture and default batch of one benchmark size.

    Args:
        hidden, intermediate, layers, heads, kv_heads, vocab: Llama shape.
        tie: tie the output head to the input embeddings.
        batch, seq: default tokens per step, ``batch × seq``.
    """

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie: bool
    batch: int
    seq: int
    rope_theta: float = 500000.0


SIZES: dict[str, ModelSize] = {
    s.name: s
    for s in (
        ModelSize("tiny", 64, 128, 2, 4, 2, 256, False, 2, 16),
        ModelSize("cpu-small", 512, 1536, 8, 8, 4, 8192, False, 2, 128),
        ModelSize("1b", 2048, 8192, 16, 32, 8, 128256, True, 4, 1024),
        ModelSize("8b", 4096, 14336, 32, 32, 8, 128256, False, 2, 1024),
    )
}

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_config(size: ModelSize):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        vocab_size=size.vocab,
        tie_word_embeddings=size.tie,
        rope_parameters={"rope_theta": size.rope_theta, "rope_type": "default"},
        max_position_embeddings=max(2048, size.seq),
        use_cache=False,
    )


def build_model(size: ModelSize, device: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """A random-init ``LlamaForCausalLM`` created directly on ``device`` in ``dtype``.

    Creating it on the device in its final dtype matters at 8B: a float32 CPU
    build followed by a cast would take minutes and 32 GB of host memory.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(llama_config(size), dtype=dtype)
    model.train()
    return model


def make_batch(size: ModelSize, device: str, seed: int, batch: int | None = None, seq: int | None = None) -> Tensor:
    """Token ids (batch, seq), identical for every method of a run; they double as labels."""
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (batch or size.batch, seq or size.seq)
    return torch.randint(0, size.vocab, shape, generator=gen).to(device)


def quantize_targets_nf4(model: nn.Module, targets: tuple[str, ...], compute_dtype: torch.dtype) -> int:
    """Replace every target ``nn.Linear`` with a bitsandbytes NF4 ``Linear4bit``, in place.

    Returns the number of layers replaced. The quantization happens when the
    ``Params4bit`` is moved to the layer's device, as bitsandbytes does it.

    Raises:
        ImportError: bitsandbytes is not installed.
    """
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.named_modules()):
        if not (type(module) is nn.Linear and name.rsplit(".", 1)[-1] in targets):
            continue
        device = module.weight.device
        q = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None,
            compute_dtype=compute_dtype, quant_type="nf4", device="cpu",
        )
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        q = q.to(device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        count += 1
    return count
