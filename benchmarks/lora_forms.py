"""LoRA's forward, four ways, on one layer: which form of ``h + s · B (A x)`` is fastest on this CPU.

Forms (fwd + bwd of one frozen linear layer with a rank-r branch, activations requiring grad):

- ``addmm_``: ``h.addmm_(s·(x Aᵀ), Bᵀ)`` — the GEMM accumulates into the base output in place
  (what ``LoraAdapter`` does when ``AdaptedLinear`` hands it an ``OwnedBaseMatmul``);
- ``addmm``: ``torch.addmm(h, s·(x Aᵀ), Bᵀ)`` — the same GEMM, after copying ``h`` into a new output;
- ``mm+add``: ``h + s·(x Aᵀ) Bᵀ`` — a separate GEMM and an add;
- ``peft``: ``h + ((x Aᵀ) Bᵀ) · s`` — HF PEFT's order (the scaling on the N × d_out product);

plus the real modules, ``ours`` (``AdaptedLinear`` + ``LoraAdapter``) and ``peft-module`` (PEFT's
``lora.Linear``), when peft is installed. All are interleaved round by round, so a change of load
hits every form alike. Run it under other kernel choices to stand in for other CPUs, e.g.
``MKL_ENABLE_INSTRUCTIONS=AVX2`` or ``ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2``.

    python benchmarks/lora_forms.py [--tokens 256 1024] [--threads 1] [--tag avx2] [--out docs/perf]
    python benchmarks/lora_forms.py --device cuda --dtype bfloat16 --size 8b --tokens 2048 --tag cuda   # the GPU

Writes ``<out>/lora-forms[-tag].{json,md}``. On CUDA each pass is timed between two
``torch.cuda.synchronize()`` calls.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
try:
    import hybridpeft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

SHAPES = {  # q, k/v, gate/up, down of the benchmark models (benchmarks/perf_models.py)
    "cpu-small": [(512, 512), (512, 256), (512, 1536), (1536, 512)],
    "8b": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)],
}


def forms(x: Tensor, w: Tensor, a: Tensor, b: Tensor, s: float) -> dict[str, Callable[[], Tensor]]:
    def in_place():
        h = x @ w.t()
        return h.addmm_(x @ a.t() * s, b.t())

    def out_of_place():
        return torch.addmm(x @ w.t(), x @ a.t() * s, b.t())

    def mm_add():
        return x @ w.t() + (x @ a.t() * s) @ b.t()

    def peft_order():
        return x @ w.t() + (x @ a.t()) @ b.t() * s

    return {"addmm_": in_place, "addmm": out_of_place, "mm+add": mm_add, "peft": peft_order}


def modules(d_in: int, d_out: int, r: int, alpha: float, w: Tensor, a: Tensor, b: Tensor,
            device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    import hybridpeft as hp

    out: dict[str, nn.Module] = {}
    ours = hp.inject(nn.Sequential(nn.Linear(d_in, d_out, bias=False)), hp.LoraConfig(target_modules=["0"], r=r, alpha=alpha))
    out["ours"] = ours
    try:
        import peft
    except ImportError:
        return out

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(d_in, d_out, bias=False)

        def forward(self, t: Tensor) -> Tensor:
            return self.proj(t)

    out["peft-module"] = peft.get_peft_model(Holder(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"]))
    with torch.no_grad():
        for model in out.values():
            for name, p in model.named_parameters():
                if name.endswith(("lora_A", "lora_A.default.weight")):
                    p.copy_(a)
                elif name.endswith(("lora_B", "lora_B.default.weight")):
                    p.copy_(b)
                elif name.endswith("weight"):
                    p.copy_(w)
    return {name: model.to(device=device, dtype=dtype) for name, model in out.items()}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(d_in: int, d_out: int, n: int, reps: int, r: int = 16, alpha: float = 32.0,
            device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, float]:
    torch.manual_seed(0)
    on = {"device": device, "dtype": dtype}
    w = torch.randn(d_out, d_in) / d_in ** 0.5
    a = torch.randn(r, d_in) * 0.01
    b = torch.randn(d_out, r) * 0.01
    x = torch.randn(n, d_in, **on, requires_grad=True)
    probe = torch.randn(n, d_out, **on)
    runs: dict[str, Callable[[], Tensor]] = dict(forms(x, w.to(**on), a.to(**on).requires_grad_(True),
                                                       b.to(**on).requires_grad_(True), alpha / r))
    for name, module in modules(d_in, d_out, r, alpha, w, a, b, device, dtype).items():
        runs[name] = (lambda m: lambda: m(x))(module)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(reps + 3):
        for name, run in runs.items():
            synchronize(device)
            t0 = time.perf_counter()
            run().backward(probe)
            synchronize(device)
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--size", default="cpu-small", choices=sorted(SHAPES), help="whose q/k/v/gate/up/down shapes")
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=str(HERE.parent / "docs" / "perf"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    env = {k: os.environ[k] for k in ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "MKL_CBWR") if k in os.environ}
    rows = []
    for n in args.tokens:
        for d_in, d_out in SHAPES[args.size]:
            ms = measure(d_in, d_out, n, args.reps, device=args.device, dtype=dtype)
            rows.append({"tokens": n, "d_in": d_in, "d_out": d_out, "ms": ms})
            print(f"N={n} {d_in}->{d_out}: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "env": env,
            "cpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu_name(),
            "device": args.device, "dtype": args.dtype, "threads": args.threads, "load_average_at_end": os.getloadavg(),
            "command": " ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "")
            + "python benchmarks/lora_forms.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "lora-forms" + (f"-{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    names = list(rows[0]["ms"])
    lines = [f"# LoRA forward forms, one layer, fwd + bwd ({env or 'default kernels'})", "",
             f"- {meta['date']}; torch {meta['torch']}; {meta['cpu']}; {args.dtype}; {args.threads} thread(s); "
             f"load average at the end {meta['load_average_at_end'][0]:.1f}", f"- `{meta['command']}`",
             "- median ms over interleaved rounds; `÷ peft`: each form over PEFT's order", "",
             "| tokens | d_in → d_out | " + " | ".join(f"{n} ms" for n in names) + " | addmm_ ÷ peft | addmm_ ÷ mm+add |",
             "|---:|---|" + "---:|" * (len(names) + 2)]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['tokens']} | {r['d_in']} → {r['d_out']} | " + " | ".join(f"{ms[n]:.3f}" for n in names)
                     + f" | {ms['addmm_'] / ms['peft']:.3f} | {ms['addmm_'] / ms['mm+add']:.3f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
