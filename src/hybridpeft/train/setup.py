"""Building the pieces of a run from a ``JobConfig``: task data, model, adapters, optimizer, schedule.

Everything here is method-agnostic: the adapter config object comes from the
registry and the optimizer from ``hybridpeft.optim.build_optimizer`` (AdamW plus
Riemannian groups for manifold tensors). The loop itself starts LoRA-GA parts
with ``hybridpeft.gradient_init.lora_ga_init``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
from typing import Any, Callable

import torch
from torch import nn

from ..adapters.config import AdapterConfig
from ..api import needs_anneal_steps, set_anneal_steps
from ..inject import inject
from ..optim import build_optimizer as build_adapter_optimizer
from ..tasks import Example, Task, get_task
from .job_config import JobConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_task(job: JobConfig) -> Task:
    return get_task(job.data.task, **job.data.task_args)


def split_name(task: Task, job_value: str | None, attribute: str, fallback: str) -> str:
    """A configured split, else the task's own preference (e.g. RTE trains on part of ``dev``)."""
    return job_value if job_value is not None else getattr(task, attribute, fallback)


def load_splits(job: JobConfig, task: Task) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples.

    With ``data.val_split`` unset, validation is a held-out slice of the
    training split: a seeded permutation puts ``val_limit`` examples aside
    before ``train_limit`` is applied, so the test split stays untouched.
    """
    train_split = split_name(task, job.data.train_split, "train_split", "train")
    data_dir, seed = job.data.data_dir, job.train.seed
    if job.data.val_split is not None:
        train = task.load(train_split, data_dir, job.data.train_limit, seed)
        val = task.load(job.data.val_split, data_dir, job.data.val_limit, seed)
        return train, val
    n_val = job.data.val_limit or 0
    wanted = None if job.data.train_limit is None else job.data.train_limit + n_val
    pool = task.load(train_split, data_dir, wanted, seed)
    order = list(range(len(pool)))
    random.Random(f"holdout/{seed}").shuffle(order)
    if n_val >= len(pool):
        raise ValueError(f"data.val_limit={n_val} leaves no training examples from the {len(pool)} in split "
                         f"{train_split!r}; lower it or set data.val_split")
    val = [pool[i] for i in sorted(order[:n_val])]
    train = [pool[i] for i in sorted(order[n_val:])]
    if job.data.train_limit is not None:
        train = train[: job.data.train_limit]
    return train, val


def load_model(name: str, task: Task, dtype: str = "float32", empty: bool = False, quantization: str | None = None,
               compute_dtype: str | None = None, device: torch.device | str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer): a causal LM for causal tasks, an encoder with a fresh head otherwise.

    ``empty``: build the architecture with parameters on the ``meta`` device and read no
    weights (the ranks of a RAM-efficient sharded run other than 0; see ``train/parallel.py``).
    ``quantization`` (``nf4``/``fp4``/``int8``), ``compute_dtype``: a bitsandbytes base, loaded
    onto ``device`` (see ``hybridpeft.models.quantization_kwargs``).
    """
    from ..models import load_causal_lm, load_sequence_classifier

    kwargs = dict(dtype=_DTYPES[dtype], empty=empty, quantization=quantization, device=device,
                  compute_dtype=_DTYPES[compute_dtype] if compute_dtype else None)
    if task.kind == "classification":
        return load_sequence_classifier(name, num_labels=task.num_labels, **kwargs)
    return load_causal_lm(name, **kwargs)


def load_job_model(job: JobConfig, name: str, task: Task, empty: bool = False,
                   device: torch.device | str | None = None) -> tuple[nn.Module, Any]:
    """``load_model`` with the job's ``model`` section (dtype, quantization)."""
    m = job.model
    return load_model(name, task, m.dtype, empty=empty, quantization=m.quantization, compute_dtype=m.compute_dtype,
                      device=device)


def head_modules(model: nn.Module) -> list[str]:
    """The freshly initialized classification head of a transformers sequence classifier.

    Names are the attributes transformers uses for it (``classifier`` for BERT-like
    models, ``score`` for decoder classifiers); the head must train and be saved.
    """
    return [name for name in ("classifier", "score") if isinstance(getattr(model, name, None), nn.Module)]


def adapter_config_for(job: JobConfig, model: nn.Module, task: Task) -> AdapterConfig:
    """The job's adapter config, with a classification head added to ``trainable_modules``."""
    config = copy.deepcopy(job.adapter)
    if task.kind == "classification" and config.method != "full":
        missing = [h for h in head_modules(model) if h not in config.trainable_modules]
        if missing:
            config = dataclasses.replace(config, trainable_modules=list(config.trainable_modules) + missing)
    return config


def prepare_model(model: nn.Module, job: JobConfig, task: Task, checkpointing: bool = False) -> nn.Module:
    """Gradient checkpointing (if ``model.gradient_checkpointing`` or ``checkpointing``) and adapter injection."""
    if job.model.gradient_checkpointing or checkpointing:
        enable_activation_checkpointing(model)
    return inject(model, adapter_config_for(job, model, task))


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """transformers' activation checkpointing per block, non-reentrant; returns ``model``.

    Non-reentrant: with a frozen base no block input requires grad, and the reentrant
    variant would then compute no gradient for the adapters inside the blocks. Every
    method's custom autograd Function runs again in the recomputation (tests/test_checkpointing.py).

    Raises:
        ValueError: the model has no checkpointing support (named).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"model.gradient_checkpointing=True is invalid: {type(model).__name__} does not support it")
    if hasattr(model, "config"):
        model.config.use_cache = False
    return model


def set_schedule_length(model: nn.Module, total_steps: int) -> None:
    """Tell step-based adapter schedules (the Hybrid's ``anneal``) how long the run is,
    unless the adapter config fixed it."""
    if needs_anneal_steps(model):
        set_anneal_steps(model, total_steps)


def build_optimizer(model: nn.Module, job: JobConfig) -> torch.optim.Optimizer:
    """``hybridpeft.optim.build_optimizer`` with the job's hyperparameters."""
    t = job.train
    return build_adapter_optimizer(model, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas), eps=t.eps,
                                   riemannian=t.riemannian, riemannian_lr=t.riemannian_lr)


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base lr after ``k`` scheduler steps.

    Warm-up ``(k + 1) / (warmup + 1)`` for ``k < warmup`` (never exactly 0, so no
    step is wasted); then ``constant`` 1, ``linear`` 1 → ``min_ratio``, or
    ``cosine`` ``min_ratio + (1 − min_ratio) · ½ (1 + cos(π p))`` with ``p`` the
    fraction of post-warm-up steps done.
    """

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (k - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return min_ratio + (1 - min_ratio) * (1 - progress)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, job: JobConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    t = job.train
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.schedule, t.warmup_steps, total_steps, t.min_lr_ratio))
