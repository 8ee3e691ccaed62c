"""Ops per adapted module per pass: how many kernels each method launches, and what they are.

One frozen ``d × d`` linear layer with one adapter, activations (B, T, d) that
require grad (as inside a network). A ``TorchDispatchMode`` counts every ATen op
that reaches a backend during the forward, the backward and
``after_optimizer_step``; view ops (``view``, ``t``, ``permute``…) move no data
and are counted apart. Below autograd, so the count is close to the number of
kernel launches on a GPU (a CPU run sees the same ops). Also times fwd+bwd of
the module, eagerly and, with ``--compile``, through ``torch.compile``.

    python benchmarks/op_counts.py [--d 512] [--tokens 2 256] [--compile] [--out docs/perf]

Writes ``<out>/op-counts.{json,md}``. Why it matters: at 8B (32 layers × 7 target modules) a
step runs 224 adapted modules, so every extra kernel per module per pass is ~450
launches per step (forward + backward).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import hybridpeft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


# Ops that only rewrite metadata or compute on Python scalars: no kernel behind them.
METADATA_OPS = frozenset({"_unsafe_view", "promote_types", "result_type", "detach", "lift_fresh"})


class OpCounter(TorchDispatchMode):
    """Counts ATen ops by name; ``kernels`` excludes views and metadata-only ops."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Counter[str] = Counter()
        self.views: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        (self.views if func.is_view or name in METADATA_OPS else self.kernels)[name] += 1
        return func(*args, **(kwargs or {}))


def _ours(method: str, butterfly: str | None = None, **fields: Any) -> Callable[[int], tuple[nn.Module, Callable[[], None]]]:
    """``butterfly``: force BOFT's form (``"composed"`` / ``"factored"``), in a Hybrid too."""

    def make(d: int):
        from hybridpeft.adapters import adapter_class
        from hybridpeft.adapters.base import AdaptedLinear
        from hybridpeft.adapters.config import config_class

        config = config_class(method)(**fields)
        layer = AdaptedLinear(nn.Linear(d, d, bias=False), adapter_class(method)(d, d, config))
        if butterfly is not None:
            getattr(layer.adapter, "boft", layer.adapter).form = butterfly
        _off_start(layer.adapter)
        return layer, layer.adapter.after_optimizer_step

    return make


@torch.no_grad()
def _off_start(module: nn.Module) -> None:
    # Non-zero tensors everywhere, so no path can short-cut a zero factor.
    for p in module.parameters():
        if p.requires_grad and p.dim() < 3:
            p.add_(0.01 * torch.randn_like(p))


class _Holder(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _peft(kind: str) -> Callable[[int], tuple[nn.Module, Callable[[], None]]]:
    def make(d: int):
        import peft

        configs = {
            "lora": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=["proj"]),
            "boft": lambda: peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=3, target_modules=["proj"]),
            "oft": lambda: peft.OFTConfig(r=0, oft_block_size=32, target_modules=["proj"]),
            "dora": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=["proj"], use_dora=True),
            "ia3": lambda: peft.IA3Config(target_modules=["proj"], feedforward_modules=[]),
        }
        model = peft.get_peft_model(_Holder(d), configs[kind]())
        _off_start(model)  # PEFT's B = 0 / ones would let nothing short-cut either: same treatment as ours
        return model, lambda: None

    return make


MODULES: dict[str, Callable[[int], tuple[nn.Module, Callable[[], None]]]] = {
    "lora": _ours("lora", r=16, alpha=32.0),
    "lora_ga": _ours("lora_ga", r=16, alpha=32.0),
    "boft": _ours("boft", block_size=8, n_factors=3),
    "boft-factored": _ours("boft", butterfly="factored", block_size=8, n_factors=3),
    "boft-m1": _ours("boft", block_size=8, n_factors=1),
    "unitary": _ours("unitary", parameterization="structured"),
    "unitary-full": _ours("unitary", parameterization="full", block_size=32),
    "hybrid": _ours("hybrid", lora_r=16, lora_alpha=32.0, boft_block_size=8, boft_n_factors=3),
    "hybrid-factored": _ours("hybrid", butterfly="factored", lora_r=16, lora_alpha=32.0, boft_block_size=8,
                             boft_n_factors=3),
    "dora": _ours("dora", r=16, alpha=32.0),
    "ia3": _ours("ia3", feedforward_modules=[]),
    "frozen linear": lambda d: (nn.Linear(d, d, bias=False).requires_grad_(False), lambda: None),
    "peft-lora": _peft("lora"),
    "peft-boft": _peft("boft"),
    "peft-oft": _peft("oft"),
    "peft-dora": _peft("dora"),
    "peft-ia3": _peft("ia3"),
}


def count_passes(module: nn.Module, after_step: Callable[[], None], x: Tensor) -> dict[str, Any]:
    """Kernel and view counts of one forward, one backward and one ``after_step``, and the
    bytes autograd saves for backward beyond the module's own tensors and the input ``x``
    (which a network keeps for other reasons): the per-module activation cost."""
    out: dict[str, Any] = {}
    # Saved bytes at N and 2N tokens split into a per-token part and a fixed part (Cayley blocks, factors).
    n = x.numel() // x.shape[-1]
    small, large = saved_bytes(module, x), saved_bytes(module, torch.cat([x, x], dim=0).detach().requires_grad_())
    out["saved_bytes_per_token"] = (large - small) / n
    out["saved_bytes_fixed"] = 2 * small - large
    with OpCounter() as fwd:
        y = module(x)
    probe = torch.randn_like(y)
    with OpCounter() as bwd:
        y.backward(probe)
    with OpCounter() as post:
        after_step()
    for name, counter in (("forward", fwd), ("backward", bwd), ("after_step", post)):
        out[name] = {"kernels": sum(counter.kernels.values()), "views": sum(counter.views.values()),
                     "ops": dict(counter.kernels.most_common())}
    return out


def count_passes_as_on_gpu(module: nn.Module, after_step: Callable[[], None], x: Tensor) -> dict[str, Any]:
    """``count_passes`` with the Cayley blocks solved as on CUDA (one ``solve_ex``), not by the CPU's
    8-step elimination (32 small kernels that a GPU never runs); times below use the CPU path."""
    from hybridpeft.adapters import boft

    saved = set(boft.ELIMINATION_DEVICES)
    boft.ELIMINATION_DEVICES.clear()
    try:
        return count_passes(module, after_step, x)
    finally:
        boft.ELIMINATION_DEVICES.update(saved)


def saved_bytes(module: nn.Module, x: Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one forward, other than the module's own
    tensors and ``x`` itself."""
    own = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    own.add(x.untyped_storage().data_ptr())
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            saved[ptr] = t.untyped_storage().nbytes()
        return t.detach()  # returning t itself makes a saved output reference its own graph: a leak

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(saved.values())


def time_fwd_bwd(module: Callable[[Tensor], Tensor], x: Tensor, reps: int) -> float:
    """Median seconds of forward + backward (CPU; no synchronization needed)."""
    return time_interleaved({"m": (module, x)}, reps)["m"]


def time_interleaved(cases: dict[str, tuple[Callable[[Tensor], Tensor], Tensor]], reps: int) -> dict[str, float]:
    """Median seconds of forward + backward per case, the cases taking turns rep by rep, so a
    change of machine load over the run lands on all of them alike (a shared CPU's load
    moved 3× within minutes)."""
    probes = {name: torch.randn_like(module(x)) for name, (module, x) in cases.items()}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(reps + 2):
        for name, (module, x) in cases.items():
            t0 = time.perf_counter()
            module(x).backward(probes[name])
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def run(d: int, tokens: tuple[int, int], reps: int, compile_methods: list[str],
        names: list[str] | None = None) -> dict[str, Any]:
    from hybridpeft.adapters.config import known_methods

    results: dict[str, Any] = {}
    timed: dict[str, tuple[Callable[[Tensor], Tensor], Tensor]] = {}
    for name, make in MODULES.items():
        if names is not None and name not in names:
            continue
        base = name.replace("-m1", "").replace("-full", "").replace("-factored", "")
        if base in ("lora", "lora_ga", "boft", "unitary", "hybrid", "dora", "ia3") and base not in known_methods():
            continue
        torch.manual_seed(0)
        try:
            module, after_step = make(d)
        except Exception as err:
            results[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        x = torch.randn(*tokens, d, requires_grad=True)
        row = count_passes_as_on_gpu(module, after_step, x)
        timed[name] = (module, x)
        if name in compile_methods:
            try:
                compiled = torch.compile(module)
                row["compiled_fwd_bwd_s"] = time_fwd_bwd(compiled, x, reps)
            except Exception as err:  # inductor needs a C++ compiler on CPU
                row["compiled_error"] = f"{type(err).__name__}: {err}"[:300]
        results[name] = row
    for name, seconds in time_interleaved(timed, reps).items():
        results[name]["fwd_bwd_s"] = seconds
    return results


def markdown(meta: dict[str, Any], results: dict[str, Any]) -> str:
    lines = [
        "# Ops per adapted module per pass",
        "",
        f"- date: {meta['date']}; torch {meta['torch']}; {meta['machine']}",
        f"- one frozen {meta['d']}×{meta['d']} linear + adapter; activations {tuple(meta['tokens'])} × {meta['d']}, "
        "requiring grad; ATen ops counted below autograd with a TorchDispatchMode (≈ kernel launches on a GPU); "
        "BOFT's Cayley blocks counted as solved on a GPU (one `solve_ex`; the CPU eliminates in 32 small kernels)",
        "- views and metadata-only ops (view/t/permute/_unsafe_view/…) are counted apart: they launch nothing",
        *([f"- command: `{meta['command']}`"] if meta.get("command") else []),
        f"- `fwd+bwd ms`: median of {meta['reps']} eager forward+backward passes of this one module on the CPU, "
        "all modules taking turns pass by pass"
        + ("; `compiled`: the same through `torch.compile`" if meta["compiled"] else ""),
        "- `saved B/token`: bytes autograd keeps for backward per token, beyond the module's own tensors and its "
        "input (float32; halve for bf16); `saved fixed KiB`: the token-independent rest (e.g. Cayley blocks)",
        "",
        "| module | fwd kernels | bwd kernels | after_step kernels | saved B/token | saved fixed KiB | fwd+bwd ms"
        + (" | compiled ms" if meta["compiled"] else "") + " | forward ops |",
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if meta["compiled"] else "") + "---|",
    ]
    for name, row in results.items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error'][:100]} |  |  |  |  |  |" + (" |" if meta["compiled"] else "") + "  |")
            continue
        ops = ", ".join(f"{op}×{n}" if n > 1 else op for op, n in row["forward"]["ops"].items())
        compiled = ""
        if meta["compiled"]:
            compiled = f" {row['compiled_fwd_bwd_s'] * 1e3:.2f} |" if "compiled_fwd_bwd_s" in row else \
                (" failed |" if "compiled_error" in row else " — |")
        lines.append(f"| {name} | {row['forward']['kernels']} | {row['backward']['kernels']} | "
                     f"{row['after_step']['kernels']} | {row['saved_bytes_per_token']:.0f} | "
                     f"{row['saved_bytes_fixed'] / 1024:.1f} | {row['fwd_bwd_s'] * 1e3:.2f} |"
                     f"{compiled} {ops} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--tokens", type=int, nargs=2, default=(2, 256), metavar=("B", "T"))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--compile", nargs="*", default=None, metavar="MODULE",
                   help="also time these modules through torch.compile (no names: boft, hybrid, lora)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modules", nargs="+", choices=list(MODULES), help="only these modules (default: all)")
    p.add_argument("--tag", default="", help="write op-counts-<tag>.{json,md} instead of op-counts.{json,md}")
    p.add_argument("--out", default=str(HERE.parent / "docs" / "perf"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    compile_methods = [] if args.compile is None else (args.compile or ["lora", "boft", "hybrid"])
    import platform
    import os

    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "d": args.d,
            "tokens": list(args.tokens), "reps": args.reps, "compiled": bool(compile_methods),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"{args.threads} torch thread(s), load {os.getloadavg()[0]:.1f}"}
    results = run(args.d, tuple(args.tokens), args.reps, compile_methods, args.modules)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "op-counts" + (f"-{args.tag}" if args.tag else "")
    meta["command"] = "python benchmarks/op_counts.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    text = markdown(meta, results)
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
