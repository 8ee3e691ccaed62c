"""A ``transformers.Trainer`` callback for the per-step adapter bookkeeping.

``Trainer`` zeroes the gradients right after the optimizer step, and the Hybrid's
λ update reads them. Its loop (transformers 5.x) runs, per optimizer step:
clip → ``on_pre_optimizer_step`` → ``optimizer.step()`` → ``on_optimizer_step``
→ scheduler → ``model.zero_grad()`` → ``on_step_end``. ``on_optimizer_step`` is
therefore the one event after the update with the (clipped, accumulated,
data-parallel-reduced) gradients still present; ``on_step_end`` would see none.
"""
from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .api import after_optimizer_step
from .api import mixing_state, needs_anneal_steps, set_anneal_steps


class HybridPeftCallback(TrainerCallback):
    """Calls ``hybridpeft.after_optimizer_step(model)`` once per optimizer step.

    That moves the Hybrid's λ, enforces LoRA norm bounds and anything else an
    adapter does per step. It also fills the Hybrid's ``anneal_steps`` from
    ``state.max_steps`` at the start of training when the config left it unset,
    keeps ``history`` (``(global_step, mixing_state(model))`` at every logging
    step) and adds ``mixing/lambda_{mean,min,max}`` to ``state.log_history`` and to the
    logs dict (which only callbacks after this one see: ``Trainer`` puts its
    ``report_to`` integrations before user callbacks).

    Args:
        keep_history: record ``history``; off saves a host sync per logging step.
    """

    def __init__(self, keep_history: bool = True) -> None:
        self.keep_history = keep_history
        self.history: list[tuple[int, dict[str, dict[str, float]]]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and needs_anneal_steps(model) and state.max_steps and state.max_steps > 0:
            set_anneal_steps(model, int(state.max_steps))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            after_optimizer_step(model)

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
