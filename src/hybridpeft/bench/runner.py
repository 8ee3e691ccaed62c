"""Run a benchmark grid: skip what is finished, retry what failed, survive crashes.

A *job* is a function ``job(config: dict, run_dir: Path) -> dict`` that trains and
evaluates one resolved run config and returns::

    {"metrics": {...}, "primary_metric": "accuracy",
     "curves": {"train": [...], "eval": [...]},           # optional
     "lambda_history": {...} | None,                     # optional, Hybrid
     "footprint": {"step_time_s", "peak_memory_mb", "tunable_params", ...}}

(see ``store`` for the fields). With ``isolation="subprocess"`` each attempt runs
in a fresh interpreter (``python -m hybridpeft.bench.worker``), so a segfault,
an OOM kill or a hung run (``timeout_s``) fails that run only; its stderr is
kept in ``<output>/runs/<run>/worker.log`` and its tail in the failed record.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .spec import BenchConfig, RunSpec, expand_grid, expand_search, same_settings
from .store import ResultStore, apply_annotations, finished, read_annotations, read_records, utc_now, versions

Job = Callable[[dict[str, Any], Path], dict[str, Any]]
_ERROR_TAIL = 4000


@dataclass
class BenchOutcome:
    """What one ``run_bench`` call did."""

    total: int
    skipped: int = 0                                  # already finished before this call
    ok: list[str] = field(default_factory=list)       # run keys finished now
    failed: list[str] = field(default_factory=list)   # run keys still failing after this call
    given_up: list[str] = field(default_factory=list)  # out of attempts before this call
    reused: list[str] = field(default_factory=list)   # recorded from a finished run with the same settings
    waiting: list[str] = field(default_factory=list)  # cells whose lr search has not finished


def load_job(spec: str) -> Job:
    """Import ``"package.module:function"``.

    Raises:
        ValueError: the string is malformed or the attribute is not callable.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"job={spec!r} is invalid: expected 'module:function'")
    job = getattr(importlib.import_module(module_name), attr, None)
    if not callable(job):
        raise ValueError(f"job={spec!r} is invalid: {module_name} has no callable {attr!r}")
    return job


def check_result(result: Any) -> dict[str, Any]:
    """Validate a job's return value; fill optional sections with empty defaults.

    Raises:
        ValueError: naming the offending field.
    """
    if not isinstance(result, dict):
        raise ValueError(f"job result={type(result).__name__} is invalid: expected a dict")
    metrics = result.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"job result metrics={metrics!r} is invalid: expected a non-empty dict of numbers")
    for name, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"job result metrics[{name!r}]={value!r} is invalid: expected a number")
    primary = result.get("primary_metric")
    if primary not in metrics:
        raise ValueError(f"job result primary_metric={primary!r} is invalid: expected one of {sorted(metrics)}")
    if not math.isfinite(metrics[primary]):  # inf is as unusable as NaN: no mean, no t-test, not JSON
        raise ValueError(f"job result metrics[{primary!r}]={metrics[primary]!r} is invalid: "
                         f"the primary metric must be finite")
    out = dict(result)
    out.setdefault("curves", {"train": [], "eval": []})
    out.setdefault("lambda_history", None)
    out.setdefault("footprint", {})
    return out


def run_dir_name(key: str) -> str:
    """A filesystem-safe directory name for a run key."""
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in key)


def _run_inprocess(job: Job, run: RunSpec, run_dir: Path) -> dict[str, Any]:
    return check_result(job(run.config, run_dir))


def worker_env(workers: int) -> dict[str, str]:
    """The environment of a worker process: with ``workers`` side by side, each gets an equal
    share of the cores as its thread count unless ``OMP_NUM_THREADS`` is already set."""
    env = dict(os.environ)
    if workers > 1 and "OMP_NUM_THREADS" not in env:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        env["OMP_NUM_THREADS"] = threads
        env.setdefault("MKL_NUM_THREADS", threads)
    return env


class _LiveWorkers:
    """Worker processes now running, so an interrupt of the grid can stop them all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopping = threading.Event()

    def add(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs.add(proc)
            if self.stopping.is_set():
                proc.kill()

    def discard(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs.discard(proc)

    def stop_all(self) -> None:
        with self.lock:
            self.stopping.set()
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()


def _run_subprocess(job_spec: str, run: RunSpec, run_dir: Path, timeout_s: float | None,
                    env: dict[str, str] | None = None, live: _LiveWorkers | None = None) -> dict[str, Any]:
    """One attempt in a fresh interpreter; raises RuntimeError with the stderr tail on failure."""
    spec_file = run_dir / "spec.json"
    result_file = run_dir / "result.json"
    result_file.unlink(missing_ok=True)
    spec_file.write_text(json.dumps({"job": job_spec, "config": run.config, "run_dir": str(run_dir), "result": str(result_file)}))
    log_file = run_dir / "worker.log"
    with log_file.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "hybridpeft.bench.worker", str(spec_file)],
                                stdout=log, stderr=subprocess.STDOUT, env=env if env is not None else os.environ.copy())
        if live is not None:
            live.add(proc)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"run exceeded timeout_s={timeout_s}; log: {log_file}\n{_tail(log_file)}") from None
        finally:
            if proc.poll() is None:  # timeout, Ctrl-C or SIGTERM of the grid: the worker must not outlive it
                proc.kill()
                proc.wait()
            if live is not None:
                live.discard(proc)
    if proc.returncode != 0 or not result_file.is_file():
        raise RuntimeError(f"worker exited with code {proc.returncode}; log: {log_file}\n{_tail(log_file)}")
    return check_result(json.loads(result_file.read_text()))


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-_ERROR_TAIL:]


def run_bench(
    bench: BenchConfig,
    *,
    job: Job | None = None,
    progress: bool = True,
    max_attempts: int | None = None,
) -> BenchOutcome:
    """Run every unfinished run of ``bench`` and record each attempt in its store.

    With ``bench.lr_search`` this goes in two phases: the search runs, then, for every cell
    whose search has finished, the final runs at the selected lr (``selection.select_lrs``).
    A run whose resolved settings equal a finished run's in the store (the same training
    under another label) is not trained again; that record is reused under the new key.

    Args:
        bench: the parsed benchmark.
        job: a callable to use instead of ``bench.job`` (runs in-process; for tests
            and notebooks).
        progress: show a progress bar over the whole grid.
        max_attempts: override ``bench.max_attempts`` (e.g. to retry runs that
            were given up).

    Returns:
        A ``BenchOutcome``; runs still failing are listed, not raised, so one bad
        run never stops the grid; cells whose lr selection is incomplete are in ``waiting``.
    """
    from tqdm.auto import tqdm

    from .selection import select_lrs

    limit = bench.max_attempts if max_attempts is None else max_attempts
    store = ResultStore(bench.output_dir)
    use_subprocess = job is None and bench.isolation == "subprocess"
    configured = job or load_job(bench.job)  # imported here too, so a bad 'job' fails before any run
    search = expand_search(bench)
    validate_runs(configured, search + expand_grid(bench))
    ctx = _GridContext(store=store, bench=bench, job=None if use_subprocess else configured, use_subprocess=use_subprocess,
                       versions=versions(), env=worker_env(bench.workers) if use_subprocess else None, live=_LiveWorkers(),
                       record_lock=threading.Lock(), concurrency=1, load=LoadMonitor())
    for entry, path in zip(bench.reuse_from, bench.reuse_paths()):
        if not path.is_file():
            raise FileNotFoundError(f"reuse_from entry {path} does not exist")
        records = apply_annotations(read_records(path), read_annotations(path))  # a footprint marked there stays marked
        # Named as the benchmark file names it (relative to that file), not by this machine's absolute path.
        ctx.external += [{**r, "reused_store": entry} for r in finished(records) if isinstance(r.get("config"), dict)]
    outcome = BenchOutcome(total=0)
    bar = tqdm(total=0, disable=not progress, desc=f"bench {bench.name}", unit="run")
    previous_handler = _interrupt_on_sigterm()
    ctx.load.start()
    try:
        if search:
            _run_phase(ctx, search, limit, outcome, bar)
        selected, waiting = select_lrs(bench, store.states())
        finals = expand_grid(bench, selected)
        validate_runs(configured, finals)
        _run_phase(ctx, finals, limit, outcome, bar)
        outcome.waiting = [f"{'/'.join(p.cell)} (lr search unfinished: {', '.join(p.missing[:3])}"
                           f"{' ...' if len(p.missing) > 3 else ''})" for p in waiting]
    finally:
        ctx.load.stop()
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return outcome


def _run_phase(ctx: "_GridContext", runs: list[RunSpec], limit: int, outcome: BenchOutcome, bar: Any) -> None:
    """Skip finished runs, reuse identical finished ones, run the rest (side by side if asked)."""
    states = ctx.store.states()
    done = [s.record for s in states.values() if s.status == "ok" and s.record is not None] + ctx.external
    outcome.total += len(runs)
    bar.total = outcome.total
    pending: list[RunSpec] = []
    for run in runs:
        state = states.get(run.key)
        if state is not None and state.status == "ok":
            outcome.skipped += 1
            bar.update(1)
        elif _reuse(ctx, run, done):
            outcome.reused.append(run.key)
            bar.update(1)
        elif state is not None and state.attempts >= limit:
            outcome.given_up.append(run.key)
            bar.update(1)
        else:
            pending.append(run)
    # Seed-major: every cell gets its first seed before any gets its second, so a grid stopped
    # part-way still covers every (model, task, method) cell.
    seeds = sorted({r.seed for r in pending})
    pending.sort(key=lambda r: seeds.index(r.seed))  # stable: the grid order within a seed
    ctx.concurrency = min(ctx.bench.workers, max(1, len(pending)))

    def one(run: RunSpec) -> None:
        latest = ctx.store.states().get(run.key)
        if latest is not None and latest.status == "ok":  # another invocation on this store finished it meanwhile
            outcome.skipped += 1
            bar.update(1)
            return
        attempts = latest.attempts if latest is not None else 0
        run_dir = ctx.bench.output_dir / "runs" / run_dir_name(run.key)
        run_dir.mkdir(parents=True, exist_ok=True)
        bar.set_postfix_str(f"{run.model}/{run.task}/{run.method}/seed{run.seed}")
        while attempts < limit and not ctx.live.stopping.is_set():
            attempts += 1
            record = _attempt(ctx, run, attempts, run_dir)
            if record["status"] == "ok":
                outcome.ok.append(run.key)
                break
            if record.get("interrupted"):
                return
            last_line = (record["error"].strip().splitlines() or ["?"])[-1]
            bar.write(f"[bench] {run.key} failed (attempt {attempts}/{limit}): {last_line}")
        else:
            if not ctx.live.stopping.is_set():
                outcome.failed.append(run.key)
        bar.update(1)

    if ctx.bench.workers == 1:
        for run in pending:
            one(run)
    else:
        _run_side_by_side(one, pending, ctx.bench.workers, ctx.live)


def _reuse(ctx: "_GridContext", run: RunSpec, done: list[dict[str, Any]]) -> bool:
    """Record ``run`` as finished from a finished run with the same settings under another label."""
    twin = next((r for r in done if isinstance(r.get("config"), dict) and r["config"].get("run", {}).get("seed") == run.seed
                 and same_settings(r["config"], run.config)), None)
    if twin is None:
        return False
    source = twin.get("reused_store")
    copy = {**twin, **_identity(run, twin.get("attempt", 1)), "config": run.config,
            "reused_from": f"{source}:{twin['key']}" if source else twin["key"]}
    copy.pop("reused_store", None)
    with ctx.record_lock:
        ctx.store.append(copy)
    return True


def _run_side_by_side(one: Callable[[RunSpec], None], runs: list[RunSpec], workers: int, live: "_LiveWorkers") -> None:
    """``one(run)`` for every run with ``workers`` threads (each waiting on its worker process).
    Ctrl-C / SIGTERM stops every running worker, lets the threads log the interruption, re-raises."""
    from concurrent.futures import ThreadPoolExecutor, wait

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench")
    futures = [pool.submit(one, run) for run in runs]
    try:
        while True:
            done, not_done = wait(futures, timeout=0.5)
            for future in done:
                future.result()  # an unexpected error in the runner itself surfaces here
            if not not_done:
                break
            futures = list(not_done)
    except BaseException:
        live.stop_all()
        for future in futures:
            future.cancel()
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)


class LoadMonitor:
    """Samples the machine's 1-minute load average every ``interval_s`` seconds while the grid runs,
    so each run's record can say how busy the machine was (``load_during``)."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []  # (monotonic time, 1-min load average)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def read() -> float | None:
        try:
            return float(os.getloadavg()[0])
        except (OSError, AttributeError):  # not every platform has a load average
            return None

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                value = self.read()
                if value is not None:
                    self.samples.append((time.monotonic(), value))
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, name="bench-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def load_during(self, start: float, end: float) -> tuple[float | None, float | None]:
        """(mean, max) of the samples taken between two ``time.monotonic()`` readings."""
        values = [v for t, v in self.samples if start <= t <= end]
        if not values:
            now = self.read()
            values = [now] if now is not None else []
        return (sum(values) / len(values), max(values)) if values else (None, None)


def comparability(bench: BenchConfig, load_mean: float | None, cpus: int | None) -> tuple[bool, str | None]:
    """Whether a run's step time and memory can be compared with other runs', and if not, why.

    Not comparable when the benchmark says so (``footprint_comparable: false``) or when the
    machine's mean 1-minute load average during the run exceeded its core count + 0.5: more
    runnable threads than cores means other work took CPU time from the run.
    """
    if not bench.footprint_comparable:
        return False, "the benchmark marks its footprint not comparable (footprint_comparable: false)"
    if load_mean is not None and cpus and load_mean > cpus + 0.5:
        return False, f"the machine's load average was {load_mean:.1f} on {cpus} cores during the run"
    return True, None


@dataclass
class _GridContext:
    """What every attempt of one ``run_bench`` call shares."""

    store: ResultStore
    bench: BenchConfig
    job: Job | None
    use_subprocess: bool
    versions: dict[str, str]
    env: dict[str, str] | None
    live: "_LiveWorkers"
    record_lock: threading.Lock
    concurrency: int
    load: LoadMonitor = field(default_factory=LoadMonitor)
    external: list[dict[str, Any]] = field(default_factory=list)  # finished runs of the reuse_from stores


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _interrupt_on_sigterm() -> Any:
    """Treat SIGTERM like Ctrl-C while the grid runs, so the running worker is stopped and the
    attempt is logged as interrupted; returns the previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def validate_runs(job: Job, runs: list[RunSpec]) -> None:
    """Check every run's settings before any run starts, if the job offers ``job.validate(config)``.

    Raises:
        ValueError: listing each distinct problem once, with the runs it affects.
    """
    validate = getattr(job, "validate", None)
    if not callable(validate):
        return
    problems: dict[str, list[str]] = {}
    for run in runs:
        try:
            validate(run.config)
        except ValueError as err:
            problems.setdefault(str(err), []).append(run.key.split("#")[0])
    if problems:
        lines = [f"{message}\n    (in {len(keys)} run(s): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''})"
                 for message, keys in problems.items()]
        raise ValueError("benchmark runs have invalid settings:\n" + "\n".join(lines))


def _identity(run: RunSpec, attempt: int) -> dict[str, Any]:
    return {"key": run.key, "attempt": attempt, "model": run.model, "task": run.task, "method": run.method,
            "adapter_method": run.adapter_method, "seed": run.seed, "role": run.role, **run.meta}


def _attempt(ctx: _GridContext, run: RunSpec, attempt: int, run_dir: Path) -> dict[str, Any]:
    """One try: a "running" record, then "ok" with results or "failed" with the error."""
    started, t0 = utc_now(), time.perf_counter()
    t0_mono = time.monotonic()
    ident = _identity(run, attempt)

    def log(record: dict[str, Any]) -> dict[str, Any]:
        with ctx.record_lock:
            ctx.store.append(record)
        return record

    def interrupted() -> dict[str, Any]:
        return log({**ident, "status": "failed", "interrupted": True, "error": "interrupted by the user",
                    "started_at": started, "finished_at": utc_now(), "wall_s": time.perf_counter() - t0})

    log({**ident, "status": "running", "started_at": started})
    try:
        if ctx.use_subprocess:
            result = _run_subprocess(ctx.bench.job, run, run_dir, ctx.bench.timeout_s, ctx.env, ctx.live)
        else:
            assert ctx.job is not None
            result = _run_inprocess(ctx.job, run, run_dir)
    except KeyboardInterrupt:
        interrupted()
        raise
    except Exception as err:  # noqa: BLE001 - any failure of one run must not stop the grid
        if ctx.live.stopping.is_set():
            return interrupted()
        error = f"{type(err).__name__}: {err}" if ctx.use_subprocess else traceback.format_exc()[-_ERROR_TAIL:]
        return log({**ident, "status": "failed", "error": error, "config": run.config,
                    "started_at": started, "finished_at": utc_now(), "wall_s": time.perf_counter() - t0})
    footprint = dict(result.get("footprint") or {})
    if ctx.concurrency > 1:  # step time and memory were measured beside other runs
        footprint["side_by_side_runs"] = ctx.concurrency
        footprint["worker_threads"] = int((ctx.env or {}).get("OMP_NUM_THREADS", 0)) or None
    load_mean, load_max = ctx.load.load_during(t0_mono, time.monotonic())
    footprint.update(load_avg_1m_mean=load_mean, load_avg_1m_max=load_max, cpu_count=os.cpu_count())
    comparable, why = comparability(ctx.bench, load_mean, os.cpu_count())
    footprint["comparable"] = comparable
    if why:
        footprint["not_comparable_reason"] = why
    return log({**ident, "status": "ok", "config": run.config, **result, "footprint": footprint,
                "versions": result.get("versions") or ctx.versions,
                "started_at": started, "finished_at": utc_now(), "wall_s": time.perf_counter() - t0})
