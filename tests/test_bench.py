"""Benchmark harness: grid expansion, resumable store, statistics, report rendering.

Runs use a synthetic job (deterministic numbers per method and seed) so the
harness is tested without training; the end-to-end run of benchmarks/quick.yaml
is marked slow.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybridpeft.bench import (ResultStore, expand_grid, load_bench, parse_bench, read_records, run_bench, run_key,
                              summarize, welch, write_report)
from hybridpeft.bench.runner import check_result
from hybridpeft.bench.spec import expand_search
from hybridpeft.bench.store import finished
from hybridpeft.bench.tables import build_cells, main_tables

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Per-method accuracy by seed: hybrid is clearly above lora, boft is not.
_ACC = {"lora": [0.80, 0.81, 0.79], "boft": [0.805, 0.795, 0.81], "hybrid": [0.90, 0.91, 0.89],
        "lora_ga": [0.85, 0.86, 0.84], "unitary": [0.60, 0.62, 0.61],
        "hybrid-fixed-0.5": [0.84, 0.86, 0.85], "dora": [0.95, 0.96, 0.94], "hybrid@2e-3": [0.70, 0.71, 0.69], "hybrid-anneal": [0.87, 0.88, 0.86], "full": [0.92, 0.93, 0.91]}
_BEST_LR = {"lora": 1e-3, "hybrid": 1e-2, "full": 1e-5}
_LAYERS = ["model.layers.0.q_proj", "model.layers.0.v_proj", "model.layers.1.q_proj", "model.layers.1.v_proj"]


def synthetic_job(config: dict, run_dir: Path) -> dict:
    """Pretend to train: numbers depend only on (method, seed); ``fail`` settings inject errors."""
    run = config["run"]
    fail = config.get("fail", {})
    if fail.get("always"):
        raise RuntimeError("synthetic failure")
    if fail.get("first_attempt"):
        marker = run_dir / "failed_once"
        if not marker.exists():
            marker.write_text("x")
            raise RuntimeError("synthetic first-attempt failure")
    if fail.get("exit"):
        os._exit(3)  # a hard crash: no exception, no cleanup
    (run_dir / "calls").open("a").write("1\n")
    if config.get("record_env"):  # for the side-by-side test: did another run start while this one ran?
        start = time.time()
        (run_dir / "started").write_text("x")
        peers = lambda: [p for p in run_dir.parent.glob("*/started") if p.parent != run_dir]  # noqa: E731
        while not peers() and time.time() - start < 60:  # a barrier: sequential runs wait here in vain
            time.sleep(0.05)
        (run_dir / "env.json").write_text(json.dumps({"omp": os.environ.get("OMP_NUM_THREADS"), "start": start,
                                                       "saw_peer": bool(peers()), "end": time.time()}))
    method = run["method"].split("@")[0]  # lr-search runs are labelled <method>@<lr>
    acc = _ACC[method][run["seed"] % 3]
    steps = list(range(1, 21))
    scale = 1.0 + 0.1 * len(run["method"])
    curves = {"train": [{"step": s, "loss": 2.0 / s, "grad_norm": scale * 5.0 / math.sqrt(s)} for s in steps],
              "eval": [{"step": s, "val_loss": 1.0 + 1.0 / s} for s in steps[4::5]]}
    lam = None
    if config["adapter"]["method"] == "hybrid":
        lam = {"layers": _LAYERS, "steps": steps,
               "values": [[0.5 + 0.02 * i * (k % 2 * 2 - 1) for i in range(len(_LAYERS))] for k in steps]}
    metrics = {"accuracy": acc, "val_loss": 1.0 - acc,
               # lowest at the method's best lr (_BEST_LR), so an lr search has a known answer
               "heldout_loss": 0.5 + abs(math.log10(config["train"]["lr"] / _BEST_LR.get(method, 1e-3))) + 0.01 * run["seed"]}
    if config.get("nan_metric"):
        metrics[config["nan_metric"]] = float("nan")
    if "majority" in config:
        metrics["majority_class_accuracy"] = config["majority"]
    return {"metrics": metrics, "primary_metric": "accuracy", "curves": curves,
            "lambda_history": lam,
            "footprint": {"step_time_s": 0.1 * scale + 0.001 * run["seed"], "peak_memory_mb": 500.0 * scale + run["seed"],
                          "tunable_params": 10_000 * len(run["method"]), "total_params": 1_000_000, "train_time_s": 2.0}}


def _bench(tmp_path: Path, **extra) -> dict:
    data = {
        "name": "t", "seeds": [0, 1, 2], "output": str(tmp_path / "out"), "isolation": "inprocess",
        "job": "test_bench:synthetic_job",
        "shared": {"train": {"max_steps": 20, "lr": 1e-3, "batch_size": 4}, "data": {"train_limit": 64},
                   "adapter": {"target_modules": ["query", "value"]}},
        "grid": [{"model": "tiny", "tasks": ["sst2-cls", "rte-cls"]}],
        "methods": ["lora", "boft", {"name": "hybrid"},
                    {"name": "hybrid-fixed-0.5", "method": "hybrid", "role": "ablation",
                     "adapter": {"schedule": "fixed", "lam_fixed": 0.5}},
                    {"name": "full", "train": {"lr": 1e-5}}],
        "overrides": [{"where": {"method": "hybrid", "task": "rte-cls"}, "set": {"train.max_steps": 40}}],
    }
    data.update(extra)
    return data


def test_grid_expansion_count_and_overrides(tmp_path):
    runs = expand_grid(parse_bench(_bench(tmp_path)))
    assert len(runs) == 5 * 2 * 3  # methods × tasks × seeds
    assert len({r.key for r in runs}) == len(runs)
    by = {(r.task, r.method, r.seed): r.config for r in runs}
    # shared settings reach every run; the method's own train settings and per-cell overrides apply on top
    assert by[("sst2-cls", "lora", 0)]["train"] == {"max_steps": 20, "lr": 1e-3, "batch_size": 4}
    assert by[("sst2-cls", "full", 2)]["train"]["lr"] == 1e-5
    assert by[("rte-cls", "hybrid", 1)]["train"]["max_steps"] == 40
    assert by[("sst2-cls", "hybrid", 1)]["train"]["max_steps"] == 20
    assert by[("rte-cls", "hybrid-fixed-0.5", 0)]["train"]["max_steps"] == 20  # matches label, not adapter method
    assert by[("rte-cls", "hybrid-fixed-0.5", 0)]["adapter"] == {"method": "hybrid", "schedule": "fixed", "lam_fixed": 0.5,
                                                                 "target_modules": ["query", "value"]}
    assert by[("sst2-cls", "lora", 1)]["adapter"] == {"method": "lora", "target_modules": ["query", "value"]}
    assert by[("sst2-cls", "boft", 2)]["run"] == {"model": "tiny", "task": "sst2-cls", "method": "boft", "seed": 2}
    assert by[("sst2-cls", "lora", 0)]["data"] == {"train_limit": 64}


def test_grid_exclude_and_adapter_method_match(tmp_path):
    data = _bench(tmp_path, exclude=[{"method": "full", "task": "rte-cls"}],
                  overrides=[{"where": {"adapter_method": "hybrid"}, "set": {"adapter": {"r": 4}}}])
    runs = expand_grid(parse_bench(data))
    assert len(runs) == 5 * 2 * 3 - 3
    assert not any(r.method == "full" and r.task == "rte-cls" for r in runs)
    assert all(r.config["adapter"].get("r") == (4 if r.adapter_method == "hybrid" else None) for r in runs)


def test_bad_config_lists_every_error(tmp_path):
    data = _bench(tmp_path, seeds=[0, 0], max_attempts=0, isolation="thread")
    with pytest.raises(ValueError) as err:
        parse_bench(data)
    text = str(err.value)
    assert "seeds=[0, 0]" in text and "max_attempts=0" in text and "isolation='thread'" in text


def test_run_key_is_stable_and_follows_settings(tmp_path):
    a = expand_grid(parse_bench(_bench(tmp_path)))
    b = expand_grid(parse_bench(_bench(tmp_path)))
    assert [r.key for r in a] == [r.key for r in b]
    changed = _bench(tmp_path)
    changed["shared"]["train"]["lr"] = 2e-3
    c = expand_grid(parse_bench(changed))
    assert a[0].key.split("#")[0] == c[0].key.split("#")[0] and a[0].key != c[0].key
    assert run_key(a[0].config) == a[0].key


def test_load_bench_yaml_with_overrides(tmp_path):
    import yaml

    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(_bench(tmp_path)))
    bench = load_bench(path, ["seeds=[0]", "shared.train.max_steps=5"])
    runs = expand_grid(bench)
    assert len(runs) == 5 * 2 and all(r.config["train"]["max_steps"] in (5, 40) for r in runs)


def _calls(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in out.glob("runs/*/calls"))


def test_resume_skips_finished_and_retries_failed(tmp_path):
    sys.path.insert(0, str(TESTS))
    data = _bench(tmp_path, seeds=[0, 1], methods=["lora", "hybrid"])
    data["overrides"] = [{"where": {"method": "hybrid", "seed": 1, "task": "rte-cls"}, "set": {"fail": {"first_attempt": True}}}]
    bench = parse_bench(data)
    first = run_bench(bench, progress=False)
    assert first.total == 8 and len(first.ok) == 8 and first.failed == [] and first.skipped == 0
    states = ResultStore(bench.output_dir).states()
    retried = [k for k, s in states.items() if s.attempts == 2]
    assert len(retried) == 1 and "rte-cls/hybrid/seed1" in retried[0] and states[retried[0]].status == "ok"
    calls = _calls(bench.output_dir)
    assert calls == 8
    again = run_bench(bench, progress=False)
    assert again.skipped == 8 and again.ok == [] and _calls(bench.output_dir) == calls  # nothing re-run


def test_failed_run_given_up_after_max_attempts_then_retried_on_request(tmp_path):
    data = _bench(tmp_path, seeds=[0], methods=["lora"], max_attempts=2)
    data["overrides"] = [{"where": {"task": "rte-cls"}, "set": {"fail": {"always": True}}}]
    bench = parse_bench(data)
    out = run_bench(bench, job=synthetic_job, progress=False)
    assert len(out.ok) == 1 and len(out.failed) == 1
    records = read_records(bench.output_dir)
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 2 and "synthetic failure" in failed[-1]["error"]
    out2 = run_bench(bench, job=synthetic_job, progress=False)
    assert out2.skipped == 1 and out2.given_up == out.failed and out2.failed == []
    out3 = run_bench(bench, job=synthetic_job, progress=False, max_attempts=3)
    assert out3.failed == out.failed
    assert sum(r["status"] == "failed" for r in read_records(bench.output_dir)) == 3


def test_interrupted_run_is_retried_and_torn_line_skipped(tmp_path):
    bench = parse_bench(_bench(tmp_path, seeds=[0], methods=["lora"]))
    run = expand_grid(bench)[0]
    store = ResultStore(bench.output_dir)
    store.append({"key": run.key, "status": "running", "attempt": 1})  # the grid died mid-run
    with store.file.open("a") as fh:
        fh.write('{"key": "x", "status": "o')  # torn last line
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        out = run_bench(bench, job=synthetic_job, progress=False)
    assert len(out.ok) == 2
    with pytest.warns(UserWarning, match="unreadable"):
        states = ResultStore(bench.output_dir).states()
    assert states[run.key].attempts == 2 and states[run.key].status == "ok"


def test_user_interrupt_stops_the_grid_without_using_an_attempt(tmp_path):
    def interrupted(config, run_dir):
        raise KeyboardInterrupt

    bench = parse_bench(_bench(tmp_path, seeds=[0], methods=["lora"], max_attempts=1))
    with pytest.raises(KeyboardInterrupt):
        run_bench(bench, job=interrupted, progress=False)
    records = read_records(bench.output_dir)
    assert [r["status"] for r in records] == ["running", "failed"] and records[-1]["interrupted"]
    assert ResultStore(bench.output_dir).states()[records[0]["key"]].attempts == 0
    assert len(run_bench(bench, job=synthetic_job, progress=False).ok) == 2  # max_attempts=1 still allows the rerun


def test_subprocess_isolation_survives_a_hard_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    data = _bench(tmp_path, seeds=[0], methods=["lora"], isolation="subprocess", max_attempts=1)
    data["overrides"] = [{"where": {"task": "rte-cls"}, "set": {"fail": {"exit": True}}}]
    bench = parse_bench(data)
    out = run_bench(bench, progress=False)
    assert len(out.ok) == 1 and len(out.failed) == 1
    records = read_records(bench.output_dir)
    ok = next(r for r in records if r["status"] == "ok")
    assert ok["metrics"]["accuracy"] == 0.80 and ok["footprint"]["peak_rss_mb"] > 0 and "torch" in ok["versions"]
    bad = next(r for r in records if r["status"] == "failed")
    assert "exited with code 3" in bad["error"]


def test_side_by_side_workers_overlap_share_the_cores_and_record_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    data = _bench(tmp_path, seeds=[0], methods=["lora", "boft"], isolation="subprocess", max_attempts=1, workers=2)
    data["shared"]["record_env"] = True
    data["overrides"] = [{"where": {"task": "rte-cls", "method": "boft"}, "set": {"fail": {"always": True}}}]
    bench = parse_bench(data)
    out = run_bench(bench, progress=False)
    assert sorted(k.split("#")[0] for k in out.ok) == ["tiny/rte-cls/lora/seed0", "tiny/sst2-cls/boft/seed0", "tiny/sst2-cls/lora/seed0"]
    assert [k.split("#")[0] for k in out.failed] == ["tiny/rte-cls/boft/seed0"]
    records = read_records(bench.output_dir)
    assert sum(r["status"] == "running" for r in records) == 4  # one attempt each, every line intact
    ok = [r for r in records if r["status"] == "ok"]
    assert all(r["footprint"]["side_by_side_runs"] == 2 and r["footprint"]["worker_threads"] == 2 for r in ok)
    envs = [json.loads(p.read_text()) for p in sorted((bench.output_dir / "runs").glob("*/env.json"))]
    assert [e["omp"] for e in envs] == ["2", "2", "2"]  # 4 cores / 2 workers
    assert all(e["saw_peer"] for e in envs)  # the first run only sees a peer if a second one starts meanwhile
    first, second = sorted((e["start"], e["end"]) for e in envs)[:2]
    assert second[0] < first[1], f"the first two runs did not overlap: {first}, {second}"


def test_workers_need_subprocess_isolation(tmp_path):
    with pytest.raises(ValueError, match=r"workers=2 is invalid.*inprocess"):
        parse_bench(_bench(tmp_path, workers=2))
    with pytest.raises(ValueError, match=r"workers=0 is invalid"):
        parse_bench(_bench(tmp_path, workers=0, isolation="subprocess"))


def test_every_shipped_preset_parses_and_validates():
    from hybridpeft.bench.runner import load_job, validate_runs

    presets = sorted((REPO / "benchmarks").glob("*.yaml"))
    benches = [load_bench(p) for p in presets if "grid:" in p.read_text()]
    assert {b.name for b in benches} >= {"quick", "paper-small", "paper"}
    for bench in benches:
        runs = expand_grid(bench) + expand_search(bench)  # an lr-searched cell has only search runs until selected
        assert runs, bench.name
        validate_runs(load_job(bench.job), runs)


def test_summary_hand_checked():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s.n == 4 and s.mean == 2.5
    assert s.sd == pytest.approx(math.sqrt(5.0 / 3.0), abs=1e-12)  # Σ(x−x̄)² = 5, ddof = 1
    assert summarize([7.0]).sd == 0.0
    with pytest.raises(ValueError, match="values"):
        summarize([])


def test_welch_against_scipy_and_closed_form():
    from scipy import stats

    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0]
    w = welch(a, b)
    # s²_a/n = 5/12, s²_b/n = 5/3: t = −2.5/√(25/12) = −√3, ν = (25/12)² / ((5/12)²/3 + (5/3)²/3) = 75/17
    assert w.t == pytest.approx(-math.sqrt(3.0), abs=1e-12)
    assert w.df == pytest.approx(75.0 / 17.0, abs=1e-12)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w.p == pytest.approx(ref.pvalue, rel=1e-12) and w.t == pytest.approx(ref.statistic, rel=1e-12)
    assert w.p == pytest.approx(2 * stats.t.sf(math.sqrt(3.0), 75.0 / 17.0), rel=1e-10)
    assert not w.significant
    strong = welch([0.90, 0.91, 0.89], [0.80, 0.81, 0.79])
    assert strong.significant and strong.p == pytest.approx(
        stats.ttest_ind([0.90, 0.91, 0.89], [0.80, 0.81, 0.79], equal_var=False).pvalue, rel=1e-12)
    assert welch([1.0], [2.0, 3.0]).p is None          # one value: undefined
    assert welch([1.0, 1.0], [2.0, 2.0]).p is None     # no spread: undefined


@pytest.fixture
def synthetic_results(tmp_path):
    bench = parse_bench(_bench(tmp_path, methods=["lora", "boft", {"name": "hybrid"},
                                                  {"name": "hybrid-fixed-0.5", "method": "hybrid", "role": "ablation",
                                                   "adapter": {"schedule": "fixed", "lam_fixed": 0.5}},
                                                  {"name": "hybrid-anneal", "method": "hybrid", "role": "ablation",
                                                   "adapter": {"schedule": "anneal"}},
                                                  "full"]))
    run_bench(bench, job=synthetic_job, progress=False)
    return bench.output_dir


def test_main_table_marks_significance(synthetic_results):
    from hybridpeft.bench.store import finished

    cells = build_cells(finished(read_records(synthetic_results)))
    table = next(t for t in main_tables(cells) if t.title.startswith("sst2-cls"))
    rows = {r[0]: r for r in table.rows}
    assert list(rows) == ["full", "lora", "boft", "hybrid"]  # paper order; ablation rows stay out of Table I
    assert rows["lora"][1] == "80.00 / 81.00 / 79.00" and rows["lora"][2] == "80.00 ± 1.00"
    assert rows["hybrid"][2] == "90.00 ± 1.00†" and rows["hybrid"][3] == "+10.00"
    assert "†" not in rows["boft"][2] and rows["lora"][4] == "n/a"
    partial = [r for r in finished(read_records(synthetic_results)) if not (r["method"] == "boft" and r["seed"] == 1)]
    table = next(t for t in main_tables(build_cells(partial)) if t.title.startswith("sst2-cls"))
    assert {r[0]: r for r in table.rows}["boft"][1] == "80.50 / — / 81.00"  # a missing seed keeps its column


def test_report_renders_every_table_and_figure(synthetic_results, tmp_path):
    out = tmp_path / "report"
    paths = write_report(synthetic_results, out, title="Synthetic")
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for heading in ("Main results", "λ ablation", "Training footprint", "All reported metrics", "paper's claims", "Failed runs"):
        assert heading in md and html_escape(heading) in page
    assert "| hybrid | 90.00 / 91.00 / 89.00 | 90.00 ± 1.00† | +10.00 |" in md
    assert "| hybrid-fixed-0.5 | fixed λ = 0.5 | 85.00 ± 1.00‡ |" in md           # ablation row, significant vs adaptive
    assert "| hybrid-anneal | anneal 0.75 → 0.25 |" in md
    assert "Hybrid beats lora: supported" in md and "Hybrid beats full: not supported" in md
    assert "| tiny | sst2-cls | lora | 0.141 ± 0.001 | 1.00× | 701 ± 1 | 1.00× | 0.040 | 4.00 | 2.0 |" in md  # footprint
    assert "| tiny | sst2-cls | hybrid | 0.161 ± 0.001 | 1.14× | 801 ± 1 | 1.14× | 0.060 | 6.00 |" in md
    figures = ["footprint", "curves_tiny_sst2-cls", "curves_tiny_rte-cls", "lambda_tiny_sst2-cls", "lambda_tiny_rte-cls"]
    for name in figures:
        png = out / "figures" / f"{name}.png"
        assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{name}.png" in md and f"figures/{name}.png" in page
        assert paths[name] == png
    assert "<table>" in page and page.count("<img") == len(figures)


def test_claims_below_the_majority_class_are_not_evidence(tmp_path):
    """RTE in the slice: the Hybrid 'beat' LoRA-GA with p < 0.05 while both sat below the share of
    the most frequent label. Such a verdict must say it is not evidence, and Table I shows the floor."""
    data = _bench(tmp_path, methods=["lora", "hybrid", "full"])
    data["overrides"] = [{"where": {"task": "rte-cls"}, "set": {"majority": 0.95}},
                         {"where": {"task": "sst2-cls"}, "set": {"majority": 0.5}}]
    bench = parse_bench(data)
    run_bench(bench, progress=False)
    cells = build_cells(finished(read_records(bench.output_dir)))
    from hybridpeft.bench.report import claims

    said = claims(cells)
    rte = next(c for c in said if c.startswith("tiny/rte-cls — Hybrid beats lora"))
    assert rte.startswith("tiny/rte-cls — Hybrid beats lora: not evidence: neither hybrid's mean nor lora's clears the "
                          "majority-class baseline (95.00%)"), rte
    sst = next(c for c in said if c.startswith("tiny/sst2-cls — Hybrid beats lora"))
    assert "Hybrid beats lora: supported" in sst  # 90 % against a 50 % floor stands
    table = next(t for t in main_tables(cells) if t.title.startswith("rte-cls"))
    assert table.rows[-1][:3] == ["majority class (constant prediction)", "—", "95.00"]


def test_every_claim_applies_the_floor_and_the_baseline_order_gets_a_verdict(tmp_path):
    """The floor used to guard only claims about the Hybrid, and only its side; LoRA-GA > BOFT > LoRA
    and the unitary adapter's deficit got no verdict at all."""
    from hybridpeft.bench.report import claims

    data = _bench(tmp_path, methods=["lora", "lora_ga", "boft", "unitary", "hybrid", "full"])
    data["grid"] = [{"model": "tiny", "tasks": ["sst2-cls", "rte-cls", "xnli-cls"]}]
    data["overrides"] = [{"where": {"task": "sst2-cls"}, "set": {"majority": 0.5}},
                         {"where": {"task": "rte-cls"}, "set": {"majority": 0.83}},   # lora_ga above; boft, lora below
                         {"where": {"task": "xnli-cls"}, "set": {"majority": 0.905}}]  # hybrid below; full above
    bench = parse_bench(data)
    run_bench(bench, progress=False)
    said = claims(build_cells(finished(read_records(bench.output_dir))))

    def claim(where: str, what: str) -> str:
        return next(c for c in said if c.startswith(f"tiny/{where} — {what}:"))

    order = "LoRA-GA > BOFT > LoRA (the paper's baseline order, Table I)"
    assert claim("sst2-cls", order).split(": ", 1)[1].startswith("same direction, not significant (lora_ga vs boft: supported")
    rte_order = claim("rte-cls", order)
    assert ": not evidence (lora_ga vs boft: supported" in rte_order and "boft's mean does not clear" in rte_order
    assert "boft vs lora: not evidence — neither boft's mean nor lora's clears the majority-class baseline (83.00%)" in rte_order
    urnn = "the unitary (uRNN) adapter trails LoRA (Table I, GLUE)"
    assert claim("sst2-cls", urnn).split(": ", 1)[1].startswith("supported (Δ = +19.00 percentage points")
    assert claim("rte-cls", urnn).split(": ", 1)[1].startswith("not evidence: neither lora's mean nor unitary's")
    assert claim("xnli-cls", "Hybrid beats full").split(": ", 1)[1].startswith(
        "not supported: hybrid's mean does not clear the majority-class baseline (90.50%) while full's does")
    assert claim("xnli-cls", "Hybrid beats lora").split(": ", 1)[1].startswith("not evidence: neither")


def test_a_second_adaptive_hybrid_row_is_not_taken_for_a_lambda_variant(tmp_path):
    """lr-sensitivity has Hybrid rows at other learning rates: same adaptive schedule, so neither
    'the' Hybrid of the claims (that stays the row named hybrid) nor a λ ablation."""
    from hybridpeft.bench.report import claims
    from hybridpeft.bench.tables import adaptive_hybrid

    data = _bench(tmp_path, seeds=[0, 1], methods=[{"name": "hybrid@2e-3", "method": "hybrid", "train": {"lr": 2e-3}},
                                                   "lora", "hybrid", "hybrid-fixed-0.5"])
    data["methods"][-1] = {"name": "hybrid-fixed-0.5", "method": "hybrid", "adapter": {"schedule": "fixed", "lam_fixed": 0.5}}
    bench = parse_bench(data)
    run_bench(bench, progress=False)
    cells = build_cells(finished(read_records(bench.output_dir)))
    assert adaptive_hybrid(cells, "tiny", "sst2-cls").method == "hybrid"
    said = [c for c in claims(cells) if c.startswith("tiny/sst2-cls")]
    assert any("adaptive λ beats hybrid-fixed-0.5" in c for c in said)
    assert not any("hybrid@2e-3" in c for c in said)


def test_footprint_note_says_when_runs_shared_the_machine(tmp_path):
    from hybridpeft.bench.tables import footprint_table

    data = _bench(tmp_path, seeds=[0], methods=["lora"])
    bench = parse_bench(data)
    run_bench(bench, progress=False)
    records = finished(read_records(bench.output_dir))
    assert "side by side" not in footprint_table(build_cells(records)).note
    for r in records:
        r["footprint"].update(side_by_side_runs=2, worker_threads=1)
    assert "Runs went 2 side by side (1 thread(s) each)" in footprint_table(build_cells(records)).note


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


def test_report_lists_failures_and_rejects_empty(tmp_path):
    data = _bench(tmp_path, seeds=[0, 1], methods=["lora", "hybrid"], max_attempts=1)
    data["overrides"] = [{"where": {"task": "rte-cls", "method": "lora"}, "set": {"fail": {"always": True}}}]
    bench = parse_bench(data)
    run_bench(bench, job=synthetic_job, progress=False)
    write_report(bench.output_dir, tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "tiny/rte-cls/lora/seed0" in md and "RuntimeError: synthetic failure" in md
    empty = tmp_path / "empty"
    ResultStore(empty).append({"key": "k", "status": "running"})
    with pytest.raises(ValueError, match="no finished run"):
        write_report(empty, tmp_path / "r2")


def test_report_names_a_nan_metric_and_skipped_lines_and_goes_on(tmp_path, capsys):
    """One NaN metric used to sink the whole report without naming the run (issue 12, item 7)."""
    from hybridpeft import cli

    data = _bench(tmp_path, seeds=[0, 1, 2], methods=["lora", "hybrid"], grid=[{"model": "tiny", "tasks": ["sst2-cls"]}])
    data["overrides"] = [{"where": {"method": "hybrid", "seed": 2}, "set": {"nan_metric": "val_loss"}}]
    bench = parse_bench(data)
    run_bench(bench, job=synthetic_job, progress=False)
    store = bench.output_dir / "results.jsonl"
    good = {(r["method"], r["seed"]): r for r in map(json.loads, store.read_text().splitlines()) if r["status"] == "ok"}
    rerun = {**good[("lora", 2)], "metrics": {**good[("lora", 2)]["metrics"], "accuracy": float("nan")}}
    no_seed = {k: v for k, v in good[("lora", 0)].items() if k != "seed"}
    with store.open("a") as fh:  # a NaN primary metric (hand-edited store, older writer), then three bad lines
        fh.write(json.dumps(rerun) + "\n[1, 2]\n" + json.dumps(no_seed) + "\n" + '{"key": "x", "status": "o')
    lines = len(store.read_text().splitlines())
    with pytest.warns(UserWarning, match=r"skipped .*results.jsonl, line"):
        assert cli.main(["report", str(bench.output_dir), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"| {rerun['key']} | metric failed | 1 | accuracy = nan; left out of every table and test |" in md
    assert f"| {good[('hybrid', 2)]['key']} | metric failed | 1 | val_loss = nan; left out of that metric's mean |" in md
    assert "| lora | 80.00 / 81.00 / — | 80.50 ± 0.71 |" in md  # the other seeds still count
    assert "| hybrid | 90.00 / 91.00 / 89.00 | 90.00 ± 1.00† |" in md  # its primary metric is fine ...
    assert "| tiny | sst2-cls | hybrid | 3 | 0.9000 | 1.5100 | 0.0950 |" in md  # ... and val_loss is the mean of seeds 0 and 1
    assert "## Skipped lines of the results file" in md
    assert f"`results.jsonl` line {lines - 2}: a JSON list, not a record object" in md
    assert f"`results.jsonl` line {lines - 1}: finished record" in md and "['seed']" in md
    assert f"`results.jsonl` line {lines}: not valid JSON" in md


def test_cli_entry_points(tmp_path, capsys):
    from hybridpeft.bench.__main__ import main

    bench = parse_bench(_bench(tmp_path, seeds=[0, 1], methods=["lora", "hybrid"],
                               grid=[{"model": "tiny", "tasks": ["sst2-cls"]}]))
    run_bench(bench, job=synthetic_job, progress=False)
    proc = subprocess.run([sys.executable, "-m", "hybridpeft.cli", "report", str(bench.output_dir), "--out", str(tmp_path / "c")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "c" / "report.html").stat().st_size > 1000 and "wrote" in proc.stdout
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "d")]) == 2
    assert "no results file" in capsys.readouterr().err


def test_training_job_helpers():
    from hybridpeft.bench.job import _eval_curve, job_mapping, lambda_history

    steps = [{"step": k, "grad_norm": float(k), "mixing": {"m.layers.10.q": {"lambda": 0.1 * k}, "m.layers.2.q": {"lambda": 0.5}}}
             for k in range(1, 11)]
    hist = lambda_history(steps, max_points=4)
    assert hist["layers"] == ["m.layers.2.q", "m.layers.10.q"]          # numeric order, not string order
    assert hist["steps"] == [1, 4, 7, 10] and hist["values"][-1] == [0.5, pytest.approx(1.0)]
    assert lambda_history([{"step": 1, "grad_norm": 1.0}]) is None
    curve = _eval_curve([{"step": 4, "val_loss": 2.0}, {"step": 10, "val_loss": 1.5}], steps)
    assert curve == [{"step": 4, "val_loss": 2.0, "grad_norm": 2.5}, {"step": 10, "val_loss": 1.5, "grad_norm": 7.5}]
    config = {"run": {"model": "m", "task": "t", "method": "x", "seed": 3}, "train": {"lr": 0.1}, "adapter": {"method": "lora"}}
    mapping = job_mapping(config, Path("out"))
    assert mapping["model"]["name"] == "m" and mapping["data"]["task"] == "t" and mapping["train"] == {"lr": 0.1, "seed": 3, "progress": False}
    assert mapping["output"] == {"run_dir": str(Path("out") / "train"), "overwrite": True} and "run" not in mapping
    with pytest.raises(ValueError, match="bogus"):
        job_mapping({**config, "bogus": {}})


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path):
    """benchmarks/quick.yaml with real training (minutes on 2 CPU cores)."""
    bench = load_bench(REPO / "benchmarks" / "quick.yaml", [f"output={tmp_path / 'quick'}"])
    out = run_bench(bench, progress=False)
    assert out.failed == [] and len(out.ok) == out.total
    paths = write_report(bench.output_dir, tmp_path / "report")
    assert paths["markdown"].stat().st_size > 0


def test_main_table_shows_the_base_model_before_training(synthetic_results):
    """Records with a ``before`` score add one row per task: the untouched model, per seed."""
    from hybridpeft.bench.store import finished

    records = finished(read_records(synthetic_results))
    assert all(not r.get("before") for r in records)
    table = next(t for t in main_tables(build_cells(records)) if t.title.startswith("sst2-cls"))
    assert all(not r[0].startswith("base model") for r in table.rows)  # nothing recorded, no row
    for r in records:
        if r["task"] == "sst2-cls":
            r["before"] = {"accuracy": 0.5 + 0.01 * r["seed"]}
    table = next(t for t in main_tables(build_cells(records)) if t.title.startswith("sst2-cls"))
    assert table.rows[-1][:3] == ["base model, before training", "50.00 / 51.00 / 52.00", "51.00 ± 1.00"]


def test_final_metrics_keep_the_two_validation_losses_apart():
    """The task's loss on the scored examples stays ``val_loss`` (matching its ``val_ppl``); the loop's
    held-out-split loss is ``heldout_loss``. An earlier version let the second overwrite the first."""
    from hybridpeft.bench.job import final_metrics

    after = {"accuracy": 0.9, "val_loss": 0.125, "val_ppl": math.exp(0.125), "n": 400, "note": "text"}
    evals = [{"step": 100, "val_loss": 0.4}, {"step": 300, "val_loss": 0.2}]
    m = final_metrics(after, evals, 0.19, 300)
    assert m["val_loss"] == 0.125 and math.log(m["val_ppl"]) == pytest.approx(m["val_loss"])
    assert m["heldout_loss"] == 0.2 and m["best_heldout_loss"] == 0.19 and m["steps"] == 300.0
    assert "note" not in m
    assert final_metrics(None, [], None, 5) == {"steps": 5.0}


def test_records_from_before_the_loss_split_are_read_with_the_new_names(tmp_path):
    legacy = {"key": "m/t/lora/seed0#x", "status": "ok", "primary_metric": "accuracy",
              "metrics": {"accuracy": 0.9, "val_loss": 0.2, "best_val_loss": 0.19, "val_ppl": math.exp(0.125)}}
    current = {"key": "m/t/lora/seed1#x", "status": "ok", "primary_metric": "accuracy",
               "metrics": {"accuracy": 0.8, "val_loss": 0.3, "heldout_loss": 0.4}}
    (tmp_path / "results.jsonl").write_text(json.dumps(legacy) + "\n" + json.dumps(current) + "\n")
    old, new = read_records(tmp_path)
    assert old["metrics"]["heldout_loss"] == 0.2 and old["metrics"]["best_heldout_loss"] == 0.19
    assert old["metrics"]["val_loss"] == pytest.approx(0.125) and "best_val_loss" not in old["metrics"]
    assert new["metrics"] == current["metrics"]


def test_one_seed_verdicts_say_untested(tmp_path):
    from hybridpeft.bench.report import claims

    bench = parse_bench(_bench(tmp_path, seeds=[0], methods=["lora", "hybrid", "full"]))
    run_bench(bench, progress=False)
    said = claims(build_cells(finished(read_records(bench.output_dir))))
    beats_lora = next(c for c in said if c.startswith("tiny/sst2-cls — Hybrid beats lora:"))
    assert "same direction, untested (a t-test needs two or more seeds per side)" in beats_lora
    assert "p = n/a, n = 1 vs 1" in beats_lora


def test_speed_verdicts_are_withheld_when_the_footprint_is_not_comparable(tmp_path):
    """paper-small-2e-3's report printed speed verdicts from timings its own notes called unusable."""
    from hybridpeft.bench.report import claims
    from hybridpeft.bench.runner import comparability
    from hybridpeft.bench.tables import footprint_table

    data = _bench(tmp_path, seeds=[0, 1], methods=["lora", "hybrid", "full"], grid=[{"model": "tiny", "tasks": ["sst2-cls"]}])
    bench = parse_bench(data)
    run_bench(bench, progress=False)
    records = finished(read_records(bench.output_dir))
    assert all(isinstance(r["footprint"]["comparable"], bool) and "load_avg_1m_mean" in r["footprint"] for r in records)
    for r in records:  # whatever this machine's load was, these are comparable for the first half of the test
        r["footprint"].update(comparable=True)
    speed = [c for c in claims(build_cells(records)) if "faster per step than full FT" in c or "half the peak memory" in c
             or "overhead over lora is small" in c]
    assert len(speed) == 3 and not any("withheld" in c for c in speed)
    full = next(r for r in records if r["method"] == "full")
    full["footprint"].update(comparable=False, not_comparable_reason="a test said so")
    withheld = [c for c in claims(build_cells(records)) if "withheld" in c]
    assert len(withheld) == 2 and not any("overhead over lora" in c for c in withheld)  # LoRA vs Hybrid still stands
    next(r for r in records if r["method"] == "hybrid")["footprint"].update(comparable=False, not_comparable_reason="a test said so")
    cells = build_cells(records)
    withheld = [c for c in claims(cells) if "withheld" in c]
    assert len(withheld) == 3 and all("withheld: the footprint data is marked not comparable (a test said so)." in c for c in withheld)
    assert "**Not comparable:** a test said so (2 of 6 runs)" in footprint_table(cells).note

    (bench.output_dir / "annotations.json").write_text(json.dumps({"footprint_not_comparable": "found out later"}))
    write_report(bench.output_dir, tmp_path / "annotated")
    md = (tmp_path / "annotated" / "report.md").read_text()
    assert md.count("withheld: the footprint data is marked not comparable (found out later).") == 3
    assert "**Not comparable:** found out later (6 of 6 runs)" in md
    (bench.output_dir / "annotations.json").write_text(json.dumps({"footprint_comparable": False}))
    with pytest.raises(ValueError, match="keys among"):
        write_report(bench.output_dir, tmp_path / "bad")

    quiet, reason = comparability(bench, 1.2, 2)
    busy, why = comparability(bench, 3.1, 2)
    assert quiet and reason is None and not busy and why == "the machine's load average was 3.1 on 2 cores during the run"
    shared = parse_bench({**data, "footprint_comparable": False, "output": str(tmp_path / "shared")})
    run_bench(shared, progress=False)
    assert all(r["footprint"]["comparable"] is False and "footprint_comparable: false" in r["footprint"]["not_comparable_reason"]
               for r in finished(read_records(shared.output_dir)))


def test_lr_search_selects_on_heldout_loss_then_runs_every_seed_at_the_choice(tmp_path):
    from hybridpeft.bench.selection import select_lrs
    from hybridpeft.bench.spec import expand_search

    data = _bench(tmp_path, methods=["lora", "hybrid", {"name": "full", "train": {"lr": 1e-5}},
                                     {"name": "hybrid-fixed-0.5", "method": "hybrid", "role": "ablation",
                                      "adapter": {"schedule": "fixed", "lam_fixed": 0.5}}],
                  lr_search={"candidates": {"default": [1e-4, 1e-3, 1e-2], "full": [1e-5, 1e-4]}, "seeds": [0]})
    bench = parse_bench(data)
    search = expand_search(bench)
    assert len(search) == 2 * (3 + 3 + 2) and {r.role for r in search} == {"lr-search"}
    assert sorted({r.method for r in search if r.task == "sst2-cls"}) == [
        "full@1e-4", "full@1e-5", "hybrid@1e-2", "hybrid@1e-3", "hybrid@1e-4", "lora@1e-2", "lora@1e-3", "lora@1e-4"]
    assert {r.method for r in expand_grid(bench)} == {"hybrid-fixed-0.5"}  # searched cells wait for their selection
    out = run_bench(bench, progress=False)
    assert out.total == 16 + 24 and len(out.reused) == 6 and len(out.ok) == 34 and not out.failed and not out.waiting
    records = finished(read_records(bench.output_dir))
    final = {(r["task"], r["method"], r["seed"]): r for r in records if r["role"] != "lr-search"}
    assert {m: final[("sst2-cls", m, 1)]["config"]["train"]["lr"] for m in ("lora", "hybrid", "full", "hybrid-fixed-0.5")} == \
        {"lora": 1e-3, "hybrid": 1e-2, "full": 1e-5, "hybrid-fixed-0.5": 1e-3}  # the ablation row keeps its configured lr
    chosen = final[("rte-cls", "hybrid", 2)]["lr_selected"]
    assert chosen["lr"] == 1e-2 and chosen["metric"] == "heldout_loss" and chosen["scores"]["0.01"] == pytest.approx(0.5)
    reused = final[("sst2-cls", "lora", 0)]
    assert reused["reused_from"].startswith("tiny/sst2-cls/lora@1e-3/seed0#") and reused["key"].startswith("tiny/sst2-cls/lora/seed0#")
    calls = sum(len(f.read_text().splitlines()) for f in (bench.output_dir / "runs").glob("*/calls"))
    assert calls == 34  # the 6 reused runs were not trained again
    again = run_bench(bench, progress=False)
    assert again.total == 40 and again.skipped == 40 and not again.ok
    selected, waiting = select_lrs(bench, ResultStore(bench.output_dir).states())
    assert not waiting and selected[("tiny", "sst2-cls", "full")]["lr"] == 1e-5

    elsewhere = dict(data, output=str(tmp_path / "elsewhere"), seeds=[0, 1],
                     reuse_from=[str(bench.output_dir / "results.jsonl")])
    (bench.output_dir / "annotations.json").write_text(json.dumps({"footprint_not_comparable": "busy then"}))
    out = run_bench(parse_bench(elsewhere), progress=False)
    assert out.total == 16 + 16 and len(out.reused) == 32 and not out.ok  # nothing trained: every run has a twin
    copied = finished(read_records(tmp_path / "elsewhere"))
    own = {r["key"] for r in copied}
    assert all(r["reused_from"].startswith(str(bench.output_dir / "results.jsonl") + ":tiny/") or r["reused_from"] in own
               for r in copied)  # a final seed-0 run may reuse this store's own copy of its search run
    assert sum(r["reused_from"].startswith(str(bench.output_dir)) for r in copied) >= 16 + 8
    assert all(r["footprint"]["comparable"] is False and r["footprint"]["not_comparable_reason"] == "busy then"
               for r in copied)  # a footprint marked in the source store stays marked in the copy
    assert {r["seed"] for r in copied} == {0, 1} and sum(len(f.read_text().splitlines())
                                                       for f in (bench.output_dir / "runs").glob("*/calls")) == 34
    with pytest.raises(FileNotFoundError, match="reuse_from entry"):
        run_bench(parse_bench(dict(elsewhere, reuse_from=["nowhere.jsonl"])), progress=False)
    # A relative entry resolves against the benchmark file's directory and is recorded as written:
    # a committed store must not carry this machine's absolute paths.
    relative = dict(elsewhere, output=str(tmp_path / "relative"), reuse_from=[f"{bench.output_dir.name}/results.jsonl"])
    run_bench(parse_bench(relative, base_dir=bench.output_dir.parent), progress=False)
    sources = {r["reused_from"].split(":")[0] for r in finished(read_records(tmp_path / "relative"))
               if ":" in r["reused_from"]}
    assert sources == {f"{bench.output_dir.name}/results.jsonl"}

    broken = dict(data, output=str(tmp_path / "broken"), max_attempts=1,
                  overrides=[{"where": {"method": "hybrid", "task": "rte-cls"}, "set": {"fail": {"always": True}}}])
    out = run_bench(parse_bench(broken), progress=False)
    assert out.waiting and out.waiting[0].startswith("tiny/rte-cls/hybrid (lr search unfinished: tiny/rte-cls/hybrid@1e-4/seed0")
    assert len(out.failed) == 3  # the three search runs; no final run of that cell was started


def _record(model, task, method, seed, metrics, primary="accuracy", before=None, **extra):
    return {"key": f"{model}/{task}/{method}/seed{seed}#x", "status": "ok", "model": model, "task": task, "method": method,
            "adapter_method": extra.pop("adapter_method", method), "seed": seed, "role": extra.pop("role", "main"),
            "metrics": metrics, "primary_metric": primary, "before": before, "footprint": {},
            "config": extra.pop("config", {}), **extra}


def test_multilingual_layouts_say_no_data_and_average_the_directions():
    """Tables III/V: per-language accuracy with the macro only when every asked language has data;
    BLEU per direction with the per-seed average, which also gets claim verdicts."""
    from hybridpeft.bench.layouts import direction_average_cells, direction_tables, language_tables
    from hybridpeft.bench.report import claims

    xnli = {"data": {"task_args": {"languages": ["en", "zh", "hi"]}}}
    skipped = {"skipped_languages": {"zh": "no file, no hub", "hi": "no file, no hub"}}
    records = []
    for seed in (0, 1, 2):
        for method, acc, es, zh in (("lora", 0.50, 20.0, 10.0), ("hybrid", 0.60, 24.0, 13.0)):
            records.append(_record("m", "xnli", method, seed, {"accuracy": acc + 0.01 * seed, "accuracy_en": acc + 0.01 * seed,
                                                               "majority_class_accuracy": 0.34}, config=xnli,
                                   before={"accuracy": 0.40, "accuracy_en": 0.40}, data=skipped))
            records.append(_record("m", "translate-en-es", method, seed, {"bleu": es + seed}, "bleu", before={"bleu": 5.0}))
            records.append(_record("m", "translate-en-zh", method, seed, {"bleu": zh + 0.5 * seed}, "bleu", before={"bleu": 3.0}))
    cells = build_cells(records)
    (langs,) = language_tables(cells)
    assert langs.header == ["Method", "English (en)", "Chinese (zh)", "Hindi (hi)", "Macro"]
    assert langs.rows[0] == ["lora", "51.00 ± 1.00", "no data", "no data", "no data"]
    assert langs.rows[-1] == ["base model, before training", "40.00 ± 0.00", "no data", "no data", "no data"]
    assert "No data for Chinese, Hindi" in langs.note
    (dirs,) = direction_tables(cells)
    assert dirs.header == ["Method", "en→es", "en→zh", "Average"]
    assert dirs.rows[1] == ["hybrid", "25.00 ± 1.00", "13.50 ± 0.50", "19.25 ± 0.75"]
    assert dirs.rows[-1] == ["base model, before training", "5.00 ± 0.00", "3.00 ± 0.00", "4.00 ± 0.00"]
    averaged = direction_average_cells(cells)
    assert [r["metrics"]["bleu"] for r in averaged[("m", "translation (mean over en→es, en→zh)", "hybrid")].records] == [18.5, 19.25, 20.0]
    said = claims({**cells, **averaged})
    assert any(c.startswith("m/translation (mean over en→es, en→zh) — Hybrid beats lora: supported (Δ = +3.50 bleu") for c in said)
    assert any(c.startswith("m/xnli (en only: no data for hi, zh) — Hybrid beats lora: supported") for c in said)
    full_macro = build_cells([_record("m", "xnli", "lora", s, {"accuracy": 0.5, "accuracy_en": 0.6, "accuracy_zh": 0.4},
                                      config={"data": {"task_args": {"languages": "en,zh"}}}) for s in (0, 1)])
    assert language_tables(full_macro)[0].rows[0] == ["lora", "60.00 ± 0.00", "40.00 ± 0.00", "50.00 ± 0.00"]


def test_clipping_lambda_and_lr_selection_tables():
    from hybridpeft.bench.diagnostics import clipping_table, lambda_table, lr_selection_table

    curves = lambda norms: {"train": [{"step": i + 1, "grad_norm": n} for i, n in enumerate(norms)], "eval": []}  # noqa: E731
    hist = {"layers": ["m.layers.0.q", "m.layers.0.v", "m.layers.1.q", "m.layers.1.v"], "steps": [1, 2],
            "values": [[0.5, 0.5, 0.5, 0.5], [0.40, 0.80, 0.46, 0.70]]}
    records = [
        _record("m", "t", "lora", 0, {"accuracy": 0.8}, curves=curves([0.5, 2.0, 3.0, 0.9]), config={"train": {"max_grad_norm": 1.0}}),
        _record("m", "t", "lora", 1, {"accuracy": 0.8}, curves=curves([0.5, 0.5, 3.0, 0.9]), config={"train": {"max_grad_norm": 1.0}}),
        _record("m", "t", "hybrid", 0, {"accuracy": 0.8}, curves=curves([5.0, 6.0]), lambda_history=hist,
                config={"train": {"max_grad_norm": None}}),
    ]
    cells = build_cells(records)
    clip = clipping_table(cells)
    assert clip.rows[0] == ["m", "t", "lora", "1.00", "38 (25–50)", "0.90"]
    assert clip.rows[1][3:5] == ["none", "0"]
    lam = lambda_table(cells)
    assert [r[3:6] for r in lam.rows] == [["q", "0.40–0.46", "0.43"], ["v", "0.70–0.80", "0.75"]]
    assert lr_selection_table(cells) is None
    search = [_record("m", "t", f"lora@{lr}", 0, {"accuracy": acc, "heldout_loss": loss}, role="lr-search", adapter_method="lora",
                      lr_search={"method": "lora", "lr": float(lr), "metric": "heldout_loss", "candidates": [1e-3, 2e-3], "seeds": [0]})
              for lr, acc, loss in (("1e-3", 0.70, 0.60), ("2e-3", 0.80, 0.50))]
    final = [dict(r, lr_selected={"lr": 2e-3, "metric": "heldout_loss", "scores": {}}) for r in records[:2]]
    table = lr_selection_table(build_cells(search + final))
    assert table.rows == [["m", "t", "lora", "1e-3: 0.600 (70.0) · **2e-3**: 0.500 (80.0)", "2e-3"]]


def test_a_run_finished_by_another_invocation_meanwhile_is_not_run_again(tmp_path):
    """Two `hybridpeft bench` processes on one store (e.g. a second one started for one seed) must
    not train the same run twice: each checks the store again right before a run starts."""
    bench = parse_bench(_bench(tmp_path, seeds=[0, 1], methods=["lora"], grid=[{"model": "tiny", "tasks": ["sst2-cls"]}]))
    runs = expand_grid(bench)
    called = []

    def job(config, run_dir):
        called.append(config["run"]["seed"])
        result = synthetic_job(config, run_dir)
        if config["run"]["seed"] == 0:  # meanwhile, "another process" finishes seed 1
            other = runs[1]
            ResultStore(bench.output_dir).append({"key": other.key, "status": "ok", "model": "tiny", "task": "sst2-cls",
                                                  "method": "lora", "adapter_method": "lora", "seed": 1, "role": "main",
                                                  "config": other.config, **synthetic_job(other.config, run_dir)})
        return result

    out = run_bench(bench, job=job, progress=False)
    assert called == [0] and out.skipped == 1 and len(out.ok) == 1


def test_extra_baselines_are_labelled_and_kept_out_of_the_papers_claims(tmp_path):
    """DoRA / IA³ rows (role "extra") sit in Table I and the footprint table, marked as not in the
    paper's tables, after the paper's rows; no claim compares the Hybrid with them."""
    from hybridpeft.bench.report import claims
    from hybridpeft.bench.tables import footprint_table

    data = _bench(tmp_path, seeds=[0, 1], methods=[{"name": "dora", "role": "extra"}, "lora", "hybrid"])
    bench = parse_bench(data)
    run_bench(bench, job=synthetic_job, progress=False)
    cells = build_cells(finished(read_records(bench.output_dir)))
    table = next(t for t in main_tables(cells) if t.title.startswith("sst2-cls"))
    assert [r[0] for r in table.rows] == ["lora", "hybrid", "dora (extra: not in the paper's tables)"]
    assert "Rows marked extra" in table.note
    assert any(r[2] == "dora (extra: not in the paper's tables)" for r in footprint_table(cells).rows)
    assert not any("dora" in c for c in claims(cells))
    with pytest.raises(ValueError, match="role"):
        parse_bench(_bench(tmp_path, methods=[{"name": "dora", "role": "baseline"}]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_primary_metric_is_refused_naming_it(bad):
    """A job whose primary metric is NaN or ±inf is a failed run, not a record (inf used to pass)."""
    result = {"metrics": {"accuracy": bad, "val_loss": 0.5}, "primary_metric": "accuracy"}
    with pytest.raises(ValueError, match=r"metrics\['accuracy'\]=(nan|inf|-inf) is invalid: the primary metric must be finite"):
        check_result(result)
    check_result({**result, "primary_metric": "val_loss"})  # a non-finite secondary metric is kept (reported as failed)


def test_stored_errors_name_no_path_of_this_machine(tmp_path, monkeypatch):
    """A failed run's traceback used to carry absolute paths into a store meant for publishing."""
    import hybridpeft.bench.store as store_module

    data = tmp_path / "data"
    monkeypatch.setenv("HYBRIDPEFT_DATA", str(data))
    repo = Path(store_module.__file__).resolve().parents[3]
    store = ResultStore(tmp_path / "store")
    error = (f'File "{repo}/src/hybridpeft/train/loop.py", line 3\n'
             f'File "{sys.prefix}/lib/torch/nn.py"\n'
             f"FileNotFoundError: {data}/xnli/dev.tsv\nsaved {tmp_path / 'store'}/runs/a\nkept as is: /opt/x")
    store.append({"key": "k", "status": "failed", "error": error})
    stored = store.records()[0]["error"]
    store.append({"key": "k", "status": "ok", "config": {"data": {"data_dir": str(data)}},
                  "metrics": {"skipped_languages": {"hi": f"missing data file {data}/xnli/dev-hi.csv"}, "n": 3}})
    ok = store.records()[1]
    assert ok["metrics"] == {"skipped_languages": {"hi": "missing data file <data>/xnli/dev-hi.csv"}, "n": 3}
    assert ok["config"] == {"data": {"data_dir": str(data)}}  # settings stay as run keys hash them
    assert stored == ('File "<repo>/src/hybridpeft/train/loop.py", line 3\n'
                      'File "<python>/lib/torch/nn.py"\n'
                      "FileNotFoundError: <data>/xnli/dev.tsv\nsaved <store>/runs/a\nkept as is: /opt/x")


def test_report_with_its_benchmark_counts_and_names_every_missing_run(tmp_path):
    """A partial store's report used to be silent about runs that never started."""
    from hybridpeft.bench.progress import grid_progress
    from hybridpeft.bench.report import write_report

    data = _bench(tmp_path, methods=["lora", "hybrid"], seeds=[0, 1], max_attempts=1,
                  lr_search={"candidates": {"default": [1e-3, 1e-2]}, "seeds": [0]},
                  overrides=[{"where": {"method": "hybrid", "task": "rte-cls"}, "set": {"fail": {"always": True}}}])
    bench = parse_bench(data)
    run_bench(bench, progress=False)
    store = ResultStore(bench.output_dir)
    never = expand_grid(bench, {("tiny", "sst2-cls", "lora"): {"lr": 1e-3}})[0]
    killed = [r for r in expand_grid(bench, {("tiny", "sst2-cls", "lora"): {"lr": 1e-3}}) if r.seed == 1][0]
    assert store.states()[never.key].status == "ok"
    # Drop two final runs from the log: one never started, one killed while running.
    kept = [r for r in store.records() if r["key"] not in (never.key, killed.key)]
    (bench.output_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    store.append({"key": killed.key, "status": "running", "attempt": 1})

    progress = grid_progress(bench, store.records())
    cells = {c.cell: c for c in progress.cells}
    assert (progress.done, progress.total) == (3 * 2 + 3 * 2 - 2, 4 * 2 + 4 * 2)
    rte_hybrid = cells[("tiny", "rte-cls", "hybrid")]
    assert (rte_hybrid.search_done, rte_hybrid.final_total, rte_hybrid.waiting_for_search) == (0, 2, 2)
    assert rte_hybrid.failed == ["hybrid@1e-3/seed0 (failed, 1 attempt)", "hybrid@1e-2/seed0 (failed, 1 attempt)"]
    assert cells[("tiny", "sst2-cls", "lora")].not_started == ["lora/seed0"]
    assert cells[("tiny", "sst2-cls", "lora")].failed == ["lora/seed1 (running, or killed while running)"]
    assert cells[("tiny", "rte-cls", "lora")].complete

    write_report(bench.output_dir, tmp_path / "r", bench=bench)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "**Partial:** 10 of the 16 runs the benchmark asks for have finished (lr search 6 of 8, final runs 4 of 8)" in md
    assert "| tiny/rte-cls/hybrid | 0 of 2 | 0 of 2 | 2 final run(s) wait for the lr search; not finished: " \
           "hybrid@1e-3/seed0 (failed, 1 attempt), hybrid@1e-2/seed0 (failed, 1 attempt) |" in md
    assert "tiny/rte-cls/lora |" not in md.split("## Grid progress")[1].split("##")[0]

    other = parse_bench(dict(data, seeds=[0], output=str(tmp_path / "other"),
                             overrides=[], shared={**data["shared"], "train": {**data["shared"]["train"], "max_steps": 7}}))
    run_bench(other, progress=False)
    write_report(other.output_dir, tmp_path / "r2", bench=other)
    assert "**Complete:** all 12 runs the benchmark asks for have finished (lr search 8 of 8, final runs 4 of 4)." in \
        (tmp_path / "r2" / "report.md").read_text()
    write_report(other.output_dir, tmp_path / "r3", bench=bench)  # the store of another configuration
    md = (tmp_path / "r3" / "report.md").read_text()
    assert "**Partial:** 0 of the 16 runs" in md and "12 finished run(s) in the store are not runs of this benchmark" in md


def test_stored_series_keep_float32_digits_and_metrics_every_digit(tmp_path):
    """Per-step curves at float64's 17 digits made a 123-run store pass 2 MiB."""
    store = ResultStore(tmp_path / "store")
    store.append({"key": "k", "status": "ok", "metrics": {"accuracy": 0.123456789012345},
                  "curves": {"train": [{"step": 3, "loss": 0.6931471805599453, "grad_norm": float("nan")}]},
                  "lambda_history": {"layers": ["a"], "steps": [1], "values": [[0.5000000123456]]}})
    stored = store.records()[0]
    assert stored["metrics"]["accuracy"] == 0.123456789012345
    train = stored["curves"]["train"][0]
    assert train["step"] == 3 and train["loss"] == 0.6931472 and math.isnan(train["grad_norm"])
    assert stored["lambda_history"] == {"layers": ["a"], "steps": [1], "values": [[0.5]]}
