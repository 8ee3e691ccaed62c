"""benchmarks/step_time.py works: a tiny model, one or two steps per method, tables written.

Also the NF4 (bitsandbytes) path on a CUDA device, which skips cleanly without
one or without bitsandbytes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import perf_report  # noqa: E402
import step_time  # noqa: E402
from perf_models import SIZES, build_model  # noqa: E402


def _spec(**kw) -> step_time.RunSpec:
    base = dict(device="cpu", size="tiny", dtype="float32", steps=2, warmup=1, threads=1)
    return step_time.RunSpec(**{**base, **kw})


def test_tiny_run_measures_and_writes_tables(tmp_path):
    methods = ["floor", "full", "lora", "peft-lora", "boft"]
    rows = step_time.run_benchmark(_spec(), methods)
    by = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == methods
    for name in ("floor", "full", "lora", "peft-lora"):
        row = by[name]
        assert row["status"] == "ok", row
        assert row["steps_timed"] == 2 and row["median_s"] > 0 and row["peak_bytes"] >= 0
        assert torch.isfinite(torch.tensor(row["loss_first"]))
    size = SIZES["tiny"]
    # 7 targets per layer; LoRA r=16 has r (d_in + d_out) per target, as PEFT's does.
    assert by["floor"]["tunable_params"] == 0
    assert by["lora"]["tunable_params"] == by["peft-lora"]["tunable_params"] > 0
    assert by["full"]["tunable_params"] == by["full"]["total_params"]
    assert by["lora"]["match"] == by["peft-lora"]["match"] == "lora r16"
    kv = size.hidden // size.heads * size.kv_heads
    per_layer = 16 * ((size.hidden * 2) * 2 + (size.hidden + kv) * 2 + (size.hidden + size.intermediate) * 3)
    assert by["lora"]["tunable_params"] == size.layers * per_layer
    assert by["lora"]["kernels_per_step"] > by["floor"]["kernels_per_step"] > 0

    r = perf_report.ratios(rows)
    assert r["lora"]["peft_pair"] == "peft-lora"
    assert r["lora"]["time_vs_peft"] == pytest.approx(by["lora"]["median_s"] / by["peft-lora"]["median_s"])
    assert r["floor"]["time_vs_floor"] == pytest.approx(1.0)
    assert all(by[name]["cpu_median_s"] > 0 for name in methods)  # CPU seconds, the load-robust reading
    assert r["lora"]["cpu_vs_peft"] == pytest.approx(by["lora"]["cpu_median_s"] / by["peft-lora"]["cpu_median_s"])
    assert r["boft"]["cpu_vs_our_lora"] == pytest.approx(by["boft"]["cpu_median_s"] / by["lora"]["cpu_median_s"])

    meta = {"date": "today", "command": "test", "machine": step_time.machine_description("cpu"),
            "spec": step_time.dataclasses.asdict(_spec()), "tokens_per_step": 32,
            "model": step_time.dataclasses.asdict(size), "isolated_subprocesses": False}
    json_path, md_path = perf_report.write(meta, rows, tmp_path, "cpu-tiny")
    saved = json.loads(json_path.read_text())
    assert {row["method"] for row in saved["results"]} == set(methods)
    table = md_path.read_text()
    assert "| lora | ours |" in table and "× PEFT" in table and "Targets" in table and "CPU × our LoRA" in table


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="nope"):
        step_time.run_benchmark(_spec(), ["nope"])


def test_isolated_subprocess_worker_round_trip():
    """The CPU default runs each method in a fresh subprocess; its result must come back intact."""
    rows = step_time.run_benchmark(_spec(steps=1), ["floor"], isolate=True, method_timeout=300)
    assert rows[0]["status"] == "ok", rows[0]
    assert rows[0]["memory_method"].startswith("VmHWM") or "ru_maxrss" in rows[0]["memory_method"]


def test_rounds_keep_the_quietest_round():
    merged = step_time.merge_rounds([
        {"status": "ok", "times_s": [3.0, 5.0], "median_s": 4.0, "peak_bytes": 5, "cpu_median_s": 0.9},
        {"status": "ok", "times_s": [1.0, 2.0], "median_s": 1.5, "peak_bytes": 7, "cpu_median_s": 1.1},
        {"status": "error", "reason": "x"},
    ])
    assert merged["times_s"] == [1.0, 2.0] and merged["median_s"] == 1.5
    assert merged["peak_bytes"] == 7 and merged["rounds"] == 2 and merged["round_medians_s"] == [4.0, 1.5]
    assert merged["cpu_median_s"] == 0.9  # the lowest round's CPU time, whichever round had the lowest wall time


def test_factored_variants_force_the_butterfly_form():
    """boft-factored / hybrid-factored measure the pre-composed path beside the default in one run."""
    rows = step_time.run_benchmark(_spec(steps=1, size="tiny"), ["boft-factored", "hybrid-factored"])
    for row in rows:
        assert row["status"] == "ok", row
        assert row["butterfly_form"] == "factored"


def test_budget_stops_the_timed_loop_early():
    row = step_time.measure("lora", _spec(steps=50, budget_s=0.0))
    assert row["status"] == "ok" and row["steps_timed"] == 1 and "note_budget" in row


def test_cli_writes_named_outputs(tmp_path):
    assert step_time.main(["--device", "cpu", "--size", "tiny", "--steps", "1", "--warmup", "0", "--no-isolate",
                           "--methods", "floor", "lora", "--out", str(tmp_path), "--tag", "t"]) == 0
    assert (tmp_path / "cpu-tiny-float32-t.md").is_file() and (tmp_path / "cpu-tiny-float32-t.json").is_file()


def test_peft_boft_effective_factors_are_reported():
    """Without its CUDA extension PEFT runs BOFT with m=1; the row must say so and pair accordingly."""
    rows = step_time.run_benchmark(_spec(steps=1), ["boft-m1", "peft-boft"])
    by = {r["method"]: r for r in rows}
    if by["peft-boft"]["status"] != "ok":
        pytest.skip(f"PEFT BOFT unavailable: {by['peft-boft'].get('reason')}")
    if torch.cuda.is_available():
        pytest.skip("with CUDA, PEFT may have built its extension")
    assert by["peft-boft"]["match"] == "boft b8 m1" == by["boft-m1"]["match"]
    assert "note_effective" in by["peft-boft"]
    assert perf_report.ratios(rows)["boft-m1"]["peft_pair"] == "peft-boft"


def test_dora_and_ia3_rows_pair_with_pefts():
    """step_time's DoRA / IA³ rows: same tunable parameters as PEFT's at equal settings, paired for the ratio."""
    rows = step_time.run_benchmark(_spec(steps=1), ["dora", "peft-dora", "ia3", "peft-ia3"])
    by = {r["method"]: r for r in rows}
    for name in by:
        assert by[name]["status"] == "ok", by[name]
    size = SIZES["tiny"]
    kv = size.hidden // size.heads * size.kv_heads
    outputs = (size.hidden * 2 + kv * 2 + size.intermediate * 2) * size.layers  # q o, k v, gate up; down scales its input
    assert by["ia3"]["tunable_params"] == by["peft-ia3"]["tunable_params"] == outputs + size.intermediate * size.layers
    assert by["dora"]["tunable_params"] == by["peft-dora"]["tunable_params"]
    r = perf_report.ratios(rows)
    assert r["dora"]["peft_pair"] == "peft-dora" and r["ia3"]["peft_pair"] == "peft-ia3"


def test_nf4_base_on_gpu():
    """NF4 base weights (bitsandbytes): PEFT LoRA and each of our methods train on them
    (the CPU side of this is tests/test_nf4.py)."""
    pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("NF4 benchmark path is checked on a CUDA device")
    spec = _spec(device="cuda", dtype="bfloat16", quant="nf4", steps=1, threads=None)
    rows = step_time.run_benchmark(spec, ["peft-lora", "lora", "boft", "unitary", "hybrid"])
    for row in rows:
        assert row["status"] == "ok", row
        assert row["quantized_layers"] == 7 * SIZES["tiny"].layers
        assert torch.isfinite(torch.tensor(row["loss_last"]))


def test_model_sizes_match_llama_configs():
    """The GPU shapes are Llama-3.2-1B and Llama-3.1-8B (parameter counts 1.24 B and 8.03 B)."""
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in build_model(SIZES[name], "meta", torch.bfloat16, 0).parameters())
                  for name in ("1b", "8b")}
    assert counts["1b"] == pytest.approx(1.236e9, rel=0.01)
    assert counts["8b"] == pytest.approx(8.03e9, rel=0.01)


def test_op_counter_separates_kernels_from_views():
    from op_counts import OpCounter

    a, b = torch.randn(3, 4), torch.randn(4, 5)
    with OpCounter() as counter:
        torch.mm(a, b).t().unsqueeze(0)
    assert counter.kernels == {"mm": 1} and sum(counter.views.values()) == 2


def test_per_module_counts_and_saved_activations():
    """LoRA keeps only (N, r) for backward beyond its input; a frozen layer keeps nothing per token."""
    import op_counts

    x = torch.randn(2, 8, 32, requires_grad=True)
    lora, after = op_counts.MODULES["lora"](32)
    row = op_counts.count_passes(lora, after, x)
    assert row["saved_bytes_per_token"] == 16 * 4  # r = 16 float32 values per token
    assert row["forward"]["kernels"] >= 3 and row["backward"]["kernels"] >= 3
    frozen, after = op_counts.MODULES["frozen linear"](32)
    assert op_counts.count_passes(frozen, after, x)["saved_bytes_per_token"] == 0


def test_target_lines_survive_a_zero_memory_reading():
    """On a tiny model the RSS meter can read 0 for LoRA's peak; the target line must say 'not measured',
    not crash or claim a ratio."""
    def row(method, family, median_s, peak_bytes):
        return {"method": method, "family": family, "status": "ok", "median_s": median_s,
                "peak_bytes": peak_bytes, "match": None}
    rows = [row("floor", "reference", 1.0, 100), row("lora", "ours", 2.0, 0), row("boft", "ours", 3.0, 50)]
    lines = perf_report.target_checks(rows)
    boft_line = next(line for line in lines if line.startswith("boft"))
    assert "time 1.50× — MISSED" in boft_line and "memory not measured" in boft_line
    rows[1]["peak_bytes"] = 100
    boft_line = next(line for line in perf_report.target_checks(rows) if line.startswith("boft"))
    assert "memory 0.50× — met" in boft_line


@pytest.mark.parametrize("script, args, stem", [
    ("butterfly_forms", ["--d", "128", "--tokens", "16", "--reps", "1", "--settings", "8x3", "4x6", "8x1"],
     "butterfly-forms"),
    ("lora_forms", ["--tokens", "16", "--reps", "1", "--tag", "t"], "lora-forms-t"),
])
def test_form_benchmarks_take_device_and_dtype(tmp_path, script, args, stem):
    """The per-module form benchmarks that gpu_check.sh runs on CUDA in bf16: same flags, tables written."""
    import importlib

    main = importlib.import_module(script).main
    assert main(args + ["--device", "cpu", "--dtype", "bfloat16", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert data["meta"]["dtype"] == "bfloat16" and data["meta"]["device"] == "cpu"
    assert (tmp_path / f"{stem}.md").read_text().count("\n| ") >= 3
    if script == "butterfly_forms":  # only the settings asked for, each with its rule
        assert [(r["b"], r["m"], r["rule"]) for r in data["rows"]] == [(8, 3, "composed"), (4, 6, "factored"),
                                                                         (8, 1, "composed")]
