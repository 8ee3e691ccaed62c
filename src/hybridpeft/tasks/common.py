"""Behaviour shared by the concrete tasks: constructor options, sampling, prompt rendering."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..checks import check
from .base import Example, Task, encode_causal
from .data import finalize, k_shot, parse_split
from .lm import bos_text, chat_prompt, has_chat_template, validation_loss


class DataTask(Task):
    """Options every concrete task accepts.

    Args:
        k_shot: if set, the training split is cut to a stratified ``k_shot``
            sample (per label, or per language for XNLI) drawn with the seed:
            ``load`` does so for the task's own ``train_split`` (whatever its
            name, e.g. XNLI's ``dev[:50%]``) and for ``train…`` names, and
            ``few_shot_split`` does so for any split a job trains on, handing
            back the unchosen rest for validation. Other splits are untouched.
        report_loss: ``evaluate`` adds ``val_loss`` (and ``val_ppl`` for causal
            tasks) computed on the gold targets.
        max_length: token limit for training rows, loss and label scoring.
        progress: show tqdm progress bars during evaluation.

    Attributes:
        train_split / eval_split: the splits to use with the offline data in
            ``../shared/data`` (e.g. RTE ships only ``dev``, so it is halved).
    """

    k_shot_per: str = "label"
    train_split: str = "train"
    eval_split: str = "test"

    def __init__(self, k_shot: int | None = None, report_loss: bool = True, max_length: int = 512, progress: bool = True) -> None:
        check(k_shot is None or (isinstance(k_shot, int) and k_shot > 0), "k_shot", k_shot, "None or a positive integer")
        check(isinstance(max_length, int) and max_length > 1, "max_length", max_length, "an integer > 1")
        self.k_shot = k_shot
        self.report_loss = report_loss
        self.max_length = max_length
        self.progress = progress
        self.last_outputs: list[Any] = []  # per-example predictions of the latest evaluate(), for inspection

    def few_shot(self, examples: Sequence[Example], k: int, seed: int = 0) -> list[Example]:
        """``k_shot`` with this task's grouping (per label, or per language for XNLI)."""
        return k_shot(examples, k, seed, self.k_shot_per)

    def read(self, split: str, data_dir: str | None = None) -> list[Example]:
        """Every example of ``split`` (its slice applied), in file order: no ``k_shot``, no ``limit``."""
        raise NotImplementedError

    def load(self, split: str, data_dir: str | None = None, limit: int | None = None, seed: int = 0) -> list[Example]:
        """``read``, then ``k_shot`` if ``split`` is a training split (``is_training_split``), then ``limit``."""
        return self.finish(self.read(split, data_dir), split, limit, seed)

    def is_training_split(self, split: str) -> bool:
        """``split`` is the task's own ``train_split`` (same name and slice) or named ``train…``."""
        parsed = parse_split(split)
        return parsed.base.startswith("train") or parsed == parse_split(self.train_split)

    def finish(self, examples: list[Example], split: str, limit: int | None, seed: int) -> list[Example]:
        shots = self.k_shot if self.is_training_split(split) else None
        return finalize(examples, limit, seed, shots, self.k_shot_per)

    def few_shot_split(self, split: str, data_dir: str | None, seed: int) -> tuple[list[Example], list[Example]]:
        """``(shots, rest)`` of a split a job trains on, whatever its name: the ``k_shot`` sample
        and every example of the split not in it (file order), the place to draw validation
        examples from without touching the test split or the shots.

        Raises:
            ValueError: ``k_shot`` is not set, or a group has fewer examples than ``k_shot``.
        """
        if self.k_shot is None:
            raise ValueError(f"few_shot_split needs k_shot; task {self.name!r} has k_shot=None")
        pool = self.read(split, data_dir)
        shots = self.few_shot(pool, self.k_shot, seed)
        chosen = {id(ex) for ex in shots}
        return shots, [ex for ex in pool if id(ex) not in chosen]

    def loss_metrics(self, model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example], batch_size: int) -> dict[str, float]:
        if not self.report_loss or not examples:
            return {}
        loss = validation_loss(model, tokenizer, self, examples, batch_size, self.max_length)
        out = {"val_loss": loss}
        if self.kind != "classification":
            out["val_ppl"] = math.exp(min(loss, 50.0))
        return out


class CausalTask(DataTask):
    """A decoder-LM task: the model sees a rendered prompt and is trained on the target.

    Rendering (one function for training, scoring and generation):
    with a chat template, ``prompt`` becomes one user turn and the target is the
    assistant's reply; without one, ``prompt`` is used as is (after the BOS text if
    the tokenizer normally adds one) and the target follows ``target_sep``.

    Args:
        use_chat_template: ``None`` uses the template when the tokenizer has one.
    """

    kind = "causal"
    target_sep: str = " "

    def __init__(self, use_chat_template: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.use_chat_template = use_chat_template

    def chat(self, tokenizer: Any) -> bool:
        if self.use_chat_template is None:
            return has_chat_template(tokenizer)
        if self.use_chat_template and not has_chat_template(tokenizer):
            raise ValueError("use_chat_template=True is invalid: the tokenizer has no chat template")
        return bool(self.use_chat_template)

    def chat_content(self, ex: Example) -> str:
        """The user message for ``ex`` (override to add instructions)."""
        return ex.prompt

    def chat_target(self, ex: Example) -> str:
        return ex.target

    def render_prompt(self, tokenizer: Any, ex: Example) -> str:
        if self.chat(tokenizer):
            return chat_prompt(tokenizer, self.chat_content(ex))
        return bos_text(tokenizer) + ex.prompt

    def render_target(self, tokenizer: Any, ex: Example, target: str | None = None) -> str:
        if self.chat(tokenizer):
            return self.chat_target(ex) if target is None else target
        return self.target_sep + (ex.target if target is None else target)

    def encode(self, tokenizer: Any, examples: list[Example], max_length: int = 256) -> dict[str, torch.Tensor]:
        rendered = [
            Example(prompt=self.render_prompt(tokenizer, ex), target=self.render_target(tokenizer, ex), label=ex.label, meta=ex.meta)
            for ex in examples
        ]
        return encode_causal(tokenizer, rendered, max_length)
