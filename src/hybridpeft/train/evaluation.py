"""The task metric on evaluation examples (the validation loss is ``hybridpeft.tasks.lm.validation_loss``)."""
from __future__ import annotations

from typing import Any

import torch

from ..tasks import Example, Task


def task_metrics(model: torch.nn.Module, tokenizer: Any, task: Task, examples: list[Example],
                 batch_size: int) -> dict[str, float]:
    """The task's own metric (e.g. exact match, accuracy, BLEU) on ``examples``."""
    if not examples:
        return {}
    return dict(task.evaluate(model, tokenizer, examples, batch_size=batch_size))
