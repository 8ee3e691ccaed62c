"""BOFT's two forms side by side: composed blocks vs the factored butterfly, per (b, m) and shape.

One output-side ``BoftAdapter`` on a frozen ``d × d`` linear layer; forward + backward of the
module (Cayley blocks, composition, application, gradients) timed for each form, interleaved
round by round so a change of machine load hits both alike. Reports milliseconds and the
ratio composed ÷ factored; ``butterfly_form`` (in ``hybridpeft.adapters.boft``) is the rule
these numbers set.

    python benchmarks/butterfly_forms.py [--d 512 2048] [--tokens 256 1024] [--threads 1] [--out docs/perf]
    python benchmarks/butterfly_forms.py --device cuda --dtype bfloat16 --d 4096 --tokens 2048   # the GPU

Writes ``<out>/butterfly-forms[-<device>].{json,md}`` (no suffix on the CPU). On CUDA each pass is
timed between two ``torch.cuda.synchronize()`` calls.
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

HERE = Path(__file__).resolve().parent
try:
    import hybridpeft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hybridpeft.adapters.base import AdaptedLinear  # noqa: E402
from hybridpeft.adapters.boft import BoftAdapter, BoftConfig, butterfly_form, composed_size, fits  # noqa: E402

SETTINGS = [(8, 1), (8, 2), (8, 3), (8, 4), (8, 5), (8, 6), (4, 3), (4, 5), (4, 6), (16, 2), (16, 3), (16, 4), (32, 2), (2, 6)]


def module(d: int, b: int, m: int, form: str, device: str, dtype: torch.dtype) -> AdaptedLinear:
    torch.manual_seed(0)
    adapter = BoftAdapter(d, d, BoftConfig(block_size=b, n_factors=m))
    adapter.form = form
    with torch.no_grad():
        adapter.boft_Q.normal_(0, 0.05)
    return AdaptedLinear(nn.Linear(d, d, bias=False), adapter).to(device=device, dtype=dtype)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pair(d: int, n: int, b: int, m: int, reps: int, device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> dict[str, float]:
    layers = {form: module(d, b, m, form, device, dtype) for form in ("composed", "factored")}
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    probe = torch.randn(n, d, device=device, dtype=dtype)
    times: dict[str, list[float]] = {form: [] for form in layers}
    for i in range(reps + 2):
        for form, layer in layers.items():
            synchronize(device)
            t0 = time.perf_counter()
            layer(x).backward(probe)
            synchronize(device)
            if i >= 2:
                times[form].append(time.perf_counter() - t0)
    return {form: statistics.median(t) for form, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--settings", nargs="+", metavar="bxm", help="only these (b, m), e.g. 8x3 32x2 (default: all)")
    p.add_argument("--out", default=str(HERE.parent / "docs" / "perf"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    settings = SETTINGS if not args.settings else [tuple(int(v) for v in s.split("x")) for s in args.settings]
    rows = []
    for d in args.d:
        for n in args.tokens:
            for b, m in settings:
                if not fits(d, b, m):
                    continue
                t = time_pair(d, n, b, m, args.reps, args.device, dtype)
                row = {"d": d, "tokens": n, "b": b, "m": m, "c": composed_size(b, m), "rule": butterfly_form(b, m),
                       "composed_ms": t["composed"] * 1e3, "factored_ms": t["factored"] * 1e3,
                       "ratio": t["composed"] / t["factored"]}
                rows.append(row)
                print(f"d={d} N={n} b={b} m={m} c={row['c']}: composed {row['composed_ms']:.2f} ms, "
                      f"factored {row['factored_ms']:.2f} ms, ratio {row['ratio']:.2f} (rule: {row['rule']})", flush=True)
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
            "machine": machine, "device": args.device, "dtype": args.dtype,
            "load_average_at_end": os.getloadavg(),
            "command": "python benchmarks/butterfly_forms.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "butterfly-forms" + ("" if args.device == "cpu" else f"-{args.device.split(':')[0]}")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# BOFT: composed blocks vs factored butterfly (one output-side module, fwd + bwd)", "",
             f"- {meta['date']}; torch {meta['torch']}; {meta['machine']}; {args.dtype}; load average at the end "
             f"{meta['load_average_at_end'][0]:.1f}", f"- `{meta['command']}`",
             "- ms: median over the rounds; ratio < 1: composed is faster; rule: what `butterfly_form` picks", "",
             "| d | tokens | b | m | c = b·2^(m−1) | composed ms | factored ms | composed ÷ factored | rule |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['d']} | {r['tokens']} | {r['b']} | {r['m']} | {r['c']} | {r['composed_ms']:.2f} | "
              f"{r['factored_ms']:.2f} | {r['ratio']:.2f} | {r['rule']} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
