"""Per-program cost of the OS sandbox (bubblewrap) against the in-process one it replaced.

Three ways to run the same programs, side by side in one run, interleaved in
rounds so that load from other processes on the machine falls on all of them:

- ``bare``: ``python -I program.py`` in a subprocess, no limits (the floor);
- ``rlimits``: the previous sandbox's design, kept as the opt-in fallback
  (``allow_unsafe_exec``): a new session, resource limits, the uid drop when
  root and the in-process guards, no namespaces;
- ``bwrap``: the OS sandbox (namespaces, read-only root, capped tmpfs, seccomp,
  then the same limits and guards).

With ``--previous-src DIR`` (a ``src`` directory of an older checkout, e.g.
``git archive <commit> src | tar -x -C /tmp/prev``) a fourth mode, ``previous``,
runs the programs through that checkout's ``run_program`` in a worker process
(timed inside the worker, interleaved with the others).

Workloads: an empty program (pure start-up cost) and the canonical solutions of
a fixed spread of HumanEval problems (start-up plus a typical test). Reported:
the median seconds per program (one at a time) and, for ``workers`` programs at
a time, programs per second; with ratios to ``previous`` (else ``rlimits``).

Usage::

    python benchmarks/sandbox_overhead.py                 # writes docs/perf/sandbox-overhead.md (+ .json)
    python benchmarks/sandbox_overhead.py --rounds 5 --workers 2 --previous-src /tmp/prev/src
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hybridpeft.tasks import sandbox
from hybridpeft.tasks.humaneval import build_program, load_problems

SUBSET = [0, 2, 10, 17, 25, 32, 38, 50, 53, 64, 76, 91, 100, 108, 119, 129, 140, 151, 160, 163]
LIMITS = sandbox.SandboxLimits(timeout_s=30.0, cpu_s=20, memory_mb=1024)


def run_bare(source: str) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".py") as f:
        f.write(source)
        f.flush()
        return subprocess.run([sys.executable, "-I", f.name], capture_output=True).returncode == 0


def runners() -> dict:
    iso = sandbox.isolation()
    if iso.kind != "bwrap":
        raise SystemExit(f"no OS sandbox here ({iso.reason}); nothing to compare")
    return {
        "bare": run_bare,
        "rlimits": lambda s: sandbox._run_unsafe(s, LIMITS).passed,
        "bwrap": lambda s: sandbox._run_isolated(s, LIMITS, iso).passed,
    }


def time_each(run, sources: list[str]) -> list[float]:
    times = []
    for source in sources:
        start = time.perf_counter()
        ok = run(source)
        times.append(time.perf_counter() - start)
        if not ok:
            raise RuntimeError(f"a program failed that should pass:\n{source[:300]}")
    return times


def throughput(run, sources: list[str], workers: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ok = list(pool.map(run, sources))
    if not all(ok):
        raise RuntimeError("a program failed that should pass")
    return len(sources) / (time.perf_counter() - start)


def measure(run, sources: list[str], workers: int) -> tuple[list[float], float]:
    return time_each(run, sources), throughput(run, sources, workers)


def measure_previous(src: str, sources: list[str], workers: int) -> tuple[list[float], float]:
    """``measure`` with ``run_program`` of the checkout at ``src``, in a worker process."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump({"sources": sources, "workers": workers}, f)
        f.flush()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
        done = subprocess.run([sys.executable, __file__, "--worker", f.name], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the worker for --previous-src failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["per_program"], result["per_second"]


def worker(spec_file: str) -> None:
    """Runs with PYTHONPATH=--previous-src, so ``sandbox`` here is that checkout's module."""
    spec = json.loads(Path(spec_file).read_text())
    per_program, per_second = measure(lambda s: sandbox.run_program(s, LIMITS).passed, spec["sources"], spec["workers"])
    print(json.dumps({"per_program": per_program, "per_second": per_second, "module": sandbox.__file__}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per mode")
    parser.add_argument("--workers", type=int, default=2, help="programs at a time for the throughput column")
    parser.add_argument("--out", default="docs/perf/sandbox-overhead.md")
    parser.add_argument("--previous-src", help="a src/ directory of an older checkout: adds the mode 'previous'")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    problems = load_problems()
    workloads = {
        "empty program": ["pass\n"] * 20,
        "HumanEval canonical (20 problems)": [build_program(problems[i], problems[i]["canonical_solution"]) for i in SUBSET],
    }
    load_before = os.getloadavg()[0]
    modes = {name: (lambda run: lambda sources: measure(run, sources, args.workers))(run) for name, run in runners().items()}
    if args.previous_src:
        modes = {"previous": lambda sources: measure_previous(args.previous_src, sources, args.workers), **modes}
    per_program: dict = {w: {m: [] for m in modes} for w in workloads}
    per_second: dict = {w: {m: [] for m in modes} for w in workloads}
    for _ in range(args.rounds):
        for workload, sources in workloads.items():
            for mode, run in modes.items():
                times, rate = run(sources)
                per_program[workload][mode] += times
                per_second[workload][mode].append(rate)

    iso = sandbox.isolation()
    rows, record = [], {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "isolation": iso.describe(), "as_root": iso.as_root, "rounds": args.rounds,
                        "previous_src": args.previous_src, "load_average_1min": [load_before, os.getloadavg()[0]],
                        "workers": args.workers, "results": {}}
    reference = "previous" if args.previous_src else "rlimits"
    for workload in workloads:
        base_ms = statistics.median(per_program[workload][reference]) * 1e3
        base_rate = statistics.median(per_second[workload][reference])
        for mode in modes:
            ms = statistics.median(per_program[workload][mode]) * 1e3
            rate = statistics.median(per_second[workload][mode])
            record["results"].setdefault(workload, {})[mode] = {"median_ms": ms, "programs_per_s": rate}
            rows.append(f"| {workload} | {mode} | {ms:.0f} | {ms / base_ms:.2f}× | {rate:.1f} | {rate / base_rate:.2f}× |")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.write_text("\n".join([
        "# Sandbox overhead per program",
        "",
        f"`python benchmarks/sandbox_overhead.py --rounds {args.rounds} --workers {args.workers}"
        f"{' --previous-src DIR' if args.previous_src else ''}` on "
        f"{record['machine']}, {record['cpus']} CPUs, Python {record['python']}, "
        f"{'as root' if iso.as_root else 'as an unprivileged user'}; modes interleaved in rounds. "
        f"1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after: other jobs shared "
        f"the machine, so absolute times are inflated; the ratios, taken side by side, are the result.",
        "",
        *([f"`previous` = `run_program` of the checkout at `--previous-src` (the in-process sandbox this one "
            f"replaced), timed in a worker process."] if args.previous_src else []),
        "",
        f"| workload | mode | median ms / program | vs {reference} | programs / s "
        f"({args.workers} at a time) | vs {reference} |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"Sandbox: {iso.describe()}.",
        "",
    ]))
    print(out.read_text())


if __name__ == "__main__":
    main()
