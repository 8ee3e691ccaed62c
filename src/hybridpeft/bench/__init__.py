"""The benchmark harness: a grid of runs, a resumable results store, and a report.

    from hybridpeft.bench import load_bench, run_bench, write_report
    bench = load_bench("benchmarks/quick.yaml")
    run_bench(bench)                                   # skips finished runs
    write_report(bench.output_dir, "docs/results/quick")

Command line: ``hybridpeft bench CONFIG.yaml`` / ``hybridpeft report RESULTS --out DIR``
(or ``python -m hybridpeft.bench run|report ...``).
"""
from .report import write_report
from .runner import BenchOutcome, check_result, load_job, run_bench
from .spec import BenchConfig, MethodSpec, Override, RunSpec, expand_grid, load_bench, parse_bench, run_key
from .stats import Summary, Welch, summarize, welch
from .store import ResultStore, finished, read_records

__all__ = [
    "BenchConfig", "BenchOutcome", "MethodSpec", "Override", "ResultStore", "RunSpec", "Summary", "Welch",
    "check_result", "expand_grid", "finished", "load_bench", "load_job", "parse_bench", "read_records",
    "run_bench", "run_key", "summarize", "welch", "write_report",
]
