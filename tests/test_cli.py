"""The ``hybridpeft`` command: help, config errors before any model loads, merge, eval, info."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from hybridpeft import cli
from hybridpeft.adapters.config import known_methods
from hybridpeft.train import load_config, train
from hybridpeft.train.artifacts import load_adapted
from tiny_models import save_tiny_causal_lm, smoke_overrides

MERGE_CASES = [(m, extra) for m, extra in [
    ("lora", []), ("lora_ga", []), ("boft", []), ("hybrid", []), ("full", []), ("dora", []), ("ia3", []),
    ("unitary", ["adapter.unitary.parameterization=structured"]),
    ("unitary", ["adapter.unitary.parameterization=full", "adapter.unitary.block_size=8"]),
] if m in known_methods()]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


def _trained(tiny_model: Path, run_dir: Path, method: str, steps: int = 3, extra: list[str] = ()):
    job = load_config(overrides=smoke_overrides(tiny_model, run_dir, steps) + [
        f"adapter.method={method}", "eval.before=false", "eval.after=false", "eval.every=0",
        "adapter.boft.block_size=4", "adapter.boft.n_factors=2", *extra])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(job)


@pytest.mark.parametrize("command", ["train", "eval", "merge", "info"])
def test_help_describes_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hybridpeft {command}")
    if command == "train":
        assert "--set KEY=VALUE" in out and "--resume" in out and "--print-config" in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == cli.EXIT_CONFIG
    out = capsys.readouterr().out
    for command in ("train", "eval", "merge", "info"):
        assert command in out


def test_print_config_resolves_default_job_with_overrides(capsys):
    assert cli.main(["train", "--print-config", "--method", "lora", "--set", "train.lr=3e-4",
                     "--set", "adapter.lora.r=4"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["adapter"]["method"] == "lora" and resolved["adapter"]["r"] == 4
    assert resolved["train"]["lr"] == 3e-4 and resolved["data"]["task"] == "arith"
    assert resolved["model"]["name"] is None  # chosen by the task's kind: smollm2-135m for arith


def test_bad_config_lists_all_errors_before_loading_a_model(monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before validation finished")

    monkeypatch.setattr("hybridpeft.train.setup.load_model", no_model)
    monkeypatch.setattr("hybridpeft.models.load_causal_lm", no_model)
    code = cli.main(["train", "--set", "train.lr=0", "--set", "train.warmup_steps=-1", "--set", "adapter.method=nope",
                     "--set", "data.max_length=2", "--set", "eval.early_stopping_patience=0", "--set", "oops"])
    assert code == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "--set 'oops' is invalid" in err  # a malformed override is reported before anything else runs
    code = cli.main(["train", "--set", "train.lr=0", "--set", "train.warmup_steps=-1", "--set", "adapter.method=nope",
                     "--set", "data.max_length=2", "--set", "eval.early_stopping_patience=0"])
    assert code == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "5 problems" in err
    for piece in ("train.lr=0.0", "train.warmup_steps=-1", "adapter.method='nope'", "data.max_length=2",
                  "eval.early_stopping_patience=0"):
        assert piece in err, (piece, err)


@pytest.mark.parametrize("method,extra", MERGE_CASES, ids=[f"{m}{'-' + e[0].split('=')[1] if e else ''}" for m, e in MERGE_CASES])
def test_merge_output_loads_with_plain_transformers_and_matches(method, extra, tiny_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    result = _trained(tiny_model, tmp_path / "run", method, extra=extra)
    out = tmp_path / "merged"
    assert cli.main(["merge", str(result.run_dir), str(out)]) == 0
    adapted, tokenizer, _ = load_adapted(result.adapter_dir)
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not any("adapter" in name for name, _ in plain.named_parameters())
    ids = tokenizer(["Question: Tom has 3 apples.", "Answer: 12"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = adapted(**ids).logits
        got = plain(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(**ids).logits
    assert (expected - base).abs().max() > 1e-4  # the adapter does something
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_eval_and_info_read_a_trained_adapter(tiny_model, tmp_path, capsys):
    method = "hybrid" if "hybrid" in known_methods() else "lora"
    result = _trained(tiny_model, tmp_path / "run", method, steps=4, extra=["eval.after=true", "eval.limit=3"])
    capsys.readouterr()
    assert cli.main(["eval", str(result.adapter_dir), "--limit", "5", "--batch-size", "5"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["task"] == "arith" and scores["n"] == 5 and 0.0 <= scores["exact_match"] <= 1.0
    out_dir = result.run_dir / "eval-arith-test"  # beside the adapter, in the run dir
    assert scores["output_dir"] == str(out_dir)
    assert json.loads((out_dir / "metrics.json").read_text())["exact_match"] == scores["exact_match"]
    rows = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5)) and all(r["input"].startswith("Question:") for r in rows)
    assert all(isinstance(r["output"], str) and r["reference"].startswith(" ") for r in rows)
    assert cli.main(["eval", str(result.adapter_dir), "--limit", "2", "--out", str(tmp_path / "mine")]) == 0
    assert len((tmp_path / "mine" / "predictions.jsonl").read_text().splitlines()) == 2
    kept = (result.run_dir / "predictions_after.jsonl").read_text().splitlines()  # the training run keeps its own
    assert len(kept) == 3 and json.loads(kept[0])["input"].startswith("Question:")

    assert cli.main(["info", str(result.adapter_dir)]) == 0
    out = capsys.readouterr().out
    assert f"method: {method}" in out and "adapted layers: 4" in out and "step=4" in out
    if method == "hybrid":
        assert "per-layer mix_lambda" in out
    assert cli.main(["info", str(result.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint step 4: complete" in out and "logged steps: 4" in out
    assert cli.main(["info", str(result.run_dir / "checkpoints" / "step-000004")]) == 0
    assert "status: complete" in capsys.readouterr().out
    assert cli.main(["info", str(tmp_path / "missing")]) == cli.EXIT_ERROR


def test_aborted_training_exits_with_status_3(tiny_model, tmp_path, capsys):
    sets = smoke_overrides(tiny_model, tmp_path / "run", 6) + [
        "adapter.method=lora", "eval.before=false", "eval.after=false", "train.nan_abort_after=2",
        "debug.nan_loss_at_steps=[3, 4]"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(["train", *[a for s in sets for a in ("--set", s)]])
    assert code == cli.EXIT_ABORTED
    assert "2 consecutive steps" in capsys.readouterr().err


@pytest.mark.slow
def test_default_job_runs_end_to_end_on_smollm2(tmp_path, capsys):
    """The embedded default job, shortened: real SmolLM2-135M, the Hybrid, arith (minutes on CPU)."""
    code = cli.main(["train", "--run-dir", str(tmp_path / "run"), "--max-steps", "2", "--set", "eval.limit=4",
                     "--set", "eval.every=1", "--set", "adapter.hybrid.ga_num_batches=1", "--set", "train.progress=false"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 2 and summary["before"]["n"] == 4 and summary["after"]["n"] == 4
    steps = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(steps[-1]["mixing"]) == 60  # λ for q_proj and v_proj of all 30 layers


def test_interrupt_exits_130_and_says_how_to_resume(monkeypatch, capsys):
    """Ctrl-C (or SIGTERM, which the bench runner turns into one) must not end in a traceback."""
    import hybridpeft.bench.commands as commands

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(commands, "bench_command", interrupted)
    assert cli.main(["bench", "benchmarks/quick.yaml"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "rerun the same `bench` command" in err and "Traceback" not in err
