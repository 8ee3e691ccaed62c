"""Subprocess entry point for one benchmark run: ``python -m hybridpeft.bench.worker SPEC.json``.

Reads ``{"job", "config", "run_dir", "result"}``, runs the job and writes its
result as JSON to ``result`` (atomically: temp file, then rename). Exits non-zero
on any error; the traceback goes to stderr, which the runner keeps in the run's
``worker.log``. The process's peak resident memory (``ru_maxrss``) is added to the
footprint as ``peak_rss_mb``: a fresh process per run makes it that run's own peak.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2 ** 20  # KiB on Linux, bytes on macOS


def main(argv: list[str] | None = None) -> int:
    from .runner import check_result, load_job
    from .store import _jsonable, versions

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m hybridpeft.bench.worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    job = load_job(spec["job"])
    result = check_result(job(spec["config"], Path(spec["run_dir"])))
    footprint = dict(result.get("footprint") or {})
    footprint.setdefault("peak_rss_mb", peak_rss_mb())
    result["footprint"] = footprint
    result.setdefault("versions", versions())
    out = Path(spec["result"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=_jsonable))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
