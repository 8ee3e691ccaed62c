"""``python -m hybridpeft.bench run CONFIG.yaml`` and ``python -m hybridpeft.bench report RESULTS --out DIR``.

The same two commands are ``hybridpeft bench`` and ``hybridpeft report``.
"""
from __future__ import annotations

import argparse
import sys

from .commands import add_bench_arguments, add_report_arguments, bench_command, report_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hybridpeft.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_arguments(sub.add_parser("run", help="run or resume a benchmark grid (finished runs are skipped)"))
    add_report_arguments(sub.add_parser("report", help="render tables and figures from a results store"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    try:
        return bench_command(**args) if command == "run" else report_command(**args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
