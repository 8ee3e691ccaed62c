"""Sharded training with FSDP2 (``fully_shard``) on two CPU processes (gloo), every method.

Library level (``tests/fsdp_worker.py``, float64 tiny Llama): 5 optimizer steps sharded over 2
ranks against the same steps in one process on the whole global batch; λ on every rank; the
saved adapter loaded into an unsharded model; ``merge_and_unload`` of the sharded model; the
LoRA-GA start; the bytes each rank holds. Command line: an FSDP ``accelerate launch`` with
``examples/accelerate/fsdp.yaml``, killed and resumed; bad settings refused before training.

Tolerance between the sharded and the single-process run (``TOL``, relative to the largest
magnitude): both compute the same float64 sums, FSDP in another order (each rank's mean, then
a reduce-scatter averaging the ranks; a gradient norm from per-shard partial sums). Each
reordering changes a sum by a few ulps (1e-16 relative) and 5 AdamW steps do not amplify that
beyond a few hundred ulps; measured: ≤ 3e-16 on losses and logits. 1e-12 leaves room for other
CPUs while any real fault (a rank's piece lost or counted twice, a per-rank λ) shows at ≥ 1e-4.

The Hybrid runs in the default suite; the other methods with ``pytest -m slow`` (one
launch of the worker covers all of them, ~20 s; each command-line launch ~10-20 s).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fsdp_worker as worker
import hybridpeft as hp
from hybridpeft import distributed
from hybridpeft.fsdp import block_classes
from hybridpeft.train import ConfigError, load_config, train
from hybridpeft.train import checkpoint as ckpt
from hybridpeft.train.lock import read_holder
from hybridpeft.train.parallel import accelerate_fsdp_settings
from tiny_models import save_tiny_causal_lm, smoke_overrides

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-12
FAST = ("hybrid", "lora_ga-sketch")  # in the default suite, launched together; the rest with -m slow
METHODS = [pytest.param(m, marks=() if m in FAST else pytest.mark.slow) for m in worker.CONFIGS]
LORA_GA_METHODS = [pytest.param(m, marks=() if m in FAST else pytest.mark.slow)
                   for m in ("lora_ga", "lora_ga-sketch", "hybrid")]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-300))


# ---------------------------------------------------------------- library level: worker vs one process

_LAUNCHED: dict[str, Path] = {}


@pytest.fixture(scope="module")
def worker_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp-worker")


def _launch_worker(root: Path, methods: list[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "fsdp_worker.py"), str(root), *methods]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    _LAUNCHED.update({m: root / m for m in methods})


@pytest.fixture
def sharded(worker_root):
    """``sharded(method)``: the worker's output dir for ``method`` (the default suite's methods in one
    launch, or every other method in one launch the first time one of them is asked for)."""
    def get(method: str) -> Path:
        if method not in _LAUNCHED:
            group = [m for m in worker.CONFIGS if (m in FAST) == (method in FAST)]
            todo = [m for m in group if m not in _LAUNCHED]
            _launch_worker(worker_root, todo)
        return _LAUNCHED[method]
    return get


def _records(out: Path) -> tuple[dict, dict]:
    return json.loads((out / "rank0.json").read_text()), json.loads((out / "rank1.json").read_text())


_REFERENCES: dict[str, tuple] = {}


def _reference(method: str, out: Path):
    """The one-process run, started from the sharded run's LoRA-GA factors where it has some: the
    estimate is accumulated in float32 (by design), so its start differs from the sharded one's
    at float32 rounding (tested separately); training is then compared at float64 precision."""
    if method not in _REFERENCES:
        start = load_file(str(out / "start.safetensors")) if (out / "start.safetensors").exists() else None
        _REFERENCES[method] = worker.run(method, 0, 1, shard=False, start=start)
    return _REFERENCES[method]


@pytest.mark.parametrize("method", METHODS)
def test_sharded_steps_match_one_process(method, sharded):
    out = sharded(method)
    rank0, rank1 = _records(out)
    trained, reference, _ = _reference(method, out)
    assert len(rank0["loss"]) == worker.STEPS
    assert rank0["loss"] == rank1["loss"]  # the all-reduced loss: one value on both ranks
    assert _rel(torch.tensor(rank0["loss"]), torch.tensor(reference["loss"])) <= TOL
    with torch.no_grad():  # and training moved the model: the comparison is not between two idle runs
        before = worker.adapted(method).eval()(input_ids=worker.probe()).logits
        after = trained.eval()(input_ids=worker.probe()).logits
    assert _rel(after, before) > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_lambda_is_the_same_on_every_rank(method, sharded):
    out = sharded(method)
    rank0, rank1 = _records(out)
    assert rank0["lambda"] == rank1["lambda"]  # bit for bit, every layer, every step
    if method == "hybrid":
        _, reference, _ = _reference(method, out)
        ours = torch.tensor([list(step.values()) for step in rank0["lambda"]])  # (steps, layers, [λ, g_L, g_B])
        theirs = torch.tensor([list(step.values()) for step in reference["lambda"]])
        assert ours.shape == (worker.STEPS, 6, 3) and (ours[..., 0] != 0.6).any()  # λ moved from lam_init
        assert _rel(ours[..., 0], theirs[..., 0]) <= TOL
        # the branch norms are those of the whole gradients (λ's rule alone would not show a
        # common factor such as 1/√world: it depends only on their ratio)
        for k in (1, 2):
            assert _rel(ours[..., k], theirs[..., k]) <= TOL
    if method == "unitary-full":  # forced repairs: decided from the drift maxed over ranks
        assert rank0["repairs"] == rank1["repairs"] == [worker.STEPS] * 6


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_reproduces_the_one_process_model(method, sharded):
    out = sharded(method)
    reference_model, _, _ = _reference(method, out)
    with torch.no_grad():
        expected = reference_model.eval()(input_ids=worker.probe()).logits
        probe = load_file(str(out / "probe.safetensors"))
        assert _rel(probe["sharded"], expected) <= TOL  # the sharded model itself
        if method != "full":  # written once, whole tensors, by rank 0; loads into an unsharded base
            loaded = hp.load_adapter(worker.base_model(), out / "adapter").eval()
            assert _rel(loaded(input_ids=worker.probe()).logits, expected) <= TOL


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unload_gathers_a_plain_model(method, sharded):
    out = sharded(method)
    reference_model, _, _ = _reference(method, out)
    assert _records(out)[0]["plain_is_unsharded"]
    merged_reference = hp.merge_and_unload(reference_model).eval()
    with torch.no_grad():
        expected = merged_reference(input_ids=worker.probe()).logits
    assert _rel(load_file(str(out / "probe.safetensors"))["merged"], expected) <= TOL


@pytest.mark.parametrize("method", LORA_GA_METHODS)
def test_lora_ga_start_matches_one_process(method, sharded):
    """Principal angles between the sharded and the one-process start subspaces ≈ 0.

    Bound 1e-4 rad: the estimate is accumulated in float32 (rounding 6e-8 relative, the
    ranks' sums in another order), and the singular subspaces move by about that over the
    spectral gap of these tiny gradients; measured ≤ 6e-7 rad. An unsynchronized start (each
    rank its own random SVD draw) or a missing all-reduce shows at ≥ 1e-2 rad.

    ``lora_ga-sketch``: sharded weights send the sketch down the activation path
    (``gᵀ(xΩ)``, ``(Ψgᵀ)x`` on the gathered weights' layers) and the ranks' sketches are summed
    in one all-reduce; the sketch is linear, so its start equals the one-process sketch's start
    on the global batches (same seed) up to the same float32 rounding.
    """
    out = sharded(method)
    ours = load_file(str(out / "start.safetensors"))
    single = worker.adapted(method)
    torch.manual_seed(2)  # the randomized SVD draws what the sharded run's rank 0 drew
    theirs = hp.lora_ga_init(single, [worker.global_batch(-1 - i) for i in range(2)], loss_fn=worker.lm_loss)
    from hybridpeft.gradient_init import lora_ga_targets

    targets = lora_ga_targets(single)
    assert len(targets) == 6
    for name, (_, part) in targets.items():
        # every rank kept its rows of one start: the gathered trainable factors are the frozen copies
        assert torch.equal(ours[f"{name}.A"], ours[f"{name}.A0"]) and torch.equal(ours[f"{name}.B"], ours[f"{name}.B0"])
        if method == "lora_ga-sketch":  # never a dense estimate: the start's singular triplets
            assert not isinstance(theirs[name], torch.Tensor)
            assert theirs[name].s.numel() == part.ga_config.rank_needed() == 4
        theirs_grad = theirs[name] if isinstance(theirs[name], torch.Tensor) else theirs[name].dense()
        assert _rel(ours[f"{name}.grad"].float(), theirs_grad) <= 1e-5  # float32 sums in another order
        for key, mine, single_start in ((f"{name}.A0", ours[f"{name}.A0"].t(), part.lora_A0.t()),
                                        (f"{name}.B0", ours[f"{name}.B0"], part.lora_B0)):
            q1, _ = torch.linalg.qr(mine.double())
            q2, _ = torch.linalg.qr(single_start.double())
            angles = torch.arccos(torch.linalg.svdvals(q1.t() @ q2).clamp(max=1.0))
            assert angles.max() <= 1e-4, f"{key}: principal angles {angles.tolist()}"
            assert torch.allclose(mine.norm(dim=0), single_start.double().norm(dim=0), rtol=1e-5)  # same scale


def test_head_warmup_of_a_sharded_classifier_matches_one_process(worker_root):
    """``train.head_warmup_steps`` under FSDP2: the head's gradient is a sharded DTensor that the
    reduce-scatter has averaged; the warm-up used to all-reduce it again and crashed (no sharding
    strategy for ``allreduce_``). Same float64 sums in another order: ``TOL``."""
    _launch_worker(worker_root, ["head-warmup"])
    sharded_head = load_file(str(worker_root / "head-warmup" / "head.safetensors"))["score"]
    initial = worker.classifier().score.weight.detach()
    expected = worker.warm_head(0, 1, shard=False).score.weight.detach()
    assert _rel(expected, initial) > 0.1  # the warm-up moved the head
    assert _rel(sharded_head, expected) <= TOL


@pytest.mark.parametrize("method", METHODS)
def test_each_rank_holds_half_the_base_and_no_frozen_gradient(method, sharded):
    """Parameter bytes per rank ≈ base / world + adapters / world, measured; gradients only for
    trainable pieces (a unit mixing frozen and trainable weights allocates none for the frozen)."""
    out = sharded(method)
    rank0, rank1 = _records(out)
    _, reference, _ = _reference(method, out)
    whole = reference["bytes"]
    for kind in ("frozen", "trainable"):
        assert rank0["bytes"][kind] + rank1["bytes"][kind] == whole[kind]  # every byte on exactly one rank
    for record in (rank0, rank1):
        # dim-0 pieces: at most one row more than half of every tensor
        assert record["bytes"]["frozen"] <= whole["frozen"] / 2 + 4096
        assert record["grad_bytes"] == record["bytes"]["trainable"]  # no gradient for a frozen byte
    assert reference["grad_bytes"] == whole["trainable"]
    if method != "full":
        assert rank0["bytes"]["frozen"] == whole["frozen"] / 2  # this model's dims are all even


# ---------------------------------------------------------------- the command line: accelerate launch + fsdp.yaml


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


def _sets(model: Path, run_dir: Path, method: str, extra: list[str] = ()) -> list[str]:
    sets = smoke_overrides(model, run_dir, steps=4) + [
        f"adapter.method={method}", "train.batch_size=2", "train.save_every=2", "eval.every=2",
        # 5 validation examples in batches of 2: rank 0 scores 3 (2 batches), rank 1 scores 2 (1 batch)
        # and must run a second forward, or the sharded forward would wait for it forever
        "data.val_limit=5", "eval.batch_size=2",
        "eval.limit=3", "debug.save_rank_states=true", *extra,  # the task metric after: on a gathered copy
    ]
    return [a for s in sets for a in ("--set", s)]


def _accelerate(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "examples" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
            "-m", "hybridpeft.cli", *args]


def _steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _digest(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


KILL_METHODS = [pytest.param(m, marks=() if m == "hybrid" else pytest.mark.slow)
                for m in ("lora", "lora_ga", "boft", "unitary", "hybrid", "dora", "ia3", "full")]


def _extra(method: str) -> list[str]:
    return ["adapter.unitary.parameterization=full", "adapter.unitary.block_size=16"] if method == "unitary" else []


_CLI_RUNS: dict[str, Path] = {}


@pytest.fixture
def cli_run(tiny_model, tmp_path_factory):
    """``cli_run(method)``: the dir of an uninterrupted 4-step FSDP run launched with the example
    accelerate config (one launch per method per session)."""
    def get(method: str) -> Path:
        if method not in _CLI_RUNS:
            run_dir = tmp_path_factory.mktemp(f"fsdp-cli-{method}") / "run"
            done = subprocess.run(_accelerate(["train", *_sets(tiny_model, run_dir, method, _extra(method))]),
                                  env=_env(), capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-5000:]
            assert "sharded (FSDP2 over 2 processes" in done.stderr
            results = json.loads((run_dir / "results.json").read_text())
            assert results["before"]["n"] == results["after"]["n"] == 3
            _CLI_RUNS[method] = run_dir
        return _CLI_RUNS[method]
    return get


@pytest.mark.parametrize("method", KILL_METHODS)
def test_accelerate_fsdp_launch_killed_and_resumed_is_exact(method, tiny_model, tmp_path, cli_run):
    extra = _extra(method)
    ref_dir, crash_dir = cli_run(method), tmp_path / "crash"
    assert json.loads((ref_dir / "run.json").read_text())["parallel"]["strategy"] == "fsdp2"

    # SIGKILL the whole launch (launcher and both ranks) once checkpoint 2 is complete.
    proc = subprocess.Popen(_accelerate(["train", *_sets(tiny_model, crash_dir, method, extra + ["debug.step_sleep_s=1"])]),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = crash_dir / "checkpoints" / "step-000002" / ckpt.MARKER
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # torchrun starts the ranks in their own sessions, so the kill above reached only the
    # launcher; the ranks must follow it (distributed.die_with_launcher) and free the run dir.
    deadline = time.time() + 60
    while read_holder(crash_dir) is not None and time.time() < deadline:
        time.sleep(0.05)
    assert read_holder(crash_dir) is None, f"ranks outlived their launcher: {read_holder(crash_dir)}"
    assert not (crash_dir / "adapter").exists()

    resumed = subprocess.run(_accelerate(["train", *_sets(tiny_model, crash_dir, method, extra), "--resume"]),
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "resumed from" in resumed.stderr
    a, b = _steps(ref_dir), _steps(crash_dir)
    assert [r["step"] for r in b][-1] == 4
    by_step = {r["step"]: r for r in b}  # steps after the checkpoint were logged twice; the resumed ones last
    for row in a:
        assert by_step[row["step"]]["loss"] == row["loss"], row["step"]  # bit for bit: the same computation
        assert by_step[row["step"]].get("mixing") == row.get("mixing")
    final_a = load_file(str(ref_dir / "adapter" / "adapter.safetensors"))
    final_b = load_file(str(crash_dir / "adapter" / "adapter.safetensors"))
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    ranks = [load_file(str(crash_dir / "debug" / f"rank{k}.safetensors")) for k in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) and torch.equal(ranks[0][k], final_b[k]) for k in final_b)


def test_resume_with_another_world_size_says_why_and_changes_nothing(tiny_model, tmp_path, cli_run):
    """A two-process FSDP checkpoint resumed in one process: refused before anything is written."""
    run_dir = tmp_path / "run"
    shutil.copytree(cli_run("hybrid"), run_dir)
    state = ckpt.load_trainer_state(ckpt.latest_valid(run_dir / "checkpoints"))
    assert state["sharded"] is True and state["world_size"] == 2
    before = _digest(run_dir)
    job = load_config(data={}, overrides=smoke_overrides(tiny_model, run_dir, steps=6) + [
        "adapter.method=hybrid", "train.batch_size=2", "eval.before=false", "eval.after=false"])
    with pytest.raises(ValueError) as err:
        train(job, resume=True)
    message = str(err.value)
    assert "world_size: checkpoint 2, now 1" in message and "resume with 2 processes" in message
    assert "\n" not in message
    assert _digest(run_dir) == before


# ---------------------------------------------------------------- bad settings, refused before training


@pytest.mark.parametrize("env, field", [
    ({"FSDP_VERSION": "1"}, "fsdp_version=1"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params=true"),
    ({"FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, "fsdp_state_dict_type=SHARDED_STATE_DICT"),
    ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "fsdp_auto_wrap_policy=SIZE_BASED_WRAP"),
    ({"FSDP_RESHARD_AFTER_FORWARD": "SHARD_GRAD_OP"}, "fsdp_reshard_after_forward=SHARD_GRAD_OP"),
])
def test_unsupported_accelerate_fsdp_settings_are_named(env, field):
    base = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    section, checkpointing, problems = accelerate_fsdp_settings({**base, **env})
    assert len(problems) == 1 and problems[0].startswith(field) and "\n" not in problems[0]
    assert section.enabled and not checkpointing


def test_the_example_accelerate_config_is_supported_as_written():
    import yaml

    config = yaml.safe_load((REPO / "examples" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    env = {"ACCELERATE_USE_FSDP": "true", **{k.upper(): str(v).lower() if isinstance(v, bool) else str(v)
                                             for k, v in config.items()}}
    section, _, problems = accelerate_fsdp_settings(env)
    assert problems == [] and section.enabled and section.ram_efficient_loading
    assert accelerate_fsdp_settings({}) is None  # not an FSDP launch: the job's own section decides


@pytest.mark.parametrize("sets, field", [
    (["adapter.method=lora_ga", "adapter.lora_ga.offset=subtract"], "adapter offset='subtract'"),
    (["fsdp.layer_classes=[]"], "fsdp.layer_classes=[]"),
    (["fsdp.reshard_after_forward=maybe"], "fsdp.reshard_after_forward='maybe'"),
])
def test_bad_fsdp_job_settings_are_named(sets, field, tiny_model, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(data={}, overrides=smoke_overrides(tiny_model, tmp_path / "run") + ["fsdp.enabled=true", *sets])
    assert any(line.startswith(field) for line in err.value.errors), err.value.errors


def test_fsdp_without_several_processes_fails_before_touching_the_run_dir(tiny_model, tmp_path):
    job = load_config(data={}, overrides=smoke_overrides(tiny_model, tmp_path / "run") + ["fsdp.enabled=true"])
    with pytest.raises(ConfigError) as err:
        train(job)
    assert len(err.value.errors) == 1 and "needs several processes" in err.value.errors[0]
    assert not (tmp_path / "run").exists()


def test_block_classes_name_the_setting_and_the_choices():
    model = worker.base_model()
    assert block_classes(model) == ["LlamaDecoderLayer"]
    with pytest.raises(ValueError, match=r"fsdp.layer_classes=\['GPT2Block'\] is invalid: .*LlamaDecoderLayer"):
        block_classes(model, ["GPT2Block"])


def test_helpers_are_identities_without_sharding():
    t = torch.arange(6.0).reshape(3, 2)
    assert distributed.local(t) is t and distributed.full(t) is t and distributed.square_share(t) == 1.0
    target = torch.zeros(3, 2)
    distributed.assign(target, t)
    assert torch.equal(target, t)
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        distributed.assign(target, t.t())


@pytest.mark.slow
def test_accelerate_fsdp_launch_with_the_sketched_lora_ga_estimate(tiny_model, tmp_path):
    """The Hybrid's LoRA-GA start from the sketch (issue 14) in a sharded command-line run: the
    frozen sharded weights send it down the activation path, one all-reduce sums the ranks."""
    run_dir = tmp_path / "run"
    done = subprocess.run(_accelerate(["train", *_sets(tiny_model, run_dir, "hybrid", ["adapter.hybrid.ga_estimator=sketch"])]),
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    assert "LoRA-GA: estimating gradients on 4 batches (sketch, 2 passes)" in done.stderr
    assert "sharded (FSDP2 over 2 processes" in done.stderr
    assert json.loads((run_dir / "results.json").read_text())["after"]["n"] == 3
