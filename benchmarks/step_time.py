"""Training-step time, peak memory and tunable parameters: our adapters beside HF PEFT's.

For every method a fresh random-init Llama (same seed) is adapted on
q/k/v/o/gate/up/down and trained with AdamW on one fixed batch; a step is
forward + backward + ``optimizer.step()`` (+ ``hybridpeft.after_optimizer_step``
for ours). We report the median step after warm-up (device synchronized
around each step), the peak memory and the tunable parameters, plus two
references: the frozen fwd+bwd floor (nothing trains, but backward still runs
through every layer) and full fine-tuning.

Peak memory:
  * CUDA: ``torch.cuda.max_memory_allocated`` over the training steps, minus
    what was allocated before the model was built (so weights, adapters,
    gradients, optimizer state and activations count). A method's preparation
    (e.g. LoRA-GA's gradient estimate) has its own peak, ``prepare_peak_bytes``.
  * CPU: the process's resident-set high-water mark over the training steps
    (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident set
    just before the model was built — the same quantity as on CUDA, plus
    allocator slack. The process is warmed up first (``warm_up_process``) so
    that lazily imported code is not charged to a method.
    Each method runs in a fresh subprocess (``--isolate``, the CPU default)
    so that memory freed by one method cannot hide another's peak.

Usage::

    python benchmarks/step_time.py --device cpu                       # CPU table
    python benchmarks/step_time.py --device cuda --size 1b --dtype bfloat16
    python benchmarks/step_time.py --device cuda --size 8b --methods lora boft hybrid peft-lora

Writes ``<out>/<device>-<size>-<dtype>[-nf4][-compiled].{json,md}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:  # a fresh checkout without `pip install -e .` still runs
    import hybridpeft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

import perf_methods  # noqa: E402
import perf_report  # noqa: E402
from perf_models import SIZES, TARGETS, build_model, make_batch, quantize_targets_nf4  # noqa: E402

WORKER_MARK = "@@STEP_TIME_RESULT@@"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class RunSpec:
    """Everything one measurement needs; JSON-serializable for the subprocess worker.

    Args:
        budget_s: soft cap on one method's timed loop: once the projected time
            of the remaining steps would pass it, the loop stops (at least one
            timed step is kept) and ``steps_timed`` says how many ran.
    """

    device: str = "cpu"
    size: str = "cpu-small"
    dtype: str = "float32"
    steps: int = 5
    warmup: int = 2
    seed: int = 0
    batch: int | None = None
    seq: int | None = None
    quant: str | None = None
    compile: bool = False
    budget_s: float | None = None
    threads: int | None = None
    settings: perf_methods.Settings = field(default_factory=perf_methods.Settings)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "RunSpec":
        data = dict(data)
        data["settings"] = perf_methods.Settings(**data.get("settings", {}))
        return RunSpec(**data)


# ---------------------------------------------------------------- memory

class MemoryMeter:
    """Peak memory above a baseline taken by ``start()``; see the module docstring."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.base = 0
        self.method = "cuda max_memory_allocated" if self.cuda else "VmHWM - VmRSS (clear_refs reset)"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS (Linux ≥ 4.0)
        except OSError:
            self.method = "ru_maxrss - VmRSS (no reset available: an upper bound)"
        self.base = _proc_status_bytes("VmRSS")

    def restart_peak(self) -> None:
        """Forget the peak so far (keeping the baseline): the next ``peak()`` covers only what follows."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated() - self.base
        return _proc_status_bytes("VmRSS") - self.base

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_status_bytes("VmHWM") - self.base


def _proc_status_bytes(key: str) -> int:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:  # not Linux: resource's peak is all there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


# ---------------------------------------------------------------- one method

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model: torch.nn.Module, batch: torch.Tensor, optimizer: torch.optim.Optimizer | None,
               after_step: Callable[[], None] | None) -> float:
    """One fwd + bwd + optimizer step; returns the loss. ``after_step`` runs before
    ``zero_grad`` because the Hybrid's λ update reads the gradients."""
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    if after_step is not None:
        after_step()
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    return loss.detach()


def step_profile(step: Callable[[], Any], device: str) -> dict[str, Any]:
    """ATen kernels one step dispatches (≈ kernel launches on a GPU; views not counted) and,
    on CUDA, how often it makes the host wait for the device (``set_sync_debug_mode``):
    every such wait stalls the kernel queue, which at 224 adapted modules adds up."""
    import warnings

    from op_counts import OpCounter

    out: dict[str, Any] = {}
    cuda = device.startswith("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with OpCounter() as counter:
                step()
            _sync(device)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(previous)
    out["kernels_per_step"] = sum(counter.kernels.values())
    if cuda:
        out["host_syncs_per_step"] = sum("synchroniz" in str(w.message).lower() for w in caught)
    return out


_WARM: set[tuple[str, torch.dtype]] = set()


def warm_up_process(device: str, dtype: torch.dtype) -> None:
    """Import every library a method may touch and run one tiny training step, once per process.

    Otherwise the first method's memory would include lazily imported modules
    (``import peft`` alone pulls ~150 MB of transformers code into the resident
    set) and first-use buffers of the math libraries, and methods would be
    charged differently depending on what they happen to import.
    """
    if (device, dtype) in _WARM:
        return
    import hybridpeft  # noqa: F401
    import hybridpeft.gradient_init  # noqa: F401
    try:
        import peft  # noqa: F401
    except ImportError:
        pass
    size = SIZES["tiny"]
    model = build_model(size, device, dtype, seed=0)
    batch = make_batch(size, device, seed=0)
    model(input_ids=batch, labels=batch).loss.backward()
    del model, batch
    gc.collect()
    _WARM.add((device, dtype))


def measure(name: str, spec: RunSpec) -> dict[str, Any]:
    """Build, adapt and time one method; returns one result row (see ``perf_report``)."""
    method = perf_methods.ALL[name]
    row: dict[str, Any] = {"method": name, "family": method.family, "summary": method.summary}
    reason = method.missing()
    if reason is not None:
        return {**row, "status": "skipped", "reason": reason}
    if spec.threads:
        torch.set_num_threads(spec.threads)
    size = SIZES[spec.size]
    dtype = DTYPES[spec.dtype]
    warm_up_process(spec.device, dtype)
    meter = MemoryMeter(spec.device)
    gc.collect()
    if spec.device.startswith("cuda"):
        torch.cuda.empty_cache()
    meter.start()
    t_build = time.perf_counter()
    model = build_model(size, spec.device, dtype, spec.seed)
    if spec.quant == "nf4":
        row["quantized_layers"] = quantize_targets_nf4(model, TARGETS, dtype)
    batch = make_batch(size, spec.device, spec.seed, spec.batch, spec.seq)
    _sync(spec.device)
    row["build_s"] = time.perf_counter() - t_build
    row["weights_bytes"] = meter.current()
    t_prep = time.perf_counter()
    prepared = method.prepare(model, spec.settings, batch)
    _sync(spec.device)
    row["prepare_s"] = time.perf_counter() - t_prep
    row["prepare_peak_bytes"] = meter.peak()  # e.g. LoRA-GA's gradient estimate
    meter.restart_peak()  # peak_bytes below: the training steps alone
    row.update(prepared.info)
    row["tunable_params"] = sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)
    row["total_params"] = sum(p.numel() for p in prepared.model.parameters())
    step_model = torch.compile(prepared.model) if spec.compile else prepared.model

    times: list[float] = []
    cpu_times: list[float] = []  # this process's CPU seconds per step: on a shared machine, what load does not inflate
    losses: list[float] = []
    started = time.perf_counter()
    for i in range(spec.warmup + spec.steps):
        _sync(spec.device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = train_step(step_model, batch, prepared.optimizer, prepared.after_step)
        _sync(spec.device)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        losses.append(float(loss))
        if i < spec.warmup:
            continue
        times.append(elapsed)
        cpu_times.append(cpu)
        remaining = spec.warmup + spec.steps - 1 - i
        spent = time.perf_counter() - started
        if spec.budget_s is not None and remaining and spent + remaining * statistics.median(times) > spec.budget_s:
            row["note_budget"] = f"stopped after {len(times)} timed steps to stay within {spec.budget_s:.0f} s"
            break
    if not spec.compile:  # one more, untimed step: what it launches and where it waits for the device
        row.update(step_profile(lambda: train_step(step_model, batch, prepared.optimizer, prepared.after_step),
                                spec.device))
    row.update(
        status="ok",
        median_s=statistics.median(times),
        min_s=min(times),
        times_s=times,
        cpu_median_s=statistics.median(cpu_times),
        steps_timed=len(times),
        peak_bytes=meter.peak(),
        memory_method=meter.method,
        loss_first=losses[0],
        loss_last=losses[-1],
    )
    del step_model, prepared, model, batch
    gc.collect()
    if spec.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def _measure_safely(name: str, spec: RunSpec) -> dict[str, Any]:
    try:
        return measure(name, spec)
    except Exception as err:  # one failing method must not cost the rest of a GPU budget
        method = perf_methods.ALL[name]
        row = {"method": name, "family": method.family, "summary": method.summary,
               "status": "error", "reason": f"{type(err).__name__}: {err}"[:500]}
    # Out of the except block the traceback (and the tensors its frames hold) is gone.
    gc.collect()
    if spec.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def _measure_in_subprocess(name: str, spec: RunSpec, timeout: float | None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, json.dumps(dataclasses.asdict(spec))]
    method = perf_methods.ALL[name]
    row = {"method": name, "family": method.family, "summary": method.summary}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": "error", "reason": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(WORKER_MARK):
            return json.loads(line[len(WORKER_MARK):])
    return {**row, "status": "error", "reason": f"worker exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}


# ---------------------------------------------------------------- a whole run

def run_benchmark(spec: RunSpec, methods: list[str], isolate: bool = False, method_timeout: float | None = None,
                  rounds: int = 1, on_row: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None,
                  ) -> list[dict[str, Any]]:
    """Measure ``methods`` under one ``spec``, ``rounds`` times over.

    Rounds interleave the methods (round ``j`` starts at method ``j``), so a change
    of machine load over the run spreads over every method instead of landing on
    a few; each method keeps its quietest round (``merge_rounds``).
    ``on_row(latest, merged_rows)`` runs after every measurement (the CLI rewrites
    the tables then, so a run cut short keeps what it measured).
    """
    unknown = [n for n in methods if n not in perf_methods.ALL]
    if unknown:
        raise ValueError(f"methods entries {unknown} are unknown; known: {sorted(perf_methods.ALL)}")
    if rounds < 1:
        raise ValueError(f"rounds={rounds!r} is invalid: expected a positive integer")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    for j in range(rounds):
        for name in methods[j % len(methods):] + methods[: j % len(methods)]:
            if runs[name] and runs[name][0].get("status") != "ok":
                continue  # skipped or failed once: do not pay for it again
            row = _measure_in_subprocess(name, spec, method_timeout) if isolate else _measure_safely(name, spec)
            runs[name].append(row)
            if on_row is not None:
                on_row(row, [merge_rounds(r) for r in runs.values() if r])
    return [merge_rounds(runs[name]) for name in methods]


def merge_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a method's rounds: the round with the lowest median step is kept
    (other load only ever adds time, so the quietest round is the best estimate;
    on a shared machine rounds differed 3× in one run), with every round's median
    and the largest peak memory recorded beside it; the CPU time is the lowest round's median."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return rows[-1]
    best = min(ok, key=lambda r: r["median_s"])
    merged = dict(best)
    merged.update(
        rounds=len(ok),
        round_medians_s=[r["median_s"] for r in ok],
        peak_bytes=max(r["peak_bytes"] for r in ok),
    )
    if all("cpu_median_s" in r for r in ok):
        merged["cpu_median_s"] = min(r["cpu_median_s"] for r in ok)
    return merged


def default_methods() -> list[str]:
    return list(perf_methods.ALL)


def machine_description(device: str) -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo)
        info["cpu"] = found.group(1).strip() if found else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    for package in ("transformers", "peft", "bitsandbytes"):
        try:
            info[package] = __import__(package).__version__
        except Exception:
            info[package] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def output_stem(spec: RunSpec, tag: str = "") -> str:
    parts = [spec.device.split(":")[0], spec.size, spec.dtype]
    if spec.quant:
        parts.append(spec.quant)
    if spec.compile:
        parts.append("compiled")
    if tag:
        parts.append(tag)
    return "-".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--size", choices=sorted(SIZES), help="model shape (default: cpu-small on CPU, 1b on CUDA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--steps", type=int, help="timed steps (default 5 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2 on CPU, 3 on CUDA)")
    p.add_argument("--batch", type=int, help="sequences per step (default: the size's)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the size's)")
    p.add_argument("--methods", nargs="+", help=f"subset of {list(perf_methods.ALL)} (default: all)")
    p.add_argument("--quant", choices=["nf4"], help="quantize the target layers' base weights (bitsandbytes)")
    p.add_argument("--compile", action="store_true", help="torch.compile the whole adapted model")
    p.add_argument("--peft-boft-ext", choices=["auto", "off"], default="auto",
                   help="let PEFT build its BOFT CUDA extension (without it PEFT's BOFT runs with m=1)")
    p.add_argument("--ga-init", action=argparse.BooleanOptionalAction, default=True,
                   help="run the LoRA-GA/Hybrid gradient estimate before timing (off: zero start, same step cost)")
    p.add_argument("--budget-s", type=float, help="soft cap on one method's timed loop, seconds")
    p.add_argument("--method-timeout", type=float, help="hard cap per method with --isolate, seconds")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one subprocess per method (default: on for CPU, off for CUDA)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every method this often, interleaved, keeping each one's quietest round (noisy machines)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in each measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    p.add_argument("--out", default=str(HERE.parent / "docs" / "perf"))
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "SPEC_JSON"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    cuda = args.device.startswith("cuda")
    return RunSpec(
        device=args.device,
        size=args.size or ("1b" if cuda else "cpu-small"),
        dtype=args.dtype or ("bfloat16" if cuda else "float32"),
        steps=args.steps if args.steps is not None else (10 if cuda else 5),
        warmup=args.warmup if args.warmup is not None else (3 if cuda else 2),
        seed=args.seed,
        batch=args.batch,
        seq=args.seq,
        quant=args.quant,
        compile=args.compile,
        budget_s=args.budget_s,
        threads=args.threads,
        settings=perf_methods.Settings(peft_boft_ext=args.peft_boft_ext, ga_init=args.ga_init),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        name, spec_json = args.worker
        row = _measure_safely(name, RunSpec.from_dict(json.loads(spec_json)))
        print(WORKER_MARK + json.dumps(row), flush=True)
        return 0
    spec = spec_from_args(args)
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    methods = args.methods or default_methods()
    isolate = args.isolate if args.isolate is not None else not spec.device.startswith("cuda")
    size = SIZES[spec.size]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python benchmarks/step_time.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine_description(spec.device),
        "spec": dataclasses.asdict(spec),
        "tokens_per_step": (spec.batch or size.batch) * (spec.seq or size.seq),
        "model": dataclasses.asdict(size),
        "isolated_subprocesses": isolate,
        "rounds": args.rounds,
        "note": args.note,
    }
    out = Path(args.out)
    stem = output_stem(spec, args.tag)
    def land(latest: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        print(perf_report.one_line(latest), flush=True)
        perf_report.write(meta, rows, out, stem)

    print(f"step_time: {spec.device} {spec.size} {spec.dtype}, {meta['tokens_per_step']} tokens/step, "
          f"{spec.warmup} warm-up + {spec.steps} timed steps × {args.rounds} round(s), methods: {' '.join(methods)}",
          flush=True)
    rows = run_benchmark(spec, methods, isolate=isolate, method_timeout=args.method_timeout, rounds=args.rounds,
                         on_row=land)
    json_path, md_path = perf_report.write(meta, rows, out, stem)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
