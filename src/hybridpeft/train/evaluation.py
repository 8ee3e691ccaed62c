"""Validation loss during training (sharded over ranks) and the task metric around it."""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F

from .. import distributed
from ..tasks import IGNORE_INDEX, Example, Task
from .data import eval_batches


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> tuple[torch.Tensor, int]:
    """(sum of per-token / per-example losses, their count) for one batch."""
    if kind == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()  # logits: (B, C)
    shifted = labels[:, 1:]  # (B, T-1): token t is predicted at position t-1
    loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((shifted != IGNORE_INDEX).sum())


@torch.no_grad()
def validation_loss(model: torch.nn.Module, tokenizer: Any, task: Task, examples: list[Example], batch_size: int,
                    max_length: int, accelerator: Any | None = None) -> float:
    """Mean loss per supervised token (causal) or example (classification) over ``examples``.

    ``L = Σ loss / Σ count``, pooled over the whole set (not a mean of batch means);
    under data parallelism each rank scores every ``world``-th example and the sums
    are all-reduced, so every rank gets the same value. A sharded (FSDP) model gathers
    its weights in every forward, so there each rank runs as many forwards as the
    busiest one (the extra ones on a throwaway batch).
    """
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum, count)
    done = 0
    try:
        for batch in eval_batches(task, tokenizer, examples, batch_size, max_length, rank, world):
            loss, count = _summed_loss(*_logits_and_labels(model, batch, device, accelerator), task.kind)
            total += torch.stack([loss.double(), torch.tensor(float(count), dtype=torch.float64, device=device)])
            done += 1
        if distributed.any_sharded(model.parameters()) and examples:
            # A sharded model all-gathers in every forward: each rank must run as many as the busiest one.
            busiest = math.ceil(math.ceil(len(examples) / world) / batch_size)
            for _ in range(busiest - done):
                _logits_and_labels(model, task.encode(tokenizer, examples[:1], max_length), device, accelerator)
    finally:
        model.train(was_training)
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, "sum")
    value = (total[0] / total[1].clamp_min(1)).item()
    return value if math.isfinite(value) else float("nan")


def _logits_and_labels(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                       accelerator: Any | None) -> tuple[torch.Tensor, torch.Tensor]:
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch.pop("labels")
    with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
        return model(**batch).logits, labels


def task_metrics(model: torch.nn.Module, tokenizer: Any, task: Task, examples: list[Example],
                 batch_size: int) -> dict[str, float]:
    """The task's own metric (e.g. exact match, accuracy, BLEU) on ``examples``."""
    if not examples:
        return {}
    return dict(task.evaluate(model, tokenizer, examples, batch_size=batch_size))
