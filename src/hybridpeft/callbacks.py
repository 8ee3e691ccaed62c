"""A ``transformers.Trainer`` callback: LoRA-GA's start, the per-step adapter bookkeeping,
adapter-only checkpoints.

``Trainer`` zeroes the gradients right after the optimizer step, and the Hybrid's
λ update reads them. Its loop (transformers 5.x) runs, per optimizer step:
clip → ``on_pre_optimizer_step`` → ``optimizer.step()`` → ``on_optimizer_step``
→ scheduler → ``model.zero_grad()`` → ``on_step_end``. ``on_optimizer_step`` is
therefore the one event after the update with the (clipped, accumulated,
data-parallel-reduced) gradients still present; ``on_step_end`` would see none.

``on_train_begin`` comes after the Trainer built its training dataloader and optimizer
(and, when resuming, after it loaded the checkpoint); ``on_save`` after it wrote
``checkpoint-<step>/``.
"""
from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from .api import after_optimizer_step, mixing_state, needs_anneal_steps, save_adapter, set_anneal_steps
from .inject import config_of

logger = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"  # our format, beside the Trainer's own checkpoint files
PEFT_ADAPTER_DIR = "adapter-peft"  # HF PEFT's format, for methods that have one


class HybridPeftCallback(TrainerCallback):
    """Everything a ``transformers.Trainer`` run of a hybridpeft model needs, with no manual step.

    - **Train begin**: for ``lora_ga`` / ``hybrid`` models, ``hybridpeft.lora_ga_init`` on
      the first ``num_batches`` batches (default: the config's) of the Trainer's own training
      dataloader — skipped when resuming (``global_step > 0``) or when the start was already
      set (a non-zero ``B0``, e.g. ``lora_ga_init`` called by hand). The batches come from the
      dataloader underneath accelerate's wrapper, so the wrapper's epoch bookkeeping is not
      disturbed; drawing them advances the sampler's random state like one more epoch start.
      It also fills the Hybrid's ``anneal_steps`` from ``state.max_steps`` when unset.
    - **Every optimizer step**: ``hybridpeft.after_optimizer_step(model)`` (the Hybrid's λ,
      LoRA norm bounds, re-orthonormalization).
    - **Every checkpoint** (``on_save``) and **the end of training**: adapter-only copies,
      ``<checkpoint or output_dir>/adapter/`` in our format (``hybridpeft.load_adapter``) and,
      for methods PEFT can hold (LoRA, LoRA-GA as a rank-2r LoRA, DoRA, IA³),
      ``…/adapter-peft/`` in HF PEFT's (``peft.PeftModel.from_pretrained``, vLLM, TGI).
      Written by the main process only.
    - **Logging**: ``history`` (``(global_step, mixing_state(model))`` at every logging step)
      and ``mixing/lambda_{mean,min,max}`` in ``state.log_history`` and the logs dict (which
      only callbacks after this one see: ``Trainer`` puts its ``report_to`` integrations
      before user callbacks).

    Args:
        keep_history: record ``history``; off saves a host sync per logging step.
        lora_ga_init: run the LoRA-GA start at train begin.
        num_batches: batches for that estimate (default: the adapter config's ``num_batches``).
        loss_fn: ``(model, batch) -> loss`` for it (default: ``model(**batch).loss``).
        save_adapters: write the adapter-only copies.
        peft_format: also write the PEFT-format copy where the method has one.
        base_model_name_or_path: recorded in it (default: the model's ``config._name_or_path``).
    """

    def __init__(self, keep_history: bool = True, lora_ga_init: bool = True, num_batches: int | None = None,
                 loss_fn: Callable[..., Any] | None = None, save_adapters: bool = True, peft_format: bool = True,
                 base_model_name_or_path: str | None = None) -> None:
        self.keep_history = keep_history
        self.run_lora_ga_init = lora_ga_init
        self.num_batches = num_batches
        self.loss_fn = loss_fn
        self.save_adapters = save_adapters
        self.peft_format = peft_format
        self.base_model_name_or_path = base_model_name_or_path
        self.history: list[tuple[int, dict[str, dict[str, float]]]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, train_dataloader: Any = None,
                       **kwargs: Any) -> None:
        if model is None:
            return
        if needs_anneal_steps(model) and state.max_steps and state.max_steps > 0:
            set_anneal_steps(model, int(state.max_steps))
        if self.run_lora_ga_init and state.global_step == 0:
            self._lora_ga_start(model, train_dataloader)

    def _lora_ga_start(self, model: Any, train_dataloader: Any) -> None:
        from .gradient_init import default_loss, lora_ga_init, lora_ga_targets

        targets = lora_ga_targets(model)
        if not targets:
            return
        if any(bool((part.lora_B0 != 0).any()) for _, part in targets.values()):
            logger.info("LoRA-GA start already set (lora_ga_init ran before training); not estimating again")
            return
        if train_dataloader is None:
            raise ValueError("HybridPeftCallback(lora_ga_init=True) needs the Trainer's training dataloader; "
                             "pass a train_dataset, or call hybridpeft.lora_ga_init yourself and set lora_ga_init=False")
        n = self.num_batches or config_of(model).lora_ga_config().num_batches
        source = getattr(train_dataloader, "base_dataloader", train_dataloader)  # under accelerate's wrapper
        batches = list(islice(iter(source), n))
        logger.info("LoRA-GA start: estimating the weight gradients over %d batches of the training data", len(batches))
        lora_ga_init(model, batches, num_batches=len(batches), loss_fn=self.loss_fn or default_loss)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            after_optimizer_step(model)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        self._save(model, state, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._save(model, state, Path(args.output_dir))

    def _save(self, model: Any, state: Any, where: Path) -> None:
        if not self.save_adapters or model is None or not state.is_world_process_zero:
            return
        save_adapter(model, where / ADAPTER_DIR)
        if self.peft_format:
            from .peft_format import EXPORTABLE, export_peft

            if config_of(model).method in EXPORTABLE:
                export_peft(model, where / PEFT_ADAPTER_DIR, base_model_name_or_path=self.base_model_name_or_path)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            return
        layers = mixing_state(model)
        if not layers:
            return
        if self.keep_history and (not self.history or self.history[-1][0] != state.global_step):
            self.history.append((state.global_step, layers))  # the end-of-training log repeats the last step
        lams = [v["lambda"] for v in layers.values()]
        summary = {"mixing/lambda_mean": sum(lams) / len(lams), "mixing/lambda_min": min(lams), "mixing/lambda_max": max(lams)}
        if logs is not None:
            logs.update(summary)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(summary)  # Trainer appended this entry before calling on_log
