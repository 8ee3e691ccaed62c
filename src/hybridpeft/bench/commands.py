"""The ``bench`` and ``report`` commands as typed functions plus their argparse arguments.

Shared by ``hybridpeft bench`` / ``hybridpeft report`` (rows in ``hybridpeft.cli``)
and ``python -m hybridpeft.bench run|report``.
"""
from __future__ import annotations

import argparse
import sys


def bench_command(config: str, *, set_: list[str] | None = None, output: str | None = None,
                  max_attempts: int | None = None, progress: bool = True, report_dir: str | None = None,
                  workers: int | None = None) -> int:
    """Run (or resume) a benchmark; exit status 1 if any run is still failing."""
    from .report import write_report
    from .runner import run_bench
    from .spec import load_bench

    overrides = list(set_ or []) + ([f"output={output}"] if output else []) + ([f"workers={workers}"] if workers else [])
    bench = load_bench(config, overrides)
    outcome = run_bench(bench, max_attempts=max_attempts, progress=progress)
    reused = f", {len(outcome.reused)} reused from runs with the same settings" if outcome.reused else ""
    print(f"[bench] {bench.name}: {outcome.total} runs — {outcome.skipped} already done, {len(outcome.ok)} finished now{reused}, "
          f"{len(outcome.failed)} failed, {len(outcome.given_up)} given up earlier; results in {bench.output_dir}")
    for key in outcome.failed + outcome.given_up:
        print(f"[bench]   not finished: {key}", file=sys.stderr)
    for cell in outcome.waiting:
        print(f"[bench]   final runs waiting for their lr search: {cell}", file=sys.stderr)
    if report_dir:
        paths = write_report(bench.output_dir, report_dir, title=f"Benchmark report: {bench.name}")
        print(f"[bench] report: {paths['markdown']}")
    return 1 if outcome.failed or outcome.given_up or outcome.waiting else 0


def report_command(results: str, *, out: str, reference: str = "lora", title: str | None = None,
                   notes: str | None = None, bench: str | None = None) -> int:
    from .report import write_report
    from .spec import load_bench

    paths = write_report(results, out, reference=reference, title=title, notes=notes,
                         bench=load_bench(bench) if bench else None)
    print(f"[report] wrote {paths['markdown']} and {paths['html']} ({len(paths) - 2} figures)")
    return 0


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="benchmark YAML file, e.g. benchmarks/quick.yaml")
    parser.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                        help="override a benchmark key, e.g. --set seeds=[0] --set shared.train.max_steps=10")
    parser.add_argument("--output", help="results directory (default: the config's 'output')")
    parser.add_argument("--max-attempts", type=int, help="retry runs that failed up to this many attempts in total")
    parser.add_argument("--workers", type=int, help="runs at once, each with an equal share of the cores as threads "
                        "(default: the config's 'workers', else 1); step times then share the machine")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--report", dest="report_dir", metavar="DIR", help="also write the report to DIR afterwards")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="results.jsonl or the directory holding it")
    parser.add_argument("--out", required=True, help="directory for report.md, report.html and figures/")
    parser.add_argument("--reference", default="lora", help="method the t-tests compare against (default: lora)")
    parser.add_argument("--title", help="report title")
    parser.add_argument("--notes", help="a Markdown file with discussion to include in the report")
    parser.add_argument("--bench", metavar="CONFIG", help="the benchmark YAML the store was run from: the report then "
                        "counts the runs it asks for and names every one not finished (never started, failed, "
                        "waiting for its lr search)")
