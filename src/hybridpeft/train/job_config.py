"""The training job's configuration: typed sections, YAML + ``--set`` overrides, validation.

A job is a YAML mapping with the sections ``model``, ``data``, ``adapter``,
``train``, ``fsdp``, ``eval``, ``output`` and ``debug`` (see ``configs/default.yaml``).
Resolution order: the built-in defaults, then the YAML file, then each
``--set dotted.key=value`` (the value parsed as YAML, so ``[q_proj, v_proj]``
is a list and ``2e-4`` a float).

Validation happens before anything heavy is loaded and reports *every* problem
at once, each as ``section.field=value is invalid: expected ...`` — one
``ConfigError`` listing all of them.

The ``adapter`` section is generic over methods: ``method`` picks a config
class from the registry (``hybridpeft.adapters.config.config_class``); the fields shared
by all methods (``target_modules``, ``adapter_dtype``, ``trainable_modules``)
sit beside it; method-specific fields go either flat (``adapter.r``) or in a
sub-mapping named after the method (``adapter.lora.r``). Sub-mappings for other
methods are validated too but otherwise ignored, so one file can carry settings
for several methods and ``--set adapter.method=boft`` just switches.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..adapters.config import AdapterConfig, config_class, known_methods
from ..models import looks_like_path

SECTIONS = ("model", "data", "adapter", "train", "fsdp", "eval", "output", "debug")


class ConfigError(ValueError):
    """Every problem found in a job config; ``errors`` lists them, one line each."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("invalid configuration (%d problem%s):\n  %s" % (
            len(self.errors), "" if len(self.errors) == 1 else "s", "\n  ".join(self.errors)))


class _Errors:
    """Collects ``field=value is invalid`` messages instead of raising at the first."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, condition: bool, name: str, value: Any, expected: str) -> None:
        if not condition:
            self.items.append(f"{name}={value!r} is invalid: expected {expected}")

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _optional_positive_int(value: Any) -> bool:
    return value is None or _positive_int(value)


@dataclass
class ModelSection:
    """Args:
        name: a hub id, a local directory, or an offline name (``smollm2-135m``,
            ``minilm-l6``); ``None`` picks ``smollm2-135m`` for causal tasks and
            ``minilm-l6`` for classification tasks.
        dtype: dtype the base weights are loaded in (and the adapters' dtype on a quantized base
            is float32 unless ``adapter.adapter_dtype`` says otherwise).
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower);
            transformers' non-reentrant checkpointing per block, with every method.
        quantization: load the base quantized by bitsandbytes (through transformers'
            ``BitsAndBytesConfig``): ``nf4`` or ``fp4`` (4-bit, the QLoRA setting) or ``int8``
            (LLM.int8()); null = as stored. Adapters stay in float; eval and merge of the run
            load the base the same way (``hybridpeft merge`` writes a float model).
        compute_dtype: the dtype 4-bit layers compute in; null = ``dtype``.
    """

    name: str | None = None
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    quantization: str | None = None
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        e = _Errors()
        e.check(self.name is None or (isinstance(self.name, str) and self.name != ""), "name", self.name,
                "null or a model name / directory")
        if isinstance(self.name, str) and (looks_like_path(self.name) or Path(self.name).expanduser().exists()):
            e.check(Path(self.name).expanduser().is_dir(), "name", self.name, "an existing model directory")
        e.check(self.dtype in ("float32", "bfloat16", "float16"), "dtype", self.dtype,
                "'float32', 'bfloat16' or 'float16'")
        e.check(isinstance(self.gradient_checkpointing, bool), "gradient_checkpointing",
                self.gradient_checkpointing, "true or false")
        e.check(self.quantization in (None, "nf4", "fp4", "int8"), "quantization", self.quantization,
                "null, 'nf4', 'fp4' or 'int8'")
        if self.quantization is not None:
            e.check(importlib.util.find_spec("bitsandbytes") is not None, "quantization", self.quantization,
                    "null, or the 'bitsandbytes' package installed (pip install 'bitsandbytes>=0.49')")
        e.check(self.compute_dtype in (None, "float32", "bfloat16", "float16"), "compute_dtype", self.compute_dtype,
                "null, 'float32', 'bfloat16' or 'float16'")
        if self.compute_dtype is not None:
            e.check(self.quantization in ("nf4", "fp4"), "compute_dtype", self.compute_dtype,
                    f"null unless model.quantization is 'nf4' or 'fp4' (it is {self.quantization!r})")
        e.raise_if_any()


@dataclass
class DataSection:
    """Args:
        task: a registered task name (``hybridpeft.tasks.known_tasks()``).
        task_args: keyword arguments for the task's constructor.
        data_dir: local data files for tasks that read them (else the task's own source).
        train_split: the training split; null = the task's own choice (``task.train_split``, else "train").
        val_split: split for the validation loss; null = hold out ``val_limit`` examples
            of the training split (seeded), so the test split is never looked at.
        train_limit / val_limit: cap the number of examples (None = all).
        max_length: tokens per training row (prompts are cut from the left).
    """

    task: str = "arith"
    task_args: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    train_split: str | None = None
    val_split: str | None = None
    train_limit: int | None = None
    val_limit: int | None = 64
    max_length: int = 256

    def __post_init__(self) -> None:
        from ..tasks import known_tasks

        e = _Errors()
        e.check(self.task in known_tasks(), "task", self.task, f"one of {known_tasks()}")
        e.check(isinstance(self.task_args, dict), "task_args", self.task_args, "a mapping")
        if self.data_dir is not None:
            e.check(Path(str(self.data_dir)).expanduser().is_dir(), "data_dir", self.data_dir,
                    "null or an existing directory")
        for name in ("train_split", "val_split"):
            value = getattr(self, name)
            e.check(value is None or (isinstance(value, str) and value != ""), name, value, "null or a split name")
        e.check(_optional_positive_int(self.train_limit), "train_limit", self.train_limit, "null or a positive integer")
        e.check(_optional_positive_int(self.val_limit), "val_limit", self.val_limit, "null or a positive integer")
        e.check(_positive_int(self.max_length) and self.max_length >= 8, "max_length", self.max_length,
                "an integer >= 8")
        e.raise_if_any()


@dataclass
class TrainSection:
    """Args:
        seed: seeds python, numpy and torch (every rank), and the data order.
        max_steps: optimizer steps; ``epochs`` instead gives the budget in passes over the data.
        batch_size: examples per device per micro-batch; the effective batch is
            ``batch_size * grad_accum * world_size``.
        lr, weight_decay, betas, eps: AdamW (the Riemannian groups, if any, use ``lr`` too).
        lr_lora, lr_boft: the Hybrid's branch learning rates (the paper's η_LoRA for the
            LoRA-GA branch's A, B and η_BOFT for the BOFT branch's Q); null = ``lr``. Only
            for ``adapter.method: hybrid``; the same schedule scales both.
        schedule: ``cosine`` (to ``min_lr_ratio * lr``), ``linear`` or ``constant``, after
            ``warmup_steps`` of linear warm-up.
        max_grad_norm: clip the global gradient norm (null = measure only).
        mixed_precision: ``auto`` (bf16 on a CUDA device that supports it, else fp32),
            ``no``, ``bf16`` or ``fp16`` (CUDA only).
        save_every: checkpoint every N optimizer steps (0 = only at the end);
            ``keep_checkpoints`` newest are kept.
        nan_abort_after: abort after this many consecutive steps with a non-finite
            loss or gradient (each such step is skipped: no update).
        riemannian / riemannian_lr: optimizer for manifold tensors (full-capacity unitary
            blocks): ``adam`` (RiemannianAdam) or ``sgd`` (the paper's Algorithm 1); lr null = ``lr``.
        head_warmup_steps: classification tasks only: AdamW steps (at ``lr``) that train the freshly
            initialized head alone, on batches outside the training order, before any data-dependent
            adapter start (LoRA-GA's gradient estimate then sees a trained head, not a random one) and
            before step 1; the same for every method, so comparisons stay fair. 0 = off.
        lora_ga_cache: cache LoRA-GA's gradient estimate under ``$HYBRIDPEFT_CACHE/lora_ga``
            so a rerun with the same model and data skips it (the batch count is the
            adapter's ``num_batches``).
        log_every: write a step record every N optimizer steps.
        tensorboard: also write TensorBoard events (needs the ``tensorboard`` package).
        progress: show a progress bar.
    """

    seed: int = 0
    max_steps: int | None = 100
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    lr_lora: float | None = None
    lr_boft: float | None = None
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"
    save_every: int = 50
    keep_checkpoints: int = 2
    riemannian: str = "adam"
    riemannian_lr: float | None = None
    nan_abort_after: int = 5
    head_warmup_steps: int = 0
    lora_ga_cache: bool = False
    log_every: int = 1
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        e = _Errors()
        e.check(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0, "seed", self.seed,
                "a non-negative integer")
        e.check(_optional_positive_int(self.max_steps), "max_steps", self.max_steps, "null or a positive integer")
        e.check(self.epochs is None or (isinstance(self.epochs, (int, float)) and self.epochs > 0), "epochs",
                self.epochs, "null or a positive number")
        e.check((self.max_steps is None) != (self.epochs is None), "max_steps", self.max_steps,
                f"exactly one of max_steps and epochs set (epochs={self.epochs!r})")
        e.check(_positive_int(self.batch_size), "batch_size", self.batch_size, "a positive integer")
        e.check(_positive_int(self.grad_accum), "grad_accum", self.grad_accum, "a positive integer")
        e.check(_finite(self.lr) and self.lr > 0, "lr", self.lr, "a positive number")
        for name in ("lr_lora", "lr_boft"):
            value = getattr(self, name)
            e.check(value is None or (_finite(value) and value > 0), name, value, "null or a positive number")
        e.check(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
                "a non-negative number")
        e.check(isinstance(self.betas, list) and len(self.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in self.betas),
                "betas", self.betas, "two numbers in [0, 1)")
        e.check(_finite(self.eps) and self.eps > 0, "eps", self.eps, "a positive number")
        e.check(self.schedule in ("cosine", "linear", "constant"), "schedule", self.schedule,
                "'cosine', 'linear' or 'constant'")
        e.check(_non_negative_int(self.warmup_steps), "warmup_steps", self.warmup_steps, "a non-negative integer")
        e.check(_finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio,
                "a number in [0, 1]")
        e.check(self.max_grad_norm is None or (_finite(self.max_grad_norm) and self.max_grad_norm > 0),
                "max_grad_norm", self.max_grad_norm, "null or a positive number")
        e.check(self.mixed_precision in ("auto", "no", "bf16", "fp16"), "mixed_precision", self.mixed_precision,
                "'auto', 'no', 'bf16' or 'fp16'")
        if self.mixed_precision == "fp16":
            import torch

            e.check(torch.cuda.is_available(), "mixed_precision", self.mixed_precision,
                    "'fp16' only with a CUDA device (none is visible); use 'no' or 'bf16'")
        e.check(_non_negative_int(self.save_every), "save_every", self.save_every, "a non-negative integer")
        e.check(_positive_int(self.keep_checkpoints), "keep_checkpoints", self.keep_checkpoints, "a positive integer")
        e.check(_positive_int(self.nan_abort_after), "nan_abort_after", self.nan_abort_after, "a positive integer")
        e.check(self.riemannian in ("adam", "sgd"), "riemannian", self.riemannian, "'adam' or 'sgd'")
        e.check(self.riemannian_lr is None or (_finite(self.riemannian_lr) and self.riemannian_lr > 0),
                "riemannian_lr", self.riemannian_lr, "null or a positive number")
        e.check(_non_negative_int(self.head_warmup_steps), "head_warmup_steps", self.head_warmup_steps,
                "a non-negative integer")
        e.check(isinstance(self.lora_ga_cache, bool), "lora_ga_cache", self.lora_ga_cache, "true or false")
        e.check(_positive_int(self.log_every), "log_every", self.log_every, "a positive integer")
        e.check(isinstance(self.tensorboard, bool), "tensorboard", self.tensorboard, "true or false")
        if self.tensorboard is True:
            e.check(importlib.util.find_spec("tensorboard") is not None, "tensorboard", self.tensorboard,
                    "false, or the 'tensorboard' package installed (pip install tensorboard)")
        e.check(isinstance(self.progress, bool), "progress", self.progress, "true or false")
        e.raise_if_any()


@dataclass
class FsdpSection:
    """Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``); see ``docs/distributed.md``.

    Args:
        enabled: shard the model over the processes instead of copying it to each (DDP).
            Needs a multi-process launch (``torchrun --nproc_per_node N -m hybridpeft.cli train
            --set fsdp.enabled=true``). ``accelerate launch --config_file examples/accelerate/fsdp.yaml``
            turns it on by itself, and the ``fsdp_*`` fields of that file replace this section.
        layer_classes: module classes sharded as one unit each (their frozen weights and adapters
            together); null = the model's own blocks (transformers' ``_no_split_modules``, e.g.
            ``LlamaDecoderLayer``). What is left (embeddings, final norm, head) forms the root unit.
        reshard_after_forward: free each gathered block after its forward and gather it again
            for backward (less memory, one more all-gather per block).
        ram_efficient_loading: only rank 0 reads the checkpoint; the other ranks build the model
            on the meta device and receive their pieces from rank 0, one tensor at a time.
    """

    enabled: bool = False
    layer_classes: list[str] | None = None
    reshard_after_forward: bool = True
    ram_efficient_loading: bool = True

    def __post_init__(self) -> None:
        e = _Errors()
        e.check(isinstance(self.enabled, bool), "enabled", self.enabled, "true or false")
        e.check(self.layer_classes is None or (isinstance(self.layer_classes, list) and bool(self.layer_classes)
                                               and all(isinstance(c, str) and c for c in self.layer_classes)),
                "layer_classes", self.layer_classes, "null or a non-empty list of class names")
        e.check(isinstance(self.reshard_after_forward, bool), "reshard_after_forward", self.reshard_after_forward,
                "true or false")
        e.check(isinstance(self.ram_efficient_loading, bool), "ram_efficient_loading", self.ram_efficient_loading,
                "true or false")
        e.raise_if_any()


@dataclass
class EvalSection:
    """Args:
        every: validation loss every N optimizer steps (0 = never during training).
        batch_size: examples per forward pass when evaluating.
        split / limit: the split and size the task metric (before/after training) uses;
            split null = the task's own choice (``task.eval_split``, else "test").
        before / after: run the task metric before and after training.
        early_stopping_patience: stop after this many validations without an improvement
            of the validation loss by more than ``early_stopping_min_delta`` (null = off).
    """

    every: int = 50
    batch_size: int = 16
    split: str | None = None
    limit: int | None = 100
    before: bool = True
    after: bool = True
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0

    def __post_init__(self) -> None:
        e = _Errors()
        e.check(_non_negative_int(self.every), "every", self.every, "a non-negative integer")
        e.check(_positive_int(self.batch_size), "batch_size", self.batch_size, "a positive integer")
        e.check(self.split is None or (isinstance(self.split, str) and self.split != ""), "split", self.split,
                "null or a split name")
        e.check(_optional_positive_int(self.limit), "limit", self.limit, "null or a positive integer")
        e.check(isinstance(self.before, bool), "before", self.before, "true or false")
        e.check(isinstance(self.after, bool), "after", self.after, "true or false")
        e.check(_optional_positive_int(self.early_stopping_patience), "early_stopping_patience",
                self.early_stopping_patience, "null or a positive integer")
        e.check(_finite(self.early_stopping_min_delta) and self.early_stopping_min_delta >= 0,
                "early_stopping_min_delta", self.early_stopping_min_delta, "a non-negative number")
        if self.early_stopping_patience is not None:
            e.check(self.every > 0, "early_stopping_patience", self.early_stopping_patience,
                    "null when eval.every is 0 (early stopping needs periodic validation)")
        e.raise_if_any()


@dataclass
class OutputSection:
    """Args:
        run_dir: where logs, checkpoints, the final adapter and results go;
            ``{task}``, ``{method}`` and ``{seed}`` are filled in.
        overwrite: allow starting a fresh run in a directory that has checkpoints
            (they are deleted first). Without it, such a start is refused unless resuming.
    """

    run_dir: str = "runs/{task}-{method}-seed{seed}"
    overwrite: bool = False

    def __post_init__(self) -> None:
        e = _Errors()
        e.check(isinstance(self.run_dir, str) and self.run_dir != "", "run_dir", self.run_dir, "a directory path")
        if isinstance(self.run_dir, str):
            problem = _placeholder_problem(self.run_dir)
            e.check(problem is None, "run_dir", self.run_dir,
                    f"a path whose placeholders are among {{task}}, {{method}}, {{seed}} ({problem})")
        e.check(isinstance(self.overwrite, bool), "overwrite", self.overwrite, "true or false")
        e.raise_if_any()


RUN_DIR_FIELDS = {"task": "arith", "method": "lora", "seed": 0}  # what fills output.run_dir (sample values)


def _placeholder_problem(template: str) -> str | None:
    """Why ``template`` cannot be filled from ``RUN_DIR_FIELDS`` (None if it can)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:  # an unmatched brace
        return str(err)
    unknown = [name for name in names if name not in RUN_DIR_FIELDS]
    if unknown:
        return "unknown: " + ", ".join("{" + name + "}" for name in unknown) + "; write {{ and }} for literal braces"
    try:
        template.format(**RUN_DIR_FIELDS)
    except (ValueError, TypeError) as err:  # a format spec such as {seed:q}
        return str(err)
    return None


@dataclass
class DebugSection:
    """Fault injection and inspection for tests; leave at the defaults for real runs.

    Args:
        nan_loss_at_steps: optimizer steps (1-based) whose loss is replaced by NaN.
        nan_grad_at_steps: optimizer steps whose first trainable gradient gets a NaN.
        step_sleep_s: sleep after each optimizer step (lets a test kill a run mid-way).
        save_rank_states: every rank writes its adapter tensors to ``debug/rank<k>.safetensors``.
        crash_after_step: raise ``SimulatedCrash`` once this step (and its checkpoint) is done.
    """

    nan_loss_at_steps: list[int] = field(default_factory=list)
    nan_grad_at_steps: list[int] = field(default_factory=list)
    step_sleep_s: float = 0.0
    save_rank_states: bool = False
    crash_after_step: int | None = None

    def __post_init__(self) -> None:
        e = _Errors()
        for name in ("nan_loss_at_steps", "nan_grad_at_steps"):
            value = getattr(self, name)
            e.check(isinstance(value, list) and all(_positive_int(v) for v in value), name, value,
                    "a list of positive step numbers")
        e.check(_finite(self.step_sleep_s) and self.step_sleep_s >= 0, "step_sleep_s", self.step_sleep_s,
                "a non-negative number")
        e.check(isinstance(self.save_rank_states, bool), "save_rank_states", self.save_rank_states, "true or false")
        e.check(_optional_positive_int(self.crash_after_step), "crash_after_step", self.crash_after_step,
                "null or a positive step number")
        e.raise_if_any()


_SECTION_CLASSES = {
    "model": ModelSection, "data": DataSection, "train": TrainSection, "fsdp": FsdpSection,
    "eval": EvalSection, "output": OutputSection, "debug": DebugSection,
}


@dataclass
class JobConfig:
    """A resolved, validated job. ``adapter`` is the method's own config object."""

    model: ModelSection
    data: DataSection
    adapter: AdapterConfig
    train: TrainSection
    eval: EvalSection
    output: OutputSection
    debug: DebugSection
    fsdp: FsdpSection = field(default_factory=FsdpSection)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def method(self) -> str:
        return self.adapter.method

    def model_name(self, task_kind: str) -> str:
        if self.model.name is not None:
            return self.model.name
        return "minilm-l6" if task_kind == "classification" else "smollm2-135m"

    def run_dir(self) -> Path:
        template = self.output.run_dir
        return Path(template.format(task=self.data.task, method=self.method, seed=self.train.seed)).expanduser()

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what ``config.yaml`` in the run dir holds)."""
        adapter = self.adapter.to_dict()
        adapter.pop("format_version", None)
        out = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTION_CLASSES}
        out["adapter"] = adapter
        return {name: out[name] for name in SECTIONS}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- parsing

def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML, except that numbers YAML 1.1 leaves as strings
    (``2e-4``, ``1e3``) become floats."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "train.lr", 1e-3)`` sets ``d["train"]["lr"]``, creating mappings on the way."""
    *parents, leaf = key.split(".")
    node = target
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A new mapping: ``changes`` over ``base``, mappings merged recursively."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _coerce(value: Any, annotation: Any) -> Any:
    """Best-effort conversion of YAML/CLI values to a field's declared type.

    Only lossless, unsurprising conversions: numeric strings to float, integral
    floats to int. Anything else is returned unchanged for the validator to judge.
    """
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds = [part.strip() for part in text.split("|")]
    if value is None or isinstance(value, bool):
        return value
    if "float" in kinds and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if "float" in kinds and isinstance(value, int):
        return float(value)
    if "int" in kinds and "float" not in kinds:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
                return int(number) if number.is_integer() else value
            except ValueError:
                return value
    if any(k.startswith("list[float]") for k in kinds) and isinstance(value, list):
        return [_coerce(v, "float") for v in value]
    if any(k.startswith("list[int]") for k in kinds) and isinstance(value, list):
        return [_coerce(v, "int") for v in value]
    return value


def _build_section(cls: type, data: Any, prefix: str, errors: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{prefix}={data!r} is invalid: expected a mapping")
        data = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            errors.append(f"{prefix}.{key}={value!r} is invalid: expected one of the fields {sorted(fields)}")
            continue
        kwargs[key] = _coerce(value, fields[key].type)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        errors.extend(f"{prefix}.{item}" for item in err.errors)
    # Keep going with the defaults so the other sections are still checked.
    return cls()


_SHARED_ADAPTER_FIELDS = {f.name for f in dataclasses.fields(AdapterConfig)}


def _adapter_errors(cls: type[AdapterConfig], kwargs: dict[str, Any], origin: dict[str, str], prefix: str) -> list[str]:
    """All of a method config's complaints: the whole set, then each field alone.

    Adapter configs raise at their first bad field; constructing with one field at
    a time recovers the others so the user sees every problem in one go. Each
    message is prefixed with where the field was written (``origin``).
    """
    try:
        cls(**kwargs)
        return []
    except (ValueError, TypeError) as first:
        found: list[str] = []
        # The shared fields that are valid on their own go with every retry: a method field may be
        # checked against them (IA³'s feedforward_modules must be among target_modules).
        context = {k: v for k, v in kwargs.items() if k in _SHARED_ADAPTER_FIELDS and _accepts(cls, {k: v})}
        for key, value in kwargs.items():
            try:
                cls(**{**context, key: value})
            except (ValueError, TypeError) as err:
                found.append(f"{origin.get(key, prefix)}.{err}")
        return found or [f"{prefix}.{first}"]


def _accepts(cls: type[AdapterConfig], kwargs: dict[str, Any]) -> bool:
    try:
        cls(**kwargs)
    except (ValueError, TypeError):
        return False
    return True


def _build_adapter(data: Any, errors: list[str]) -> AdapterConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"adapter={data!r} is invalid: expected a mapping")
        data = {}
    methods = known_methods()
    method = data.get("method", "lora")
    if method not in methods:
        errors.append(f"adapter.method={method!r} is invalid: expected one of {methods}")
        method = None
    shared = {k: v for k, v in data.items() if k in _SHARED_ADAPTER_FIELDS}
    chosen: AdapterConfig | None = None
    # Sections for methods other than the chosen one are checked too (typos surface now).
    for name in methods:
        section = data.get(name)
        if section is None and name != method:
            continue
        if section is not None and not isinstance(section, dict):
            errors.append(f"adapter.{name}={section!r} is invalid: expected a mapping of {name} fields")
            section = {}
        cls = config_class(name)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = dict(shared)
        origin = {key: "adapter" for key in shared}
        if name == method:
            for key, value in data.items():
                if key in ("method", *methods) or key in _SHARED_ADAPTER_FIELDS:
                    continue
                if key not in fields:
                    errors.append(f"adapter.{key}={value!r} is invalid: expected a field of method {method!r} "
                                  f"({sorted(fields)}) or a per-method mapping (adapter.<method>.{key})")
                    continue
                kwargs[key], origin[key] = value, "adapter"
        for key, value in (section or {}).items():
            if key not in fields:
                errors.append(f"adapter.{name}.{key}={value!r} is invalid: expected one of {sorted(fields)}")
                continue
            kwargs[key], origin[key] = value, f"adapter.{name}"
        kwargs = {k: _coerce(v, fields[k].type) for k, v in kwargs.items() if k in fields}
        problems = _adapter_errors(cls, kwargs, origin, f"adapter.{name}" if name != method else "adapter")
        errors.extend(problems)
        if name == method and not problems:
            chosen = cls(**kwargs)
    unknown = [k for k in data if k not in ("method", *methods) and k not in _SHARED_ADAPTER_FIELDS
               and method is None]
    for key in unknown:
        errors.append(f"adapter.{key}={data[key]!r} is invalid: cannot be checked without a valid adapter.method")
    return chosen if chosen is not None else config_class("lora")()


def build_config(data: dict[str, Any]) -> JobConfig:
    """Validate a job mapping (defaults already merged in) into a ``JobConfig``.

    Raises:
        ConfigError: listing every invalid field with its value.
    """
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"config={data!r} is invalid: expected a mapping with sections {list(SECTIONS)}"])
    for key in data:
        if key not in SECTIONS:
            errors.append(f"{key}={data[key]!r} is invalid: expected one of the sections {list(SECTIONS)}")
    sections = {name: _build_section(cls, data.get(name), name, errors) for name, cls in _SECTION_CLASSES.items()}
    adapter = _build_adapter(data.get("adapter"), errors)
    job = JobConfig(adapter=adapter, raw=copy.deepcopy(data), **sections)
    errors.extend(_cross_checks(job, data))
    if errors:
        raise ConfigError(errors)
    return job


def sharding_problems(job: JobConfig, prefix: str = "fsdp.enabled=true") -> list[str]:
    """Settings of ``job`` that cannot run sharded, one line each (empty if none).

    Here rather than in ``parallel.py`` (which applies them to a launch) so the config
    checks need nothing from the training side.
    """
    problems = []
    quantization = getattr(job.model, "quantization", None)
    if quantization is not None:
        problems.append(f"model.quantization={quantization!r} is not supported with {prefix}: bitsandbytes' packed "
                        "weights cannot be sharded by FSDP2 here; train the quantized base on one process per "
                        "model copy (DDP) or shard a float base")
    if job.train.mixed_precision == "fp16":
        problems.append(f"train.mixed_precision='fp16' is not supported with {prefix}: the fp16 gradient scaler "
                        "does not handle sharded gradients; use 'bf16' or 'no'")
    lora_ga = getattr(job.adapter, "lora_ga_config", None)
    if callable(lora_ga) and lora_ga().offset == "subtract":
        problems.append(f"adapter offset='subtract' is not supported with {prefix}: it writes B0 A0 into the sharded "
                        "base weight; use offset='adapter' (the default)")
    return problems


def _cross_checks(job: JobConfig, data: dict[str, Any]) -> list[str]:
    """Checks that span sections (the task's kind against the model, task arguments)."""
    from ..tasks import get_task, known_tasks

    errors: list[str] = []
    for name in ("lr_lora", "lr_boft"):
        value = getattr(job.train, name)
        if value is not None and job.method != "hybrid":
            errors.append(f"train.{name}={value!r} is invalid for adapter.method={job.method!r}: expected null "
                          "(branch learning rates are for the Hybrid's two branches; use train.lr)")
    if job.model.quantization is not None and job.method == "full":
        errors.append(f"adapter.method='full' is invalid with model.quantization={job.model.quantization!r}: "
                      "quantized weights cannot be trained; use an adapter method or a float base")
    if job.fsdp.enabled:
        errors.extend(sharding_problems(job))
    if job.data.task in known_tasks():
        try:
            task = get_task(job.data.task, **job.data.task_args)
        except (TypeError, ValueError) as err:
            errors.append(f"data.task_args={job.data.task_args!r} is invalid for task {job.data.task!r}: {err}")
        else:
            if job.train.head_warmup_steps and task.kind != "classification":
                errors.append(f"train.head_warmup_steps={job.train.head_warmup_steps!r} is invalid for task "
                              f"{job.data.task!r}: expected 0 (only classification tasks have a fresh head)")
            shots = getattr(task, "k_shot", None)
            if shots is not None and job.data.train_limit is not None:
                errors.append(f"data.train_limit={job.data.train_limit!r} is invalid with data.task_args.k_shot={shots!r}: "
                              "expected null (k_shot fixes the training set)")
    return errors


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> JobConfig:
    """Resolve a job: built-in defaults ← ``configs/default.yaml``-style file ``path``
    (or the mapping ``data``) ← ``overrides`` (``"dotted.key=value"`` strings).

    Raises:
        ConfigError: every invalid field at once (before any model is loaded).
        FileNotFoundError: ``path`` does not exist.
    """
    resolved = resolve_mapping(path, overrides, data)
    return build_config(resolved)


def resolve_mapping(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                    data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The merged, not yet validated mapping (file or ``data``, then overrides)."""
    resolved: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file {file} does not exist")
        try:
            loaded = read_yaml(file) or {}
        except ValueError as err:
            raise ConfigError([str(err)]) from None
        if not isinstance(loaded, dict):
            raise ConfigError([f"{file}: top level={type(loaded).__name__} is invalid: expected a mapping"])
        resolved = deep_merge(resolved, loaded)
    if data is not None:
        resolved = deep_merge(resolved, data)
    errors = []
    for item in overrides or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            errors.append(f"--set {item!r} is invalid: expected 'section.field=value'")
            continue
        key, raw = item.split("=", 1)
        try:
            set_dotted(resolved, key.strip(), parse_value(raw))
        except yaml.YAMLError as err:
            errors.append(f"--set {key.strip()}={raw!r} is invalid: not a YAML value ({err})")
    if errors:
        raise ConfigError(errors)
    return resolved


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML file's content (``yaml.safe_load``: plain data only, no objects constructed).

    Raises:
        ValueError: the file is not UTF-8 or not valid YAML; one line naming the file, the line
            and the column, e.g. ``job.yaml, line 4, column 7: mapping values are not allowed here``.
    """
    file = Path(path)
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{file}{where}: not valid YAML: {problem}") from None


def dump_yaml(job: JobConfig) -> str:
    return yaml.safe_dump(job.to_dict(), sort_keys=False)
