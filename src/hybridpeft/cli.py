"""The ``hybridpeft`` command: a thin argparse layer over typed functions.

    hybridpeft train                       # the embedded default job (see configs/default.yaml)
    hybridpeft train --config job.yaml --set train.lr=2e-4 --set adapter.method=lora
    hybridpeft train --config job.yaml --resume
    hybridpeft eval  runs/default/adapter [--split test --limit 200]
    hybridpeft merge runs/default/adapter merged-model/
    hybridpeft info  runs/default

Each subcommand is one row of ``COMMANDS``: (help, add_arguments, run), added with
``register_command``. ``run`` receives the parsed namespace and returns an exit
status; the work itself is done by functions in ``hybridpeft.train`` and
``hybridpeft.bench`` that take ordinary typed arguments.

Exit status: 0 success, 1 a runtime error, 2 an invalid configuration or
arguments (every problem listed), 3 training aborted on non-finite steps,
130 interrupted (Ctrl-C or SIGTERM; what finished is kept and the message says
how to continue). Expected failures (bad input, a missing file, a busy or full
run dir) print one line, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

EXIT_ERROR, EXIT_CONFIG, EXIT_ABORTED = 1, 2, 3


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


COMMANDS: dict[str, Command] = {}


def register_command(name: str, command: Command) -> None:
    """Add a subcommand: one row of ``COMMANDS``."""
    COMMANDS[name] = command


# ---------------------------------------------------------------- train

_SHORTCUTS = {  # flag -> dotted config key
    "method": "adapter.method", "task": "data.task", "model": "model.name",
    "run_dir": "output.run_dir", "max_steps": "train.max_steps", "seed": "train.seed",
}


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE",
                   help="job YAML (default: the embedded default job, same as configs/default.yaml)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=2e-4 --set adapter.lora.r=16 "
                        "(value parsed as YAML; repeatable)")
    p.add_argument("--method", help="shortcut for --set adapter.method=… (e.g. lora, lora_ga, boft, unitary, hybrid, full)")
    p.add_argument("--task", help="shortcut for --set data.task=…")
    p.add_argument("--model", help="shortcut for --set model.name=… (hub id, local dir, smollm2-135m, minilm-l6)")
    p.add_argument("--run-dir", help="shortcut for --set output.run_dir=…")
    p.add_argument("--max-steps", help="shortcut for --set train.max_steps=…")
    p.add_argument("--seed", help="shortcut for --set train.seed=…")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the newest intact checkpoint of the run dir (or the one given)")
    p.add_argument("--print-config", action="store_true",
                   help="validate, print the resolved config as YAML and exit (loads no model)")
    _unsafe_exec_argument(p)


def _unsafe_exec_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-unsafe-exec", action="store_true",
                   help="where no OS sandbox (bubblewrap) is available, run generated code (HumanEval) anyway, "
                        "with resource limits only; without this flag such runs are refused")


def apply_unsafe_exec(args: argparse.Namespace) -> None:
    """``--allow-unsafe-exec``: opt in for this process and the workers it starts (an environment variable)."""
    if getattr(args, "allow_unsafe_exec", False):
        from .tasks.sandbox import UNSAFE_ENV

        os.environ[UNSAFE_ENV] = "1"


def _job_overrides(args: argparse.Namespace) -> list[str]:
    shortcuts = [f"{key}={getattr(args, flag)}" for flag, key in _SHORTCUTS.items() if getattr(args, flag) is not None]
    return shortcuts + list(args.overrides)


def resolve_job(config: str | None, overrides: list[str]):
    """The validated ``JobConfig`` for a config file (or the embedded default) plus overrides."""
    from .train.job_config import load_config
    from .train.presets import default_job

    if config is None:
        return load_config(data=default_job(), overrides=overrides)
    return load_config(config, overrides)


def _run_train(args: argparse.Namespace) -> int:
    from .train import train
    from .train.job_config import dump_yaml

    job = resolve_job(args.config, _job_overrides(args))
    if args.print_config:
        print(dump_yaml(job), end="")
        return 0
    result = train(job, resume=args.resume)
    from .distributed import rank

    if rank() != 0:  # several processes: one summary, from rank 0
        return 0
    print(json.dumps({"run_dir": str(result.run_dir), "step": result.step, "stop_reason": result.stop_reason,
                      "before": result.before, "after": result.after, "adapter": str(result.adapter_dir),
                      "skipped_steps": result.skipped_steps}, indent=2))
    return 0


# ---------------------------------------------------------------- eval / merge / info

def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", nargs="?", help="adapter dir, checkpoint or run dir (omit with --base)")
    p.add_argument("--base", action="store_true", help="evaluate the base model without an adapter")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--task", help="task (default: the one the adapter was trained on)")
    p.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE", help="task constructor argument")
    p.add_argument("--split", help="split to score (default: the task's evaluation split)")
    p.add_argument("--limit", type=_positive_int, help="score only the first N examples")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--data-dir", help="local data files for tasks that read them")
    p.add_argument("--seed", type=int, default=0, help="seed for tasks that subsample or generate")
    p.add_argument("--out", help="directory for metrics.json and predictions.jsonl (per example: input, output, "
                                 "reference, score); default: eval-<task>-<split> in the run dir, or here with --base")
    _unsafe_exec_argument(p)
    _quantization_argument(p)


def _quantization_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization", choices=["recorded", "none", "nf4", "fp4", "int8"], default="recorded",
                   help="how to load the base: as in training (recorded in the adapter's run info; the default), "
                        "the float base (none), or quantized by bitsandbytes")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected a positive integer")
    return value


def _key_values(items: list[str], flag: str) -> dict[str, Any]:
    from .train.job_config import ConfigError, parse_value

    out, errors = {}, []
    for item in items:
        if "=" not in item:
            errors.append(f"{flag} {item!r} is invalid: expected KEY=VALUE")
            continue
        key, raw = item.split("=", 1)
        out[key.strip()] = parse_value(raw)
    if errors:
        raise ConfigError(errors)
    return out


def _run_eval(args: argparse.Namespace) -> int:
    from .train.artifacts import evaluate_adapter

    if (args.adapter is None) != args.base:
        raise ValueError("give an adapter directory, or --base (with --model and --task) for the base model")
    task_args = _key_values(args.task_arg, "--task-arg") if args.task_arg else None
    result = evaluate_adapter(None if args.base else args.adapter, model=args.model, task=args.task, split=args.split,
                              limit=args.limit, batch_size=args.batch_size, data_dir=args.data_dir, seed=args.seed,
                              task_args=task_args, quantization=args.quantization, out_dir=args.out or "auto")
    print(json.dumps(result, indent=2))
    print(f"hybridpeft: per-example predictions in {Path(result['output_dir']) / 'predictions.jsonl'}", file=sys.stderr)
    return 0


def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter dir, checkpoint or run dir")
    p.add_argument("out", help="output directory (save_pretrained format, loads with plain transformers)")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--task", help="task, to know whether the base is a causal LM or a classifier")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a file or a non-empty directory")
    _quantization_argument(p)


def _run_merge(args: argparse.Namespace) -> int:
    from .train.artifacts import merge_to_dir

    out = merge_to_dir(args.adapter, args.out, model=args.model, task=args.task, dtype=args.dtype,
                       overwrite=args.overwrite, quantization=args.quantization)
    print(f"merged model written to {out}")
    return 0


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="an adapter dir, a checkpoint dir or a run dir")


def _run_info(args: argparse.Namespace) -> int:
    from .train.artifacts import describe

    print(describe(args.path))
    return 0


register_command("train", Command(
    "fine-tune a model (no arguments: the embedded default job)", _train_arguments, _run_train,
    "Train with an adapter method on a task. Settings come from the embedded default job or --config, "
    "then shortcuts like --method, then every --set; all invalid values are reported at once before "
    "any model is loaded. Multi-GPU: accelerate launch -m hybridpeft.cli train ...",
))
register_command("eval", Command("score an adapter (or the base model) with its task's metric", _eval_arguments, _run_eval))
register_command("merge", Command("merge an adapter into its base model and save a plain transformers model",
                                  _merge_arguments, _run_merge))


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter dir, checkpoint or run dir")
    p.add_argument("out", help="output directory")
    p.add_argument("--format", default="peft", choices=["peft"],
                   help="peft: HF PEFT's adapter_config.json + adapter_model.safetensors (vLLM, TGI, SGLang, the Hub)")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--task", help="task, to know whether the base is a causal LM or a classifier")
    p.add_argument("--base-model", help="base_model_name_or_path to record (default: the base model's hub id)")
    p.add_argument("--check", action="store_true",
                   help="load the export with HF PEFT (needs peft) and report its largest logit difference from ours")
    p.add_argument("--overwrite", action="store_true",
                   help="write into OUT even if it is a non-empty directory (its adapter files are replaced)")


def _run_export(args: argparse.Namespace) -> int:
    from .peft_format import NotRepresentable, serving_problems
    from .train.artifacts import export_adapter

    try:
        out = export_adapter(args.adapter, args.out, args.format, model=args.model, task=args.task,
                             base_model=args.base_model, overwrite=args.overwrite)
    except NotRepresentable as err:
        print(f"hybridpeft: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"PEFT adapter written to {out}")
    for problem in serving_problems(out):
        print(f"  note for serving engines: {problem}")
    if args.check:
        from .train.artifacts import check_peft_export

        try:
            error = check_peft_export(args.adapter, out, model=args.model, task=args.task)
        except ImportError as err:
            print(f"hybridpeft: {err}", file=sys.stderr)
            return EXIT_ERROR
        print(f"  check: peft.PeftModel.from_pretrained reproduces our logits within {error:.2e} (max |difference|)")
    return 0


register_command("export", Command(
    "write an adapter in HF PEFT's format (LoRA, LoRA-GA as a rank-2r LoRA, DoRA, IA³)", _export_arguments,
    _run_export, "Write the adapter as adapter_config.json + adapter_model.safetensors, which "
    "peft.PeftModel.from_pretrained, vLLM, TGI and SGLang load. BOFT, unitary and Hybrid adapters have no "
    "PEFT form (exit 2, nothing written): merge them with `hybridpeft merge` instead.",
))
register_command("info", Command("show what an adapter dir, checkpoint or run dir holds", _info_arguments, _run_info))


# ---------------------------------------------------------------- bench / report (hybridpeft.bench)

def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from .bench.commands import add_bench_arguments

    add_bench_arguments(p)
    _unsafe_exec_argument(p)


def _run_bench(args: argparse.Namespace) -> int:
    from .bench.commands import bench_command

    return bench_command(args.config, set_=args.set_, output=args.output, max_attempts=args.max_attempts,
                         progress=args.progress, report_dir=args.report_dir, workers=args.workers)


def _report_arguments(p: argparse.ArgumentParser) -> None:
    from .bench.commands import add_report_arguments

    add_report_arguments(p)


def _run_report(args: argparse.Namespace) -> int:
    from .bench.commands import report_command

    return report_command(args.results, out=args.out, reference=args.reference, title=args.title, notes=args.notes,
                          bench=args.bench)


register_command("bench", Command(
    "run or resume a benchmark grid (methods × tasks × seeds × models)", _bench_arguments, _run_bench,
    "Run every unfinished run of a benchmark YAML (e.g. benchmarks/quick.yaml) and append each to its "
    "results store; finished runs are skipped, failed ones retried up to max_attempts.",
))
register_command("report", Command("render a benchmark report (Markdown, HTML, PNG figures) from a results store",
                                   _report_arguments, _run_report))


# ---------------------------------------------------------------- plan (hybridpeft.plan)

_PLAN_NUMBERS = {"batch": int, "seq": int, "world_size": int, "device_memory": float}


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    from .plan import NAMED_SHAPES

    p.add_argument("--model", required=True,
                   help=f"a named shape ({', '.join(NAMED_SHAPES)}), a config.json, a directory holding one, or a hub id")
    p.add_argument("--method", default="lora", help="adapter method (lora, lora_ga, boft, unitary, hybrid, full)")
    p.add_argument("--adapter", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the method's config, e.g. --adapter r=16 --adapter ga_estimator=sketch (repeatable)")
    p.add_argument("--targets", help="comma-separated target modules, or all-linear (default: every projection)")
    p.add_argument("--batch", default="1", help="sequences per device micro-batch (default 1)")
    p.add_argument("--seq", default="2048", help="tokens per sequence (default 2048)")
    p.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16 (default bfloat16)")
    p.add_argument("--quantization", default="none", help="none or nf4 (bitsandbytes 4-bit base)")
    p.add_argument("--world-size", default="1", help="devices (default 1)")
    p.add_argument("--sharding", default=None, help="none, ddp or fsdp (default: none for one device, else fsdp)")
    p.add_argument("--device-memory", default=None, metavar="GIB", help="say whether the peak fits in this many GiB")
    p.add_argument("--device-kind", default="cuda", help="cuda (foreach optimizer) or cpu")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder layer's activations in backward (model.gradient_checkpointing)")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")


def _plan_number(name: str, raw: str | None):
    from .plan import PlanInputError

    if raw is None:
        return None
    try:
        return _PLAN_NUMBERS[name](raw)
    except ValueError:
        raise PlanInputError(f"{name.replace('_', '-')}={raw!r} is invalid: expected a "
                             f"{'number' if _PLAN_NUMBERS[name] is float else 'positive integer'}") from None


def _run_plan(args: argparse.Namespace) -> int:
    from .plan import PlanInputError, PlanRequest, format_plan, plan, plan_json
    from .train.job_config import ConfigError

    try:
        world = _plan_number("world_size", args.world_size)
        request = PlanRequest(
            model=args.model, method=args.method, adapter=_key_values(args.adapter, "--adapter"),
            targets=[t.strip() for t in args.targets.split(",")] if args.targets else None,
            batch=_plan_number("batch", args.batch), seq=_plan_number("seq", args.seq), dtype=args.dtype,
            quantization=args.quantization, world_size=world,
            sharding=args.sharding or ("none" if world == 1 else "fsdp"), device_kind=args.device_kind,
            device_memory_gib=_plan_number("device_memory", args.device_memory),
            gradient_checkpointing=args.gradient_checkpointing,
        )
        result = plan(request)
    except (PlanInputError, ConfigError) as err:
        print(f"hybridpeft: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(plan_json(result), indent=2) if args.json else format_plan(result), end="" if not args.json else "\n")
    return 0


register_command("plan", Command(
    "predict peak memory per device for a model, method and setting (no weights loaded)", _plan_arguments, _run_plan,
    "Predict the peak memory per device of a training step — weights, adapter parameters and optimizer states, "
    "gradients, saved activations per adapted module, the loss's transient — and of LoRA-GA's gradient estimate "
    "(exact and sketch), from the model's shapes on the meta device. Bad or impossible settings exit 2.",
))


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="hybridpeft",
        description="Parameter-efficient fine-tuning: LoRA, LoRA-GA, BOFT, unitary adapters and the Hybrid.",
        epilog="Start with:  hybridpeft train   (fine-tunes SmolLM2-135M on a synthetic task in a few minutes on CPU)",
    )
    parser.add_argument("--version", action="version", version=f"hybridpeft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.description or command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (``kill``, a scheduler's stop) unwinds like Ctrl-C: ``finally`` blocks run, the run
    dir lock is released, and the command says what was kept instead of dying silently."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted ``train`` (its own arguments plus --resume)."""
    words = ["hybridpeft", *argv]
    resuming = any(word == "--resume" or word.startswith("--resume=") for word in argv)
    return shlex.join(words if resuming else words + ["--resume"])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return EXIT_CONFIG
    from .tasks.sandbox import SandboxUnavailable
    from .train.failures import TrainingInterrupted
    from .train.job_config import ConfigError
    from .train.lock import RunDirBusy
    from .train.loop import TrainingAborted

    apply_unsafe_exec(args)
    try:
        with _sigterm_as_interrupt():
            return args._run(args)
    except ConfigError as err:
        print(f"hybridpeft: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except TrainingAborted as err:
        print(f"hybridpeft: {err}", file=sys.stderr)
        return EXIT_ABORTED
    # bad input, missing/unwritable files, a full disk, a busy run dir, no sandbox for generated code
    except (ValueError, OSError, RunDirBusy, SandboxUnavailable) as err:
        print(f"hybridpeft: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except TrainingInterrupted as err:
        go_on = (f"continue with: {_resume_command(sys.argv[1:] if argv is None else list(argv))}"
                 if err.checkpoint is not None else "rerun the same command to start again")
        print(f"hybridpeft: {err}; {go_on}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what finished is saved; say how to go on
        print(f"hybridpeft: interrupted; finished work is kept — rerun the same `{args.command}` command "
              f"(with --resume for train) to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
