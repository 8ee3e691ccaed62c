"""The training loop on ``accelerate``: one code path for every method.

Per optimizer step::

    for each of grad_accum micro-batches (gradient sync only on the last):
        loss = model(**batch).loss;  backward(loss / grad_accum)
    global loss = mean over ranks;  grad norm = clip_grad_norm_ (after the sync)
    if both finite:  optimizer.step();  after_optimizer_step(model)   # Hybrid λ, norm bounds
    else:            skip the update, count it; K in a row → TrainingAborted
    scheduler.step();  zero_grad()
    log → validate every N → checkpoint every M

A skipped step still consumes its data and its learning-rate slot, so step
numbers, data order and schedule stay aligned whatever happens. Every rank
takes the same decisions (the loss is all-reduced, the gradient norm is
computed after the gradient all-reduce), so no rank can step while another skips.

Several processes either each hold the model (DDP, the default) or shard it (FSDP2,
``fsdp.enabled`` or an FSDP ``accelerate launch``); ``train/parallel.py`` holds the
difference, so this loop reads the same for both. Under sharding, saving gathers the
adapter and optimizer state onto rank 0 (every rank takes part) and the task metric
after training runs on a gathered plain copy on rank 0.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..api import adapter_tensors, after_optimizer_step, load_adapter, mixing_state, write_adapter
from ..gradient_init import describe_estimate, lora_ga_init, lora_ga_targets
from ..inject import config_of
from ..tasks.base import write_predictions
from ..tasks.lm import validation_loss
from . import checkpoint as ckpt
from . import parallel as par
from .batches import BatchStream
from .evaluation import task_metrics
from .failures import ResumeError, explain_failures
from .health import non_finite_names
from .job_config import JobConfig, dump_yaml, read_yaml
from .lock import RunDirBusy, RunDirLock
from .records import RunLog, now, peak_memory_mb, versions, write_json
from .seeding import rng_state, seed_everything, set_rng_state
from .setup import (
    build_optimizer, build_scheduler, build_task, describe_splits, load_job_model, load_splits, prepare_model,
    set_schedule_length, split_name, warm_up_head,
)

RUN_INFO = "hybridpeft_run.json"  # written into saved adapter dirs: base model, task, step


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is left intact."""


class SimulatedCrash(RuntimeError):
    """Raised by ``debug.crash_after_step`` (tests of in-process resume)."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stop_reason: str
    adapter_dir: Path
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    best_val_loss: float | None = None
    skipped_steps: int = 0


@dataclass
class LoopState:
    """Everything besides tensors that a checkpoint must carry to continue exactly."""

    step: int = 0
    skipped: int = 0
    consecutive_bad: int = 0
    bad_steps: list[int] = field(default_factory=list)
    best_val_loss: float | None = None
    evals_without_improvement: int = 0
    tokens_seen: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Run:
    """The pieces one training run passes around (a record, no behaviour)."""

    job: JobConfig
    accelerator: Any
    run_dir: Path
    model_name: str
    task: Any
    tokenizer: Any
    model: Any  # as prepared by accelerate (DDP-wrapped under data parallelism) or sharded
    unwrapped: Any
    optimizer: Any
    scheduler: Any
    stream: BatchStream
    params: list[torch.nn.Parameter]
    state: LoopState
    strategy: par.Replicated
    log: RunLog | None = None
    last_saved: Path | None = None
    last_good: Path | None = None  # newest checkpoint whose weights then gave a finite step

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


def _make_accelerator(job: JobConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Buffers (e.g. the Hybrid's λ) are kept identical by the adapters themselves; broadcasting
    # them from rank 0 every forward would hide a rank that drifted.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=False)
    # accelerate only forms a multi-process CPU group (gloo) when told it runs on the CPU.
    return Accelerator(mixed_precision=_mixed_precision(job.train.mixed_precision), kwargs_handlers=[ddp],
                       cpu=not _has_accelerator())


def _say(accelerator: Any, message: str) -> None:
    if accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)


def _format_metrics(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "-"
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


# ---------------------------------------------------------------- the run

def train(job: JobConfig, resume: bool | str | os.PathLike | None = None) -> TrainResult:
    """Run a validated job: evaluate, train, checkpoint, evaluate again; returns a summary.

    The run dir is locked for the whole run (``hybridpeft.train.lock``): a second
    process on the same run dir is refused, naming the first.

    Args:
        job: from ``load_config``.
        resume: ``True`` continues from the newest intact checkpoint of the run dir
            (broken ones are skipped with a warning); a path continues from that
            checkpoint, checkpoints folder or run dir; falsy starts fresh.

    Raises:
        TrainingAborted: ``train.nan_abort_after`` consecutive non-finite steps, or weights
            that became non-finite (the message names the last good checkpoint).
        ResumeError: a resume was asked and no usable checkpoint exists (nothing was changed).
        RunDirBusy: another process is training in the run dir.
        DiskFull / RunDirNotWritable: the run dir cannot be written (what was kept is named).
        TrainingInterrupted: Ctrl-C (or SIGTERM via the CLI); checkpoints are kept.
        ValueError: the run dir holds a previous run and neither resume nor overwrite was asked,
            or a resume does not fit the job (other world size, batch size, ...).
    """
    distributed.die_with_launcher()  # a killed launcher must not leave ranks holding the run dir
    accelerator = _make_accelerator(job)
    strategy = par.for_job(job, accelerator)  # refuses unsupported sharding settings before anything loads
    run_dir = job.run_dir()
    with explain_failures(run_dir, accelerator.is_main_process), _locked(run_dir, accelerator):
        return _train(job, accelerator, run_dir, resume, strategy)


@contextlib.contextmanager
def _locked(run_dir: Path, accelerator: Any):
    """Hold the run dir's lock (main process) for the block; every rank stops if it is taken."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = RunDirLock(run_dir).acquire()
        except RunDirBusy as err:
            refusal = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise RunDirBusy(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _train(job: JobConfig, accelerator: Any, run_dir: Path, resume: Any, strategy: par.Replicated) -> TrainResult:
    source = _find_resume_source(job, run_dir, resume, accelerator.is_main_process)
    if source is not None:  # before the run dir is touched: a resume that cannot work changes nothing
        _check_compatible(ckpt.load_trainer_state(source), job, accelerator.num_processes)
    _start_run_dir(accelerator, job, run_dir, source, strategy)

    seed_everything(job.train.seed)
    task = build_task(job)
    train_examples, val_examples = load_splits(job, task)
    eval_split = split_name(task, job.eval.split, "eval_split", "test")
    eval_examples = task.load(eval_split, job.data.data_dir, job.eval.limit, job.train.seed) \
        if (job.eval.before or job.eval.after) else []
    BatchStream.check_size(len(train_examples), job.train.batch_size, accelerator.num_processes)
    data_info = describe_splits(job, task, len(train_examples), len(val_examples),
                                len(eval_examples) if (job.eval.before or job.eval.after) else None)

    model_name = job.model_name(task.kind)
    model, tokenizer = load_job_model(job, model_name, task, empty=strategy.loads_empty, device=accelerator.device)
    model = strategy.place(model)
    results = _read_results(run_dir) if source is not None else {}
    results["data"] = data_info
    if job.eval.before and "before" not in results and accelerator.is_main_process:
        _say(accelerator, f"evaluating the base model on {len(eval_examples)} '{eval_split}' examples of {task.name} ...")
        results["before"] = task_metrics(model, tokenizer, task, eval_examples, job.eval.batch_size)
        _write_predictions(run_dir / "predictions_before.jsonl", task, eval_examples)
        _say(accelerator, f"before training: {_format_metrics(results['before'])}")
        write_json(run_dir / "results.json", results)
    accelerator.wait_for_everyone()

    stream = BatchStream(task, tokenizer, train_examples, job.train.batch_size, job.train.seed,
                         accelerator.process_index, accelerator.num_processes, job.data.max_length)
    model = strategy.shard(prepare_model(model, job, task, checkpointing=strategy.activation_checkpointing))
    model = strategy.place(model)  # the new adapter tensors too
    if source is not None:
        load_adapter(model, source / ckpt.ADAPTER_DIR)
    else:
        _initialize_adapters(job, accelerator, model, stream)
    total_steps = job.train.max_steps if job.train.max_steps is not None else \
        max(1, math.ceil(job.train.epochs * stream.batches_per_epoch / job.train.grad_accum))
    set_schedule_length(model, total_steps)
    optimizer = build_optimizer(model, job)
    scheduler = build_scheduler(optimizer, job, total_steps)
    state = LoopState()
    if source is not None:
        state = _restore_trainer(source, job, accelerator, optimizer, scheduler, stream)
    prepared, optimizer = strategy.prepare(model, optimizer)
    if source is not None:
        _restore_process_state(source, accelerator)
        _say(accelerator, f"resumed from {source} at step {state.step}")

    unwrapped = accelerator.unwrap_model(prepared)
    run = _Run(job=job, accelerator=accelerator, run_dir=run_dir, model_name=model_name, task=task,
               tokenizer=tokenizer, model=prepared, unwrapped=unwrapped, optimizer=optimizer, scheduler=scheduler,
               stream=stream, params=[p for p in unwrapped.parameters() if p.requires_grad], state=state,
               strategy=strategy, last_saved=source)
    _say(accelerator, f"training {job.method} on {task.name}: {sum(p.numel() for p in run.params):,} trainable "
                      f"parameters, {data_info['train']}, validation {data_info['validation']}, {total_steps} steps "
                      f"({max(1, stream.batches_per_epoch // job.train.grad_accum)} per epoch), world size "
                      f"{accelerator.num_processes}, {strategy.describe()}, mixed precision {accelerator.mixed_precision}")
    run.log = RunLog(run_dir, run.is_main, job.train.tensorboard, resume_step=state.step if source is not None else None)
    try:
        stop_reason = _loop(run, total_steps, val_examples)
    finally:
        run.log.close()
    return _finish(run, stop_reason, results, eval_examples, eval_split)


def _find_resume_source(job: JobConfig, run_dir: Path, resume: Any, is_main: bool) -> Path | None:
    """The checkpoint to resume from (None = fresh start); refuses to clobber a run by accident.

    A resume that finds nothing usable raises ``ResumeError`` before anything is written:
    falling back to a fresh start would delete the run's adapter, logs and results.
    """
    checkpoints = run_dir / "checkpoints"
    if resume:
        return _resume_source(checkpoints if resume is True else Path(resume), is_main)
    if not job.output.overwrite:
        if ckpt.list_checkpoints(checkpoints):
            raise ValueError(
                f"output.run_dir={str(run_dir)!r} already holds checkpoints; pass --resume to continue that run, "
                "or set output.overwrite=true / choose another output.run_dir to start over"
            )
        if (run_dir / "adapter").is_dir():
            raise ValueError(
                f"output.run_dir={str(run_dir)!r} already holds a finished run (adapter/); "
                "set output.overwrite=true or choose another output.run_dir to start over"
            )
    return None


def _resume_source(source: Path, is_main: bool) -> Path:
    """The checkpoint ``--resume`` names: one checkpoint, a checkpoints folder, or a run dir."""
    keep_going = ("nothing was changed; to start over instead, drop --resume (with output.overwrite=true "
                  "if the run dir holds checkpoints)")
    if not source.exists():
        raise ResumeError(f"--resume: {source} does not exist (no checkpoint was ever written there?); {keep_going}")
    if (source / ckpt.MARKER).exists() or (source / ckpt.TRAINER_STATE).exists():  # one checkpoint named
        reason = ckpt.verify(source, deep=True)
        if reason is not None:
            raise ResumeError(f"--resume {source}: checkpoint is not usable: {reason}; {keep_going}")
        return source
    if (source / "checkpoints").is_dir() and not ckpt.list_checkpoints(source):  # a run dir
        source = source / "checkpoints"
    rejected: list[tuple[Path, str]] = []
    found = ckpt.latest_valid(source, warn=is_main, deep=True, rejected=rejected)
    if found is None:
        why = "; ".join(f"{path.name}: {reason}" for path, reason in rejected) or "it holds no step-* checkpoint"
        raise ResumeError(f"--resume: no usable checkpoint in {source} ({why}); {keep_going}")
    return found


def _start_run_dir(accelerator: Any, job: JobConfig, run_dir: Path, source: Path | None, strategy: Any) -> None:
    """Create/clean the run dir; record the resolved config, versions and seed."""
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if source is None:  # a fresh start: nothing of an earlier run may be mistaken for ours
            if job.output.overwrite:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            for name in ("train_log.jsonl", "eval_log.jsonl", "results.json", "predictions_before.jsonl",
                         "predictions_after.jsonl"):
                (run_dir / name).unlink(missing_ok=True)
            for name in ("adapter", "best_adapter", "debug"):
                shutil.rmtree(run_dir / name, ignore_errors=True)
        else:
            _warn_config_drift(run_dir, job)
        (run_dir / "config.yaml").write_text(dump_yaml(job))
        write_json(run_dir / "run.json", {
            "seed": job.train.seed, "versions": versions(), "started": now(), "argv": sys.argv,
            "world_size": accelerator.num_processes, "device": str(accelerator.device),
            "mixed_precision": accelerator.mixed_precision, "resumed_from": str(source) if source else None,
            "parallel": par.settings_dict(strategy),
        })
    accelerator.wait_for_everyone()


def _initialize_adapters(job: JobConfig, accelerator: Any, model: torch.nn.Module, stream: BatchStream) -> None:
    """The optional head warm-up, then data-dependent starts before step 0 (LoRA-GA for ``lora_ga``
    and the Hybrid's LoRA branch)."""
    if job.train.head_warmup_steps:
        losses = warm_up_head(model, stream.warmup_batches(job.train.head_warmup_steps), job.train.head_warmup_steps,
                              job.train.lr, tuple(job.train.betas), job.train.eps)
        _say(accelerator, f"head warm-up: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if not lora_ga_targets(model):
        return
    n = config_of(model).lora_ga_config().num_batches
    _say(accelerator, f"LoRA-GA: estimating gradients on {n} batches ({describe_estimate(model)}) ...")
    cache = None
    if job.train.lora_ga_cache:
        from ..models import cache_dir

        cache = str(cache_dir() / "lora_ga")
    lora_ga_init(model, stream.warmup_batches(n), cache_dir=cache)


def _restore_trainer(source: Path, job: JobConfig, accelerator: Any, optimizer: Any, scheduler: Any,
                     stream: BatchStream) -> LoopState:
    saved = ckpt.load_trainer_state(source)
    _check_compatible(saved, job, accelerator.num_processes)
    optimizer.load_state_dict(saved["optimizer"])  # whole tensors (gathered when saved sharded)
    distributed.reshard_optimizer_state(optimizer)  # pieces of sharded parameters' state back to DTensors
    scheduler.load_state_dict(saved["scheduler"])
    stream.seek(saved["data"]["epoch"], saved["data"]["index"])
    return LoopState(**saved["loop"])


def _restore_process_state(source: Path, accelerator: Any) -> None:
    """The gradient scaler (fp16) and this rank's RNG states; last, after everything that draws randoms."""
    saved = ckpt.load_trainer_state(source)
    if accelerator.scaler is not None and saved.get("scaler"):
        accelerator.scaler.load_state_dict(saved["scaler"])
    rng = ckpt.load_rng(source, accelerator.process_index)
    if rng is None:
        raise ValueError(f"checkpoint {source} has no RNG state for rank {accelerator.process_index}")
    set_rng_state(rng)


def _loop(run: _Run, total_steps: int, val_examples: list) -> str:
    """Train until ``total_steps`` or early stopping; returns the stop reason."""
    from tqdm.auto import tqdm

    job, state = run.job, run.state
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (run.is_main and job.train.progress))
    stop_reason = "max_steps"
    run.model.train()
    try:
        while state.step < total_steps and stop_reason == "max_steps":
            record = _train_step(run)
            bar.update(1)
            loss = record["loss"]
            bar.set_postfix(loss=f"{loss:.4f}" if math.isfinite(loss) else str(loss), lr=f"{record['lr']:.2e}")
            if state.step % job.train.log_every == 0 or record.get("skipped"):
                run.log.step(record)
            if not record.get("skipped"):
                run.last_good = run.last_saved  # a finite step ran on the weights saved last
            if state.consecutive_bad >= job.train.nan_abort_after:
                raise TrainingAborted(
                    f"training aborted at step {state.step}: {state.consecutive_bad} consecutive steps had a "
                    f"non-finite loss or gradient (steps {state.bad_steps[-state.consecutive_bad:]}; each was skipped "
                    f"without an update). {_last_good_checkpoint(run)}"
                    "Lower train.lr, check the data or the precision, then continue with --resume."
                )
            healthy = state.consecutive_bad == 0  # no validation or checkpoint in the middle of a NaN streak
            if healthy and job.eval.every and state.step % job.eval.every == 0:
                if _validate(run, val_examples):
                    stop_reason = "early_stopping"
            due = bool(job.train.save_every) and state.step % job.train.save_every == 0
            if healthy and (due or stop_reason != "max_steps" or state.step == total_steps):
                run.last_saved = save_checkpoint(run)
            if job.debug.step_sleep_s:
                time.sleep(job.debug.step_sleep_s)
            if job.debug.crash_after_step == state.step:
                raise SimulatedCrash(f"debug.crash_after_step={state.step}")
    finally:
        bar.close()
    return stop_reason


def _last_good_checkpoint(run: _Run) -> str:
    """Name the checkpoint to resume from after an abort, and set aside the ones after it.

    A checkpoint is written after a step's update, so its weights have not been tried yet;
    they are known good once a later step on them was finite (``run.last_good``). Checkpoints
    newer than that hold the weights that went non-finite, and a resume from them (at any
    learning rate) starts with the same non-finite loss: they are renamed ``*.suspect``
    so ``--resume`` passes over them.
    """
    good, set_aside = run.last_good, []
    if run.is_main:
        for step, path in ckpt.list_checkpoints(run.checkpoints):
            if good is None or step > ckpt.step_of(good):
                set_aside.append(ckpt.set_aside(path))
    run.accelerator.wait_for_everyone()
    text = f"Last good checkpoint: {good if good is not None else 'none (no checkpoint was confirmed good)'}. "
    if set_aside:
        names = ", ".join(p.name for p in set_aside)
        text += (f"Newer checkpoints hold the weights that went non-finite and were set aside as {names} "
                 "(resume from one explicitly with --resume PATH to retry them). ")
    return text


def _refuse_non_finite(run: _Run) -> None:
    """Before a checkpoint: weights that went non-finite are never saved (every rank checks its part)."""
    bad = non_finite_names(run.unwrapped, run.params, run.optimizer)
    flag = torch.tensor(float(len(bad)), device=run.accelerator.device)
    if run.accelerator.reduce(flag, "sum").item() == 0:
        return
    shown = (", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")) if bad else "on another rank"
    raise TrainingAborted(
        f"training aborted at step {run.state.step}: after this step's update the weights are not finite "
        f"({shown}); they were not saved. {_last_good_checkpoint(run)}"
        "Lower train.lr, check the data or the precision, then continue with --resume."
    )


def _train_step(run: _Run) -> dict[str, Any]:
    job, accelerator, state = run.job, run.accelerator, run.state
    started = time.perf_counter()
    step = state.step + 1
    total_loss = torch.zeros((), dtype=torch.float32, device=accelerator.device)
    tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    position = run.stream.position.to_dict()
    for micro in range(job.train.grad_accum):
        batch = {k: v.to(accelerator.device) for k, v in run.stream.next().items()}
        last = micro == job.train.grad_accum - 1
        with run.strategy.gradient_sync(run.model, sync=last):  # reduce gradients once per step
            with accelerator.autocast():
                loss = run.model(**batch).loss
            if step in job.debug.nan_loss_at_steps:
                loss = loss * float("nan")
            accelerator.backward(loss / job.train.grad_accum)
        total_loss += loss.detach().float()
        tokens += batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
    if step in job.debug.nan_grad_at_steps:  # the first gradient piece this rank holds; the norm spreads it
        next(g for g in (distributed.local(p.grad) for p in run.params if p.grad is not None) if g.numel()).view(-1)[0] = float("nan")
    mean_loss = accelerator.reduce(total_loss / job.train.grad_accum, "mean").item()
    global_tokens = int(accelerator.reduce(tokens, "sum").item())
    max_norm = job.train.max_grad_norm if job.train.max_grad_norm is not None else float("inf")
    grad_norm = run.strategy.clip_grad_norm(run.params, max_norm)
    record: dict[str, Any] = {"step": step, "epoch": position["epoch"], "data_index": position["index"],
                              "loss": mean_loss, "lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm}
    for group in run.optimizer.param_groups:  # the Hybrid's branch learning rates, when set apart
        if group.get("branch", "default") != "default":
            record[f"lr_{group['branch']}"] = group["lr"]
    # Under fp16 an overflowing gradient is the scaler's business: it skips the step and lowers the scale.
    fp16_overflow = accelerator.scaler is not None and math.isfinite(mean_loss) and not math.isfinite(grad_norm)
    if math.isfinite(mean_loss) and (math.isfinite(grad_norm) or fp16_overflow):
        run.optimizer.step()
        if not getattr(run.optimizer, "step_was_skipped", False):
            after_optimizer_step(run.unwrapped)  # before zero_grad: the Hybrid reads the branch gradients
        state.consecutive_bad = 0
        mixing = mixing_state(run.unwrapped)  # the Hybrid's λ per layer; {} for other methods
        if mixing:
            record["mixing"] = mixing
    else:
        state.skipped += 1
        state.consecutive_bad += 1
        state.bad_steps = (state.bad_steps + [step])[-job.train.nan_abort_after:]
        record["skipped"] = True
        if run.is_main:
            warnings.warn(f"step {step}: non-finite loss ({mean_loss}) or gradient norm ({grad_norm}); "
                          f"update skipped ({state.consecutive_bad} in a row)", stacklevel=2)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step = step
    state.tokens_seen += global_tokens
    elapsed = time.perf_counter() - started
    peak, peak_kind = peak_memory_mb(accelerator.device)
    record.update(tokens=global_tokens, tokens_per_s=global_tokens / max(elapsed, 1e-9), step_time_s=elapsed,
                  peak_mem_mb=peak, peak_mem_kind=peak_kind, skipped_total=state.skipped)
    return record


def _validate(run: _Run, val_examples: list) -> bool:
    """Validation loss and best-adapter bookkeeping; True when early stopping says stop."""
    job, state = run.job, run.state
    if not val_examples:
        return False
    val = validation_loss(run.unwrapped, run.tokenizer, run.task, val_examples, job.eval.batch_size,
                          job.data.max_length, accelerator=run.accelerator)
    if state.best_val_loss is None or val < state.best_val_loss - job.eval.early_stopping_min_delta:
        state.best_val_loss = val
        state.evals_without_improvement = 0
        if job.eval.early_stopping_patience is not None:  # every rank: a sharded adapter is gathered
            _save_adapter_atomically(run, run.run_dir / "best_adapter")
    else:
        state.evals_without_improvement += 1
    run.log.eval({"step": state.step, "val_loss": val, "best_val_loss": state.best_val_loss})
    run.accelerator.wait_for_everyone()
    patience = job.eval.early_stopping_patience
    return patience is not None and state.evals_without_improvement >= patience


def _write_run_info(adapter_dir: Path, run: _Run) -> None:
    job = run.job
    write_json(adapter_dir / RUN_INFO, {
        "base_model": run.model_name, "task": job.data.task, "task_args": job.data.task_args,
        "method": job.method, "step": run.state.step, "seed": job.train.seed, "max_length": job.data.max_length,
        "dtype": job.model.dtype, "quantization": job.model.quantization, "compute_dtype": job.model.compute_dtype,
    })


def _save_adapter_atomically(run: _Run, target: Path) -> None:
    """Every rank calls this (a sharded adapter is gathered); rank 0 writes."""
    tensors = adapter_tensors(run.unwrapped)
    if not run.is_main:
        return
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    write_adapter(tensors, config_of(run.unwrapped), staging)
    _write_run_info(staging, run)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def save_checkpoint(run: _Run) -> Path:
    """Write ``step-NNNNNN`` atomically; every rank takes part (each saves its RNG state).

    Raises:
        TrainingAborted: the weights are not finite (nothing is written).
    """
    accelerator, state, job = run.accelerator, run.state, run.job
    _refuse_non_finite(run)
    if run.is_main:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        ckpt.prepare_temp(run.checkpoints, state.step)
    accelerator.wait_for_everyone()
    tmp = ckpt.temp_dir(run.checkpoints, state.step)
    ckpt.save_tensors(rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
    # Collective under sharding: every rank gathers, rank 0 keeps whole tensors (the checkpoint
    # is the same for any world size and for DDP or FSDP).
    tensors = adapter_tensors(run.unwrapped)
    optimizer_state = distributed.gather_tensors(run.optimizer.state_dict(), rank0_only=True)
    if run.is_main:
        adapter_dir = write_adapter(tensors, config_of(run.unwrapped), tmp / ckpt.ADAPTER_DIR)
        _write_run_info(adapter_dir, run)
        ckpt.save_tensors({
            "format_version": 1,
            "optimizer": optimizer_state,
            "scheduler": run.scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "data": run.stream.position.to_dict(),
            "loop": state.to_dict(),
            "world_size": accelerator.num_processes,
            "batch_size": job.train.batch_size,
            "grad_accum": job.train.grad_accum,
            "seed": job.train.seed,
            "method": job.method,
            "sharded": run.strategy.sharded,
        }, tmp / ckpt.TRAINER_STATE)
    accelerator.wait_for_everyone()
    final = run.checkpoints / ckpt.step_dir_name(state.step)
    if run.is_main:
        final = ckpt.finalize(run.checkpoints, state.step, {"method": job.method, "world_size": accelerator.num_processes})
        ckpt.prune(run.checkpoints, job.train.keep_checkpoints, protect=run.last_good)
    accelerator.wait_for_everyone()
    return final


def _finish(run: _Run, stop_reason: str, results: dict[str, Any], eval_examples: list, eval_split: str) -> TrainResult:
    """Final adapter (the best one with early stopping), after-evaluation, results.json."""
    job, accelerator, state = run.job, run.accelerator, run.state
    best_dir = run.run_dir / "best_adapter"
    if job.eval.early_stopping_patience is not None and best_dir.is_dir():
        load_adapter(run.unwrapped, best_dir)  # end on the weights that validated best
    adapter_dir = run.run_dir / "adapter"
    _save_adapter_atomically(run, adapter_dir)
    if job.debug.save_rank_states:
        _dump_rank_state(run.unwrapped, run.run_dir, accelerator.process_index)
    # The task metric (generation) runs on rank 0 alone; a sharded model is gathered there first.
    scored = _gathered(run.unwrapped) if run.strategy.sharded and job.eval.after else run.unwrapped
    accelerator.wait_for_everyone()
    if run.is_main:
        if job.eval.after:
            _say(accelerator, f"evaluating the adapted model on {len(eval_examples)} '{eval_split}' examples ...")
            results["after"] = task_metrics(scored, run.tokenizer, run.task, eval_examples, job.eval.batch_size)
            _write_predictions(run.run_dir / "predictions_after.jsonl", run.task, eval_examples)
        results.update(step=state.step, stop_reason=stop_reason, skipped_steps=state.skipped,
                       best_val_loss=state.best_val_loss, adapter=str(adapter_dir), finished=now(),
                       trainable_params=sum(p.numel() for p in run.params),
                       total_params=sum(p.numel() for p in run.unwrapped.parameters()))
        write_json(run.run_dir / "results.json", results)
        _say(accelerator, f"before training: {_format_metrics(results.get('before'))}")
        _say(accelerator, f"after training:  {_format_metrics(results.get('after'))}")
        _say(accelerator, f"adapter saved to {adapter_dir}")
    accelerator.wait_for_everyone()
    return TrainResult(run_dir=run.run_dir, step=state.step, stop_reason=stop_reason, adapter_dir=adapter_dir,
                       before=results.get("before"), after=results.get("after"),
                       best_val_loss=state.best_val_loss, skipped_steps=state.skipped)


def _write_predictions(path: Path, task: Any, examples: list) -> None:
    """Per-example inputs, outputs, references and scores of the evaluation just run, beside results.json."""
    records = task.predictions(examples) if hasattr(task, "predictions") else []
    if records:
        write_predictions(path, records)


def _gathered(model: Any) -> Any:
    """A plain copy of a sharded model on rank 0 (``None`` elsewhere); collective."""
    from ..fsdp import gather_model

    return gather_model(model, rank0_only=True)


def _read_results(run_dir: Path) -> dict[str, Any]:
    """What an earlier part of a resumed run measured; an unreadable file is reported and redone."""
    path = run_dir / "results.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as err:
        warnings.warn(f"{path} is unreadable ({err}); its scores will be measured again", stacklevel=3)
        return {}
    return data


def _check_compatible(saved: dict[str, Any], job: JobConfig, world_size: int) -> None:
    """The data position only means the same thing with the same batch geometry and seed."""
    problems = []
    for key, now_value in (("world_size", world_size), ("batch_size", job.train.batch_size),
                           ("grad_accum", job.train.grad_accum), ("seed", job.train.seed), ("method", job.method)):
        if saved.get(key) != now_value:
            problems.append(f"{key}: checkpoint {saved.get(key)!r}, now {now_value!r}")
    if problems:
        why = ""
        if saved.get("world_size") != world_size:
            why = (f" (the adapter and optimizer state are whole tensors and would load at any world size, but the "
                   f"data position counts global batches of train.batch_size x {saved.get('world_size')} processes "
                   f"and each rank's random state was saved per rank; resume with {saved.get('world_size')} processes)")
        raise ValueError("cannot resume exactly, the run's geometry changed: " + "; ".join(problems) + why
                         + "; the run dir is unchanged")


def _warn_config_drift(run_dir: Path, job: JobConfig) -> None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        old = read_yaml(path) or {}
    except ValueError as err:
        warnings.warn(f"cannot compare settings with the original run: {err}", stacklevel=3)
        return
    if not isinstance(old, dict):
        return
    new = job.to_dict()
    changed = [f"{section}.{key}" for section in new if section not in ("debug", "output")
               for key in set(new[section]) | set(old.get(section) or {})
               if (old.get(section) or {}).get(key) != new[section].get(key) and key != "progress"]
    if changed:
        warnings.warn(f"resuming with settings that differ from the original run: {sorted(changed)}", stacklevel=3)


def _dump_rank_state(model: Any, run_dir: Path, rank: int) -> None:
    """Debug aid: this rank's adapter tensors and buffers, to compare ranks after DDP training."""
    from safetensors.torch import save_file

    from ..api import adapter_state_dict

    out = run_dir / "debug"
    out.mkdir(parents=True, exist_ok=True)
    # whole tensors on every rank (gathered when sharded): ranks can be compared value by value
    state = distributed.gather_tensors(adapter_state_dict(model), rank0_only=False)
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(out / f"rank{rank}.safetensors"))
