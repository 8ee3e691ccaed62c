"""The task interface shared by training, evaluation and the benchmark harness.

A task turns data files (or a hub dataset) into ``Example``s, knows how a model
should see them (causal LM prompt → target, or encoder + classification head),
and scores a model with its metric. Training only needs ``encode``; evaluation
only needs ``evaluate``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

IGNORE_INDEX = -100


@dataclass
class Example:
    """One item. ``prompt``/``target`` for generation and causal-LM training;
    ``label`` (class index) for classification; ``text_pair`` for sentence pairs."""

    prompt: str
    target: str = ""
    label: int | None = None
    text_pair: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class; subclasses set ``name``, ``kind``, ``metric`` and implement ``load``/``evaluate``.

    kind: ``"causal"`` (decoder LM; trained on prompt+target with the prompt masked)
    or ``"classification"`` (encoder with a head; trained on ``label``).
    """

    name: str = "task"
    kind: Literal["causal", "classification"] = "causal"
    metric: str = "accuracy"
    num_labels: int = 0

    def load(self, split: str, data_dir: str | None = None, limit: int | None = None, seed: int = 0) -> list[Example]:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, examples: list[Example], batch_size: int = 8) -> dict[str, float]:
        """Return ``{self.metric: value, ...}``; may add more metrics."""
        raise NotImplementedError

    def predictions(self, examples: list[Example]) -> list[dict[str, Any]]:
        """One record per example of the latest ``evaluate(…, examples)``: what went in (``input``),
        what the model produced (``output``), the ``reference`` and the per-example score
        (``correct``, sentence BLEU, …). Tasks that keep no per-example outputs return []."""
        outputs = list(getattr(self, "last_outputs", []) or [])
        if len(outputs) != len(examples):
            return []
        return [{"index": i, "input": ex.prompt, "output": out, "reference": ex.target if ex.label is None else ex.label}
                for i, (ex, out) in enumerate(zip(examples, outputs))]

    def encode(self, tokenizer: Any, examples: list[Example], max_length: int = 256) -> dict[str, torch.Tensor]:
        """A training batch for ``model(**batch)`` that returns a loss."""
        if self.kind == "classification":
            return encode_classification(tokenizer, examples, max_length)
        return encode_causal(tokenizer, examples, max_length)


def encode_causal(tokenizer: Any, examples: list[Example], max_length: int = 256) -> dict[str, torch.Tensor]:
    """Tokenize ``prompt + target``; labels are IGNORE_INDEX on the prompt and padding.

    Padding is on the right; rows longer than ``max_length`` are cut from the left
    of the prompt so the target survives.
    """
    rows, label_rows = [], []
    eos = tokenizer.eos_token_id
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = prompt_ids + target_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
        rows.append(ids[-max_length:])
        label_rows.append(labels[-max_length:])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(l)] = torch.tensor(l)
        attention[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def encode_classification(tokenizer: Any, examples: list[Example], max_length: int = 256) -> dict[str, torch.Tensor]:
    pairs = [ex.text_pair for ex in examples]
    enc = tokenizer(
        [ex.prompt for ex in examples],
        pairs if any(p is not None for p in pairs) else None,
        truncation=True, max_length=max_length, padding=True, return_tensors="pt",
    )
    enc["labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    return dict(enc)


def write_predictions(path: Any, records: list[dict[str, Any]]) -> None:
    """``records`` as JSON lines (UTF-8, non-ASCII kept readable), written atomically."""
    import json
    import os
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str, **kwargs: Any) -> Task:
    if name not in _TASKS:
        raise ValueError(f"task={name!r} is not known; known tasks: {sorted(_TASKS)}")
    return _TASKS[name](**kwargs)


def known_tasks() -> list[str]:
    return sorted(_TASKS)
