"""Training loop: exact kill-and-resume, NaN handling, checkpoints, data order, config validation.

Runs use a tiny random-init Llama (hidden 32) with a character tokenizer, saved
to a temp dir, and the synthetic ``arith`` task; no download, seconds per run.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from hybridpeft.adapters.config import known_methods
from hybridpeft.tasks import get_task
from hybridpeft.tasks.synthetic import _bucket, extract_int
from hybridpeft.train import ConfigError, TrainingAborted, load_config, train
from hybridpeft.train import checkpoint as ckpt
from hybridpeft.train.batches import BatchStream, epoch_permutation
from hybridpeft.train.presets import default_job
from hybridpeft.train.seeding import rng_state, seed_everything, set_rng_state
from hybridpeft.train.setup import lr_lambda
from tiny_models import char_tokenizer, save_tiny_causal_lm, smoke_overrides

REPO = Path(__file__).resolve().parents[1]
LOGGED = ("step", "epoch", "data_index", "loss", "lr", "grad_norm")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "hybridpeft.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "default"}


def _steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _train_args(model: Path, run_dir: Path, steps: int, extra: list[str] = ()) -> list[str]:
    sets = smoke_overrides(model, run_dir, steps) + [
        "adapter.method=lora", "adapter.lora.dropout=0.1",  # dropout: RNG state must survive the resume
        "train.grad_accum=2", "eval.before=false", "eval.after=false", *extra,
    ]
    return ["train", *[a for s in sets for a in ("--set", s)]]


def test_kill_and_resume_matches_uninterrupted_run(tiny_model, tmp_path):
    steps = 12
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    ref = subprocess.run(_cli(_train_args(tiny_model, ref_dir, steps)), env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    # Same job, slowed down so the kill lands mid-training; SIGKILL once checkpoint 4 is complete.
    proc = subprocess.Popen(_cli(_train_args(tiny_model, crash_dir, steps, ["debug.step_sleep_s=0.5"])),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = crash_dir / "checkpoints" / "step-000004" / ckpt.MARKER
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (crash_dir / "adapter").exists()
    killed_at = _steps(crash_dir)[-1]["step"]
    assert 4 <= killed_at < steps

    # Corrupt the newest checkpoint: resuming must skip it (warning names it) and use an older one.
    newest = ckpt.list_checkpoints(crash_dir / "checkpoints")[0][1]
    state_file = newest / ckpt.TRAINER_STATE
    state_file.write_bytes(state_file.read_bytes()[:100])
    resumed = subprocess.run(_cli(_train_args(tiny_model, crash_dir, steps) + ["--resume"]), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping corrupt or partial checkpoint" in resumed.stderr and newest.name in resumed.stderr
    assert "resumed from" in resumed.stderr

    a, b = _steps(ref_dir), _steps(crash_dir)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert [{k: r[k] for k in LOGGED} for r in a] == [{k: r[k] for k in LOGGED} for r in b]  # bit-exact
    wa, wb = load_file(str(ref_dir / "adapter" / "adapter.safetensors")), load_file(str(crash_dir / "adapter" / "adapter.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in wa.items() if "lora_B" in k)  # it trained


def _job(model: Path, run_dir: Path, steps: int, extra: list[str] = ()):
    return load_config(overrides=smoke_overrides(model, run_dir, steps) + [
        "adapter.method=lora", "eval.before=false", "eval.after=false", "eval.every=0", *extra])


def test_nan_step_is_skipped_without_update(tiny_model, tmp_path):
    job = _job(tiny_model, tmp_path / "a", 3, ["train.save_every=1", "debug.nan_loss_at_steps=[3]"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(job)
    assert result.step == 3 and result.skipped_steps == 1
    records = {r["step"]: r for r in _steps(result.run_dir)}
    assert records[3].get("skipped") is True and records[3]["loss"] == "nan"
    two = load_file(str(result.run_dir / "checkpoints" / "step-000002" / "adapter" / "adapter.safetensors"))
    final = load_file(str(result.adapter_dir / "adapter.safetensors"))
    assert all(torch.equal(two[k], final[k]) for k in two)  # the NaN step changed nothing

    job = _job(tiny_model, tmp_path / "b", 5, ["debug.nan_loss_at_steps=[2]"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(job)
    records = _steps(result.run_dir)
    assert [bool(r.get("skipped")) for r in records] == [False, True, False, False, False]
    assert all(math.isfinite(r["loss"]) for r in records if not r.get("skipped"))
    assert records[-1]["skipped_total"] == 1


def test_consecutive_nans_abort_and_keep_last_good_checkpoint(tiny_model, tmp_path):
    job = _job(tiny_model, tmp_path / "run", 10, ["train.nan_abort_after=3", "debug.nan_grad_at_steps=[5, 6, 7]"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainingAborted) as err:
            train(job)
    message = str(err.value)
    assert "3 consecutive steps" in message and "[5, 6, 7]" in message
    # step 4's weights were never tried (step 5 failed on them): step 2 is the last one known good,
    # step 4 is set aside (kept, but not picked by --resume)
    checkpoints = job.run_dir() / "checkpoints"
    assert f"Last good checkpoint: {checkpoints / 'step-000002'}" in message and "step-000004.suspect" in message
    assert [s for s, _ in ckpt.list_checkpoints(checkpoints)] == [2]  # nothing written during the streak
    assert ckpt.verify(checkpoints / "step-000004.suspect") is None
    assert ckpt.load_trainer_state(checkpoints / "step-000004.suspect")["loop"]["step"] == 4


def test_checkpoint_atomicity_and_verification(tmp_path):
    root = tmp_path / "checkpoints"
    tmp = ckpt.prepare_temp(root, 7)
    ckpt.save_tensors({"x": torch.arange(3), "n": 1, "s": "a"}, tmp / ckpt.TRAINER_STATE)
    assert ckpt.list_checkpoints(root) == []  # invisible until sealed
    final = ckpt.finalize(root, 7)
    assert final.name == "step-000007" and ckpt.verify(final) is None
    assert torch.equal(torch.load(final / ckpt.TRAINER_STATE, weights_only=True)["x"], torch.arange(3))
    # a partial write (staging dir) and a step dir without marker are both skipped, by name
    ckpt.prepare_temp(root, 9)
    (root / "step-000008").mkdir()
    with pytest.warns(UserWarning) as caught:
        assert ckpt.latest_valid(root) == final
    text = " ".join(str(w.message) for w in caught)
    assert ".tmp-step-000009" in text and "step-000008" in text and "no COMPLETE marker" in text
    # flipping a byte is caught by the hash, truncation by the size
    data = bytearray((final / ckpt.TRAINER_STATE).read_bytes())
    data[-5] ^= 0xFF
    (final / ckpt.TRAINER_STATE).write_bytes(bytes(data))
    assert "sha256" in ckpt.verify(final)


def test_rng_state_roundtrip_is_weights_only_loadable(tmp_path):
    seed_everything(3)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    seed_everything(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[0] == got[0] and expected[1] == got[1] and torch.equal(expected[2], got[2])


def test_batch_order_is_seeded_sharded_and_resumable():
    task = get_task("arith")
    examples = task.load("train", limit=40)

    class Tok:  # records which examples were encoded, no real tokenization needed
        pass

    def stream(rank=0, world=1):
        s = BatchStream(task, Tok(), examples, batch_size=3, seed=5, rank=rank, world_size=world)
        s.task = type("T", (), {"encode": staticmethod(lambda tok, exs, n: [e.prompt for e in exs])})()
        return s

    s = stream()
    full = [s.next() for _ in range(30)]  # crosses epoch boundaries (13 batches per epoch)
    assert s.position.epoch == 2
    other = stream()
    other.seek(1, 4)
    assert other.next() == full[13 + 4]
    assert epoch_permutation(40, 5, 0) != epoch_permutation(40, 5, 1)
    # ranks split each global batch into disjoint parts, in rank order
    r0, r1 = stream(0, 2), stream(1, 2)
    for _ in range(6):
        a, b = r0.next(), r1.next()
        assert not set(a) & set(b)
    assert r0.batches_per_epoch == 40 // 6
    with pytest.raises(ValueError, match="fewer than one global micro-batch"):
        BatchStream(task, Tok(), examples[:5], batch_size=3, seed=0, world_size=2)


def test_lr_schedule_shapes():
    f = lr_lambda("cosine", warmup=4, total=14, min_ratio=0.1)
    assert [f(k) for k in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == pytest.approx(1.0) and f(14) == pytest.approx(0.1) and f(9) == pytest.approx(0.55)
    g = lr_lambda("linear", warmup=0, total=10, min_ratio=0.0)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(20) == 0.0
    assert lr_lambda("constant", 0, 10, 0.0)(7) == 1.0


def test_validation_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[
            "train.lr=-1", "train.batch_size=0", "data.task=nope", "model.dtype=int8", "train.lrr=1",
            "adapter.method=lora", "adapter.lora.r=0", "adapter.lora.dropout=2", "adapter.boft.nonsense=1",
            "eval.every=-3", "bogus.key=1", "train.mixed_precision=fp8",
        ])
    text = str(err.value)
    for expected in ["train.lr=-1", "train.batch_size=0", "data.task='nope'", "model.dtype='int8'", "train.lrr=1",
                     "adapter.lora.r=0", "adapter.lora.dropout=2.0", "adapter.boft.nonsense=1", "eval.every=-3", "bogus=",
                     "train.mixed_precision='fp8'"]:
        assert expected in text, (expected, text)
    assert len(err.value.errors) == 11  # one line per problem, no duplicates


def test_adapter_section_switches_methods():
    job = load_config(data={"adapter": {"method": "lora", "lora": {"r": 4}, "target_modules": ["q_proj"]}})
    assert job.adapter.method == "lora" and job.adapter.r == 4 and job.adapter.target_modules == ["q_proj"]
    flat = load_config(data={"adapter": {"method": "lora", "r": 2}}, overrides=["train.lr=2e-4"])
    assert flat.adapter.r == 2 and flat.train.lr == 2e-4
    with pytest.raises(ConfigError, match=r"adapter\.r=2 is invalid: expected a field of method 'full'"):
        load_config(data={"adapter": {"method": "full", "r": 2}})


def test_default_yaml_matches_embedded_preset():
    from_file = load_config(REPO / "configs" / "default.yaml")
    embedded = load_config(data=default_job())
    assert from_file.to_dict() == embedded.to_dict()
    assert yaml.safe_load((REPO / "configs" / "default.yaml").read_text()) == default_job()
    assert embedded.method == "hybrid" and embedded.data.task == "arith"
    assert embedded.model_name("causal") == "smollm2-135m" and embedded.model_name("classification") == "minilm-l6"


def test_arith_task_is_deterministic_with_disjoint_splits():
    task = get_task("arith")
    train1, train2 = task.load("train", limit=300, seed=1), task.load("train", limit=300, seed=1)
    assert [e.prompt for e in train1] == [e.prompt for e in train2]
    assert [e.prompt for e in task.load("train", limit=300, seed=2)] != [e.prompt for e in train1]
    test = task.load("test", limit=100)
    assert all(_bucket(_key(e)) == 0 for e in test) and all(_bucket(_key(e)) >= 2 for e in train1)
    assert all(e.meta["answer"] == extract_int(e.target) for e in train1)
    assert extract_int(" 42 apples") == 42 and extract_int("minus -3") == -3 and extract_int("none") is None
    assert extract_int("\n 7 + 5 = 12\nQuestion: 3") == 12 and extract_int("") is None
    with pytest.raises(ValueError, match="split='dev'"):
        task.load("dev")


def _key(example) -> tuple:
    """Recover the content key from the prompt's numbers (the template fixes their order)."""
    nums = [int(n) for n in __import__("re").findall(r"\d+", example.prompt)]
    text = example.prompt
    op = "mul" if "boxes" in text else "sub" if "gives" in text else "two" if "loses" in text else "add"
    return (op, *nums)


def test_run_dir_records_config_versions_and_seed(tiny_model, tmp_path):
    job = _job(tiny_model, tmp_path / "run", 2, ["train.seed=7"])
    train(job)
    run = job.run_dir()
    meta = json.loads((run / "run.json").read_text())
    assert meta["seed"] == 7 and meta["versions"]["torch"] == torch.__version__ and "transformers" in meta["versions"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 7
    assert load_config(run / "config.yaml").to_dict() == job.to_dict()  # the recorded config reruns the job
    record = _steps(run)[0]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"} <= set(record)
    assert math.isfinite(record["loss"]) and record["tokens_per_s"] > 0
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(job)  # a second fresh start must not clobber the run


def test_gradient_checkpointing_gives_the_same_losses(tiny_model, tmp_path):
    plain = train(_job(tiny_model, tmp_path / "plain", 3))
    checkpointed = train(_job(tiny_model, tmp_path / "gc", 3, ["model.gradient_checkpointing=true"]))
    a, b = _steps(plain.run_dir), _steps(checkpointed.run_dir)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)


def test_early_stopping_keeps_the_best_adapter(tiny_model, tmp_path):
    # min_delta so large that nothing after the first validation counts as an improvement
    job = _job(tiny_model, tmp_path / "run", 20, ["eval.every=2", "eval.early_stopping_patience=2",
                                                  "eval.early_stopping_min_delta=1e9"])
    result = train(job)
    assert result.stop_reason == "early_stopping" and result.step == 6
    evals = [json.loads(line) for line in (result.run_dir / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4, 6]
    best = load_file(str(result.run_dir / "best_adapter" / "adapter.safetensors"))
    final = load_file(str(result.adapter_dir / "adapter.safetensors"))
    at_two = load_file(str(result.run_dir / "checkpoints" / "step-000006" / "adapter" / "adapter.safetensors"))
    assert all(torch.equal(best[k], final[k]) for k in best)  # the run ends on the best weights (step 2) ...
    assert not all(torch.equal(best[k], at_two[k]) for k in best)  # ... not on the last ones


def test_epochs_budget_sets_the_step_count(tiny_model, tmp_path):
    job = _job(tiny_model, tmp_path / "run", 1, ["train.max_steps=null", "train.epochs=0.5", "train.save_every=0"])
    result = train(job)
    assert result.step == 6  # 48 examples / batch 4 = 12 batches per epoch; half an epoch
    assert [s for s, _ in ckpt.list_checkpoints(result.run_dir / "checkpoints")] == [6]  # only the final one


class _FixedAnswerLM(torch.nn.Module):
    """Continues every prompt with the same text; enough to check arith's scoring."""

    def __init__(self, tokenizer, text: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        tail = torch.tensor(self.ids[:max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


@pytest.mark.parametrize("text", [" 12 apples", "\n12\nQuestion 5", " 7 + 5 = 12\n"])
def test_arith_scores_exact_match_of_the_first_number(text):

    task = get_task("arith")
    examples = task.load("test", limit=200)
    hits = sum(e.meta["answer"] == 12 for e in examples)
    assert 0 < hits < len(examples)
    scores = task.evaluate(_FixedAnswerLM(char_tokenizer(), text), char_tokenizer(), examples, batch_size=64)
    assert scores["exact_match"] == pytest.approx(hits / len(examples)) and scores["n"] == len(examples)


RESUME_CASES = [
    ("lora", ["adapter.lora.dropout=0.1"]), ("lora_ga", []), ("boft", []), ("hybrid", []), ("full", []),
    ("dora", ["adapter.dora.dropout=0.1"]), ("ia3", []),
    ("unitary", ["adapter.unitary.parameterization=structured"]),
    ("unitary", ["adapter.unitary.parameterization=full", "adapter.unitary.block_size=8"]),
]


@pytest.mark.parametrize("method,extra", [c for c in RESUME_CASES if c[0] in known_methods()],
                         ids=lambda c: c if isinstance(c, str) else "-".join(x.split("=")[1] for x in c))
def test_every_method_resumes_exactly_in_process(method, extra, tiny_model, tmp_path):
    """An in-process crash after step 4 and a resume reproduce an uninterrupted run bit for bit."""
    from hybridpeft.train import SimulatedCrash

    common = [f"adapter.method={method}", "adapter.boft.block_size=4", "adapter.boft.n_factors=2",
              "train.grad_accum=2", *extra]
    ref = train(_job(tiny_model, tmp_path / "ref", 6, common))
    crashed = _job(tiny_model, tmp_path / "crash", 6, common + ["debug.crash_after_step=4"])
    with pytest.raises(SimulatedCrash):
        train(crashed)
    resumed = train(_job(tiny_model, tmp_path / "crash", 6, common), resume=True)
    assert resumed.step == 6
    a, b = _steps(ref.run_dir), _steps(resumed.run_dir)
    assert [{k: r[k] for k in LOGGED} for r in a] == [{k: r[k] for k in LOGGED} for r in b]
    if method == "hybrid":
        assert [r["mixing"] for r in a] == [r["mixing"] for r in b]
    wa, wb = load_file(str(ref.adapter_dir / "adapter.safetensors")), load_file(str(resumed.adapter_dir / "adapter.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tensorboard_gets_scalars_and_lambda(tmp_path, monkeypatch):
    import types

    from hybridpeft.train.records import RunLog

    scalars = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir, self.purge_step = log_dir, purge_step

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append(("closed", None, None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    (tmp_path / "train_log.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "loss"')  # cut by a crash
    log = RunLog(tmp_path, enabled=True, tensorboard=True, resume_step=2)
    assert [json.loads(x)["step"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert log.writer.purge_step == 2
    log.step({"step": 3, "loss": 1.5, "lr": 0.1, "grad_norm": float("nan"), "mixing": {"layer.0": {"lambda": 0.4}}})
    log.eval({"step": 3, "val_loss": 2.0})
    log.close()
    assert ("train/loss", 1.5, 3) in scalars and ("lambda/layer.0", 0.4, 3) in scalars and ("eval/val_loss", 2.0, 3) in scalars
    assert not any(tag == "train/grad_norm" for tag, _, _ in scalars)  # non-finite values are not plotted
    assert json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[-1])["grad_norm"] == "nan"


@pytest.mark.skipif("hybrid" not in known_methods(), reason="no hybrid method")
def test_hybrid_anneal_schedule_spans_the_run(tiny_model, tmp_path):
    """``anneal`` without explicit length gets the run's step count from the loop."""
    result = train(_job(tiny_model, tmp_path / "run", 4, ["adapter.method=hybrid", "adapter.hybrid.schedule=anneal"]))
    lams = {r["step"]: [v["lambda"] for v in r["mixing"].values()] for r in _steps(result.run_dir)}
    assert lams[2] == pytest.approx([0.5] * 4) and lams[4] == pytest.approx([0.25] * 4)  # 0.75 → 0.25 over 4 steps


_DATA = REPO.parent / "shared" / "data"


@pytest.mark.skipif(not _DATA.is_dir(), reason="../shared/data is not present")
@pytest.mark.parametrize("train_split", [None, "dev[:30%]"])
def test_k_shot_training_set_and_where_its_validation_comes_from(train_split):
    """With k_shot the job trains on exactly the k-shot sample of its training split, whatever that
    split is called, and validates on examples of the same split that are not among the shots."""
    from hybridpeft.train.setup import build_task, describe_splits, load_splits

    data = {"task": "xnli-cls", "task_args": {"k_shot": 32}, "val_limit": 48, "train_split": train_split}
    job = load_config(data={"data": data, "train": {"seed": 3}})
    task = build_task(job)
    train_set, val = load_splits(job, task)
    assert len(train_set) == 32 and sorted(Counter(ex.label for ex in train_set).values()) == [10, 11, 11]
    assert len(val) == 48 and not {ex.meta["line"] for ex in val} & {ex.meta["line"] for ex in train_set}
    pool_lines = {ex.meta["line"] for ex in task.read(train_split or "dev[:50%]", None)}
    assert {ex.meta["line"] for ex in val} <= pool_lines  # from the training split, never the scored half
    info = describe_splits(job, task, len(train_set), len(val))
    split = train_split or "dev[:50%]"
    assert info["train"] == f"32 examples: k_shot=32 per language of split {split!r}"
    assert info["validation"] == f"48 examples from the rest of split {split!r} (disjoint from the k-shot examples)"
    with pytest.raises(ConfigError, match=r"data.train_limit=100 is invalid with data.task_args.k_shot=32"):
        load_config(data={"data": {**data, "train_limit": 100}})
    too_many = load_config(data={"data": {**data, "val_limit": 5000}})
    with pytest.raises(ValueError, match="data.val_limit=5000 is invalid: only"):
        load_splits(too_many, build_task(too_many))
