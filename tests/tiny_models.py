"""Tiny random-init models shared by the adapter tests (seeded, eval mode)."""
import torch
import transformers
from torch import nn


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
