"""LoRA-GA in a plain ``transformers.Trainer``: no manual initialization step.

``HybridPeftCallback`` estimates the gradient-aligned start from the Trainer's own
training batches when training begins, runs the per-step bookkeeping, and writes
adapter-only checkpoints: ``checkpoint-N/adapter`` (ours, ``hp.load_adapter``) and
``checkpoint-N/adapter-peft`` (HF PEFT's format: ``peft.PeftModel.from_pretrained``,
vLLM, TGI), plus the same two at the end of training in ``--out``.

    python examples/trainer_lora_ga.py                        # SmolLM2-135M (offline), 20 steps (~5 min on a busy 2-core CPU)
    python examples/trainer_lora_ga.py --max-steps 60 --out runs/trainer-lora-ga
    python examples/trainer_lora_ga.py --model path/or/hub-id # any causal LM with q_proj/v_proj
"""
from __future__ import annotations

import argparse
import random

import torch
from torch.utils.data import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import hybridpeft as hp
from hybridpeft.callbacks import HybridPeftCallback
from hybridpeft.models import hub_id, load_causal_lm


class Sums(Dataset):
    """'Question: 7 + 5 = ? Answer: 12' lines, tokenized (the collator makes the labels)."""

    def __init__(self, tokenizer, n: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        pairs = [(rng.randint(1, 50), rng.randint(1, 50)) for _ in range(n)]
        self.rows = [tokenizer(f"Question: {a} + {b} = ? Answer: {a + b}")["input_ids"] for a, b in pairs]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.rows[i]}


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="offline alias, local dir or hub id")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--out", default="runs/trainer-lora-ga")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(args.model)
    hp.inject(model, hp.LoraGAConfig(target_modules=["q_proj", "v_proj"], r=8, alpha=16, num_batches=4))
    data = Sums(tokenizer, 256)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    training = TrainingArguments(
        output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=8, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=2, logging_steps=5, save_steps=max(1, args.max_steps // 2),
        report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=data, data_collator=collator,
                      callbacks=[HybridPeftCallback(base_model_name_or_path=hub_id(args.model))])
    probe = collator([data[i] for i in range(8)])
    with torch.no_grad():
        before = model(**probe).loss.item()  # the LoRA-GA start leaves the output unchanged
    trainer.train()
    with torch.no_grad():
        after = model.eval()(**probe).loss.item()
    print(f"loss on 8 training lines: {before:.3f} before, {after:.3f} after {args.max_steps} steps")
    print(f"adapter (ours): {args.out}/adapter    PEFT format: {args.out}/adapter-peft")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
