"""Working with what training leaves behind: evaluate, merge into a plain model, describe.

An adapter directory written by training carries ``hybridpeft_run.json`` beside
the adapter files (base model, task, step, how the base was quantized), so ``eval``
and ``merge`` need no more than the directory; ``--model`` / ``--task`` /
``--quantization`` override or supply them for adapters saved elsewhere.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..api import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, merge_and_unload, read_adapter_config
from ..models import dequantize_model
from ..tasks import get_task
from ..tasks.base import write_predictions
from . import checkpoint as ckpt
from .lock import describe_holder, read_holder
from .loop import RUN_INFO
from .records import read_jsonl
from .setup import load_model


def run_info(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The training metadata saved with an adapter (empty if it has none)."""
    path = Path(adapter_dir) / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def find_adapter_dir(path: str | os.PathLike) -> Path:
    """``path`` itself if it holds an adapter, else ``path/adapter`` (a run dir or a checkpoint).

    Raises:
        FileNotFoundError: neither holds ``adapter_config.json``.
    """
    path = Path(path)
    for candidate in (path, path / ckpt.ADAPTER_DIR):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise FileNotFoundError(f"no adapter in {path}: expected {ADAPTER_CONFIG} there or in {path / ckpt.ADAPTER_DIR}")


def _base_and_task(adapter_dir: Path, model: str | None, task: str | None, task_args: dict[str, Any] | None):
    info = run_info(adapter_dir)
    model_name = model or info.get("base_model")
    task_name = task or info.get("task")
    if model_name is None:
        raise ValueError(f"{adapter_dir} does not record its base model; pass --model")
    args = task_args if task_args is not None else (info.get("task_args", {}) if task_name == info.get("task") else {})
    return model_name, (get_task(task_name, **args) if task_name else None)


RECORDED = "recorded"  # quantization: as the adapter's run info says (none if it says nothing)


def base_quantization(adapter_dir: Path, quantization: str | None = RECORDED) -> tuple[str | None, str | None]:
    """(quantization, compute dtype) to load an adapter's base with: the run's, unless overridden
    (``None`` or ``"none"``: the float base; ``"nf4"``/``"fp4"``/``"int8"``: that)."""
    info = run_info(adapter_dir)
    if quantization == RECORDED:
        return info.get("quantization"), info.get("compute_dtype")
    return (None, None) if quantization in (None, "none") else (quantization, None)


def load_adapted(adapter: str | os.PathLike, model: str | None = None, task: str | None = None,
                 task_args: dict[str, Any] | None = None, dtype: str = "float32", quantization: str | None = RECORDED):
    """(adapted model, tokenizer, task or None) for an adapter directory.

    The base is quantized as it was in training (the run info), unless ``quantization``
    says otherwise; see ``base_quantization``.
    """
    adapter_dir = find_adapter_dir(adapter)
    model_name, task_obj = _base_and_task(adapter_dir, model, task, task_args)
    kind_task = task_obj if task_obj is not None else _CausalKind()
    quant, compute = base_quantization(adapter_dir, quantization)
    base, tokenizer = load_model(model_name, kind_task, dtype, quantization=quant, compute_dtype=compute)
    load_adapter(base, adapter_dir)
    return base, tokenizer, task_obj


class _CausalKind:
    kind = "causal"
    num_labels = 0


def evaluate_adapter(adapter: str | os.PathLike | None, model: str | None = None, task: str | None = None,
                     split: str | None = None, limit: int | None = None, batch_size: int = 16,
                     data_dir: str | None = None, seed: int = 0, task_args: dict[str, Any] | None = None,
                     quantization: str | None = RECORDED, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The task metric of an adapter (or of the base model when ``adapter`` is None).

    ``quantization``: how to load the base (default: as in training; for ``--base``, as stored).
    With ``out_dir``, also writes ``metrics.json`` (what is returned) and ``predictions.jsonl``
    (one record per example: input, output, reference and its score; see ``Task.predictions``);
    ``out_dir="auto"`` picks ``default_eval_dir``. The directory written is returned as ``output_dir``.

    Raises:
        ValueError: ``limit`` or ``batch_size`` is below 1, or the split has no examples
            (a score over nothing would read as a real score).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit!r} is invalid: expected a positive number of examples (or None for all)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected a positive integer")
    if adapter is not None:
        net, tokenizer, task_obj = load_adapted(adapter, model, task, task_args, quantization=quantization)
    else:
        if model is None or task is None:
            raise ValueError("evaluating a base model needs --model and --task")
        task_obj = get_task(task, **(task_args or {}))
        quant = None if quantization in (RECORDED, None, "none") else quantization
        net, tokenizer = load_model(model, task_obj, quantization=quant)
    if task_obj is None:
        raise ValueError(f"{adapter} does not record its task; pass --task")
    split = split or getattr(task_obj, "eval_split", "test")
    examples = task_obj.load(split, data_dir, limit, seed)
    if not examples:
        raise ValueError(f"split {split!r} of task {task_obj.name!r} has no examples to score")
    metrics = task_obj.evaluate(net, tokenizer, examples, batch_size=batch_size)
    result = {"task": task_obj.name, "split": split, "n": len(examples), **{k: float(v) for k, v in metrics.items()}}
    if out_dir is not None:
        out = default_eval_dir(adapter, task_obj.name, split) if str(out_dir) == "auto" else Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_predictions(out / "predictions.jsonl", task_obj.predictions(examples))
        base = model or (run_info(find_adapter_dir(adapter)).get("base_model") if adapter is not None else None)
        (out / "metrics.json").write_text(json.dumps({**result, "adapter": None if adapter is None else str(adapter),
                                                      "model": base}, indent=2) + "\n")
        result["output_dir"] = str(out)
    return result


def default_eval_dir(adapter: str | os.PathLike | None, task: str, split: str) -> Path:
    """Where ``hybridpeft eval`` writes without ``--out``: ``eval-<task>-<split>`` in the run dir
    (the adapter's parent when given a run's ``adapter/``), else in the current directory."""
    name = "eval-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{task}-{split}")
    if adapter is None:
        return Path(name)
    path = Path(adapter)
    home = path.parent if (path / ADAPTER_CONFIG).is_file() and path.name in ("adapter", "best_adapter") else path
    return home / name


def merge_to_dir(adapter: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
                 task: str | None = None, dtype: str = "float32", overwrite: bool = False,
                 quantization: str | None = RECORDED) -> Path:
    """Merge an adapter into its base and save a plain float ``save_pretrained`` directory (with tokenizer).

    The result loads with ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification``
    alone; no hybridpeft code is needed to run it. It is written beside ``out`` first and
    moved into place when complete, so ``out`` is never left half-written. An adapter
    trained on a quantized base merges, by default, onto that same quantized base
    dequantized (the function it was trained with: ``dequant(W) + ΔW``), and every other
    quantized layer is dequantized too; ``quantization="none"`` merges onto the original
    float weights instead.

    Raises:
        FileExistsError: ``out`` is a file or a non-empty directory and ``overwrite`` is False
            (checked before any model is loaded).
    """
    out = Path(out)
    _check_merge_target(out, overwrite)
    net, tokenizer, _ = load_adapted(adapter, model, task, dtype=dtype, quantization=quantization)
    merge_and_unload(net)
    dequantize_model(net)
    staging = out.with_name(f".{out.name}.merging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        net.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not (staging / "config.json").is_file():
            raise OSError(f"saving the merged model to {staging} wrote no config.json")
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _check_merge_target(out: Path, overwrite: bool) -> None:
    _check_target(out, overwrite, "merge")


def _check_target(out: Path, overwrite: bool, what: str) -> None:
    if not out.exists():
        return
    if not out.is_dir() and (what != "merge" or not overwrite):  # an export writes files into a directory
        raise FileExistsError(f"{what} target {out} is a file, not a directory; choose another path"
                              + (" or pass --overwrite" if what == "merge" else ""))
    if not overwrite and any(out.iterdir()):
        raise FileExistsError(f"{what} target {out} is a non-empty directory; choose another path or pass --overwrite "
                              + ("to replace its contents" if what == "merge" else "to replace its adapter files"))


def export_adapter(adapter: str | os.PathLike, out: str | os.PathLike, fmt: str = "peft", model: str | None = None,
                   task: str | None = None, base_model: str | None = None, overwrite: bool = False) -> Path:
    """Write an adapter dir (or a run / checkpoint's adapter) in another library's format.

    ``fmt="peft"``: HF PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``
    (``hybridpeft.peft_format.export_peft``). The method is checked before any model
    loads; ``base_model`` (recorded as ``base_model_name_or_path``) defaults to the
    run's base model, offline aliases given by their hub ids.

    Raises:
        NotRepresentable: the method has no such form (nothing is written).
        FileExistsError: ``out`` is a file or a non-empty directory and ``overwrite`` is False
            (as for ``merge``; checked before any model is loaded).
    """
    from ..models import hub_id
    from ..peft_format import check_exportable, export_peft

    if fmt != "peft":
        raise ValueError(f"--format {fmt!r} is invalid: expected 'peft'")
    adapter_dir = find_adapter_dir(adapter)
    check_exportable(read_adapter_config(adapter_dir).method)
    _check_target(Path(out), overwrite, "export")
    net, _, _ = load_adapted(adapter_dir, model, task)
    name = base_model or hub_id(model or run_info(adapter_dir).get("base_model") or "") or None
    return export_peft(net, out, base_model_name_or_path=name)


def check_peft_export(adapter: str | os.PathLike, exported: str | os.PathLike, model: str | None = None,
                      task: str | None = None) -> float:
    """Load ``exported`` with HF PEFT itself onto a fresh base model and return the largest
    |difference| between its logits and ours on a probe sentence (the optional check; needs ``peft``).

    Raises:
        ImportError: peft is not installed.
    """
    try:
        import peft
    except ImportError:
        raise ImportError("the export check loads the adapter with HF PEFT: pip install peft") from None

    net, tokenizer, task_obj = load_adapted(adapter, model, task)
    model_name, _ = _base_and_task(find_adapter_dir(adapter), model, task, None)
    base, _ = load_model(model_name, task_obj if task_obj is not None else _CausalKind())
    theirs = peft.PeftModel.from_pretrained(base, str(exported))
    probe = tokenizer(["Question: Tom has 3 apples and gets 4 more. Answer:"], return_tensors="pt")
    with torch.no_grad():
        ours_out, theirs_out = net.eval()(**probe).logits, theirs.eval()(**probe).logits
    return float((ours_out - theirs_out).abs().max())


def describe(path: str | os.PathLike) -> str:
    """A readable summary of an adapter dir, a checkpoint or a run dir."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    lines: list[str] = []
    if (path / "config.yaml").is_file() and (path / "run.json").is_file():
        lines += _describe_run(path)
    elif (path / ckpt.TRAINER_STATE).is_file() or (path / ckpt.MARKER).is_file():
        lines += _describe_checkpoint(path)
    else:
        lines += _describe_adapter(find_adapter_dir(path))
    return "\n".join(lines)


def _describe_adapter(adapter_dir: Path) -> list[str]:
    from safetensors import safe_open

    config = read_adapter_config(adapter_dir)
    info = run_info(adapter_dir)
    fields = {k: v for k, v in config.to_dict().items() if k not in ("format_version", "method")}
    lines = [f"adapter: {adapter_dir}", f"  method: {config.method}"]
    for key, value in fields.items():
        lines.append(f"  {key}: {value}")
    if info:
        lines.append("  trained: " + ", ".join(f"{k}={info[k]}" for k in ("base_model", "task", "step", "seed") if k in info))
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        return lines + [f"  (no {ADAPTER_WEIGHTS})"]
    total, dtypes, layers = 0, set(), set()
    scalars: dict[str, list[float]] = {}
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            tensor = f.get_tensor(key)
            total += tensor.numel()
            dtypes.add(str(tensor.dtype).replace("torch.", ""))
            owner, sep, local = key.partition(".adapter.")
            if sep:
                layers.add(owner)
                if tensor.numel() == 1 and tensor.is_floating_point():  # per-layer scalars such as λ
                    scalars.setdefault(local, []).append(float(tensor))
    lines.append(f"  tensors: {len(keys)} ({total:,} values, {', '.join(sorted(dtypes))}), "
                 f"{weights.stat().st_size / 2**20:.2f} MiB on disk")
    lines.append(f"  adapted layers: {len(layers)}")
    for name, values in sorted(scalars.items()):
        t = torch.tensor(values)
        lines.append(f"  per-layer {name}: min {t.min():.4f}  mean {t.mean():.4f}  max {t.max():.4f}  ({len(values)} layers)")
    return lines


def _describe_checkpoint(path: Path) -> list[str]:
    reason = ckpt.verify(path)
    lines = [f"checkpoint: {path}", f"  status: {'complete' if reason is None else 'UNUSABLE: ' + reason}"]
    if (path / ckpt.TRAINER_STATE).is_file():
        try:
            state = ckpt.load_trainer_state(path)
            loop = state.get("loop", {})
            lines.append(f"  step: {loop.get('step')}, data position: {state.get('data')}, "
                         f"skipped steps: {loop.get('skipped')}, best val loss: {loop.get('best_val_loss')}")
            lines.append(f"  world size {state.get('world_size')}, batch size {state.get('batch_size')}, "
                         f"grad accum {state.get('grad_accum')}, seed {state.get('seed')}"
                         + (", written by a sharded (FSDP) run (whole tensors)" if state.get("sharded") else ""))
        except Exception as err:  # a corrupt file is exactly what info should report, not crash on
            lines.append(f"  trainer state unreadable: {err}")
    if (path / ckpt.ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        lines += _describe_adapter(path / ckpt.ADAPTER_DIR)
    return lines


def _describe_run(path: Path) -> list[str]:
    import yaml

    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    meta = json.loads((path / "run.json").read_text())
    lines = [f"run: {path}",
             f"  task: {config.get('data', {}).get('task')}, method: {config.get('adapter', {}).get('method')}, "
             f"model: {config.get('model', {}).get('name')}, seed: {meta.get('seed')}, world size: {meta.get('world_size')}"
             + (f" ({meta['parallel']['strategy']})" if isinstance(meta.get("parallel"), dict) else "")]
    steps = read_jsonl(path / "train_log.jsonl")
    if steps:
        last = steps[-1]
        lines.append(f"  logged steps: {len(steps)}, last step {last.get('step')} loss {last.get('loss')}")
    results = path / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        lines.append(f"  before: {data.get('before')}")
        lines.append(f"  after:  {data.get('after')}")
    holder = read_holder(path)
    if holder is not None:
        lines.append(f"  in use by a training process: {describe_holder(holder)}")
    for step, cdir in ckpt.list_checkpoints(path / "checkpoints"):
        reason = ckpt.verify(cdir)
        lines.append(f"  checkpoint step {step}: {'complete' if reason is None else 'UNUSABLE: ' + reason}")
    for cdir in sorted((path / "checkpoints").glob("*" + ckpt.SUSPECT_SUFFIX)):
        lines.append(f"  set aside after a non-finite abort (not resumed from unless named): {cdir.name}")
    if (path / "adapter" / ADAPTER_CONFIG).is_file():
        lines += _describe_adapter(path / "adapter")
    return lines
