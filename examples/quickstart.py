"""Wrap SmolLM2-135M (offline) with each method, train one step, merge, save.

Run: python examples/quickstart.py   (prints trainable parameters and checks)
"""
import tempfile

import torch

import hybridpeft as hp
from hybridpeft.models import load_causal_lm

CONFIGS = {
    "lora": lambda: hp.LoraConfig(r=8),
    "lora_ga": lambda: hp.LoraGAConfig(r=8),
    "boft": lambda: hp.BoftConfig(block_size=8, n_factors=3),
    "unitary-structured": lambda: hp.UnitaryConfig(parameterization="structured"),
    "unitary-full": lambda: hp.UnitaryConfig(parameterization="full", block_size=32),
    "hybrid": lambda: hp.HybridConfig(lora_r=8, boft_block_size=8),
    "dora": lambda: hp.DoraConfig(r=8),
    "ia3": lambda: hp.IA3Config(),  # k_proj, v_proj, down_proj (input side), as PEFT's default
}

torch.manual_seed(0)
_, tokenizer = load_causal_lm()
batch = tokenizer(["Question: 2 + 3 = ? Answer: 5"], return_tensors="pt")
for name, make_config in CONFIGS.items():
    model, _ = load_causal_lm()
    with torch.no_grad():
        base_logits = model(**batch).logits
    hp.inject(model, make_config())
    if name in ("lora_ga", "hybrid"):  # gradient-aligned start from two batches of data
        hp.lora_ga_init(model, [dict(batch, labels=batch["input_ids"])] * 2)
    optimizer = hp.build_optimizer(model, lr=1e-3)
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()
    hp.after_optimizer_step(model)
    optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        hp.merge(model)
        merged = model(**batch).logits
    with tempfile.TemporaryDirectory() as out:
        hp.save_adapter(model, out)
        if name in ("lora", "lora_ga", "dora", "ia3"):
            hp.export_peft(model, out + "/peft")  # HF PEFT's format as well
    print(f"{name:>20}: {hp.count_trainable(model):>9,d} trainable | loss {loss.item():.3f} | "
          f"moved {(adapted - base_logits).abs().max().item():.2e} | merge error {(merged - adapted).abs().max().item():.1e}")
