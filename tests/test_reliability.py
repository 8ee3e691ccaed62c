"""Hostile cases (issue 12, items 3–8): runs that cannot clobber each other, one-line errors.

Each test replays one finding against a tiny random-init Llama (hidden 32, character
tokenizer) and the synthetic ``arith`` task: seconds per run, no download. Processes
that must really die (SIGKILL, SIGTERM) or really compete for a run dir are real
subprocesses of the ``hybridpeft`` command. See docs/reliability.md.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridpeft as hp
from hybridpeft import cli
from hybridpeft.adapters.base import AdaptedLinear
from hybridpeft.train import TrainingAborted, load_config, train
from hybridpeft.train import checkpoint as ckpt
from tiny_models import save_tiny_causal_lm, smoke_overrides

HOSTILE_REGEX = "re:([a-z_.0-9]+)+X"  # exponential backtracking in Python's re on any module name


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


def _sets(model: Path, run_dir: Path, steps: int, extra: list[str] = ()) -> list[str]:
    return smoke_overrides(model, run_dir, steps) + [
        "adapter.method=lora", "eval.before=false", "eval.after=false", "eval.every=0", *extra]


def _job(model: Path, run_dir: Path, steps: int = 4, extra: list[str] = ()):
    return load_config(overrides=_sets(model, run_dir, steps, extra))


def _train(job, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(job, **kwargs)


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "hybridpeft.cli", *args]


def _cli_train(model: Path, run_dir: Path, steps: int, extra: list[str] = ()) -> list[str]:
    return _cli(["train", *[a for s in _sets(model, run_dir, steps, extra) for a in ("--set", s)]])


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its sha256 (directories as 'dir')."""
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the process ended (status {proc.returncode}) before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def _one_line_error(err: str) -> str:
    """The command's own message: the last stderr line; there must be no traceback."""
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


# ---------------------------------------------------------------- item 3: a resume that cannot resume

@pytest.mark.parametrize("case", ["mistyped path", "every checkpoint corrupt", "checkpoints deleted"])
def test_a_resume_that_cannot_resume_stops_and_touches_nothing(case, tiny_model, tmp_path):
    job = _job(tiny_model, tmp_path / "run", 4)
    _train(job)
    run = job.run_dir()
    resume: object = True
    if case == "mistyped path":
        resume = run / "chekpoints"
    elif case == "every checkpoint corrupt":
        for _, path in ckpt.list_checkpoints(run / "checkpoints"):
            state = path / ckpt.TRAINER_STATE
            state.write_bytes(state.read_bytes()[:100])
    else:
        shutil.rmtree(run / "checkpoints")
    before = _snapshot(run)
    with pytest.raises(ValueError, match="--resume.*nothing was changed") as err:
        _train(job, resume=resume)
    if case == "every checkpoint corrupt":
        assert "step-000004: trainer_state.pt has 100 bytes" in str(err.value) and "step-000002" in str(err.value)
    assert _snapshot(run) == before  # adapter, results, logs, config: all as they were
    if case == "checkpoints deleted":  # and a fresh start does not sweep the finished run away either
        with pytest.raises(ValueError, match="already holds a finished run"):
            _train(job)
        assert _snapshot(run) == before


# ---------------------------------------------------------------- item 4: one process per run dir

def test_a_second_training_process_is_refused_and_the_lock_dies_with_its_holder(tiny_model, tmp_path, capsys):
    run = tmp_path / "run"
    extra = ["train.save_every=5", "debug.step_sleep_s=0.5"]
    first = subprocess.Popen(_cli_train(tiny_model, run, 40, extra), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        _wait_for(run / "checkpoints" / "step-000005" / ckpt.MARKER, first)
        second = subprocess.run(_cli_train(tiny_model, run, 40, extra) + ["--resume"], env=_env(),
                                capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second one tried the run dir"
        assert second.returncode == cli.EXIT_ERROR
        message = _one_line_error(second.stderr)
        assert "in use by another training process" in message and f"pid {first.pid}" in message
        assert "debug.step_sleep_s=0.5" in message  # the holder's command line
        assert cli.main(["info", str(run)]) == 0
        assert f"in use by a training process: pid {first.pid}" in capsys.readouterr().out
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: no cleanup runs, the kernel drops the lock
        first.wait(timeout=60)
    resumed = _train(_job(tiny_model, run, 40, ["train.save_every=5"]), resume=run)  # --resume RUN_DIR works too
    assert resumed.step == 40
    assert _steps(run) == list(range(1, 41))  # one writer: every step logged exactly once


# ---------------------------------------------------------------- item 5: merge onto an existing path

@pytest.mark.parametrize("target", ["file", "non-empty directory"])
def test_merge_refuses_an_existing_target_unless_overwrite(target, tiny_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    result = _train(_job(tiny_model, tmp_path / "run", 2))
    out = tmp_path / "merged"
    if target == "file":
        out.write_text("precious")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    before = _snapshot(tmp_path / "run")
    capsys.readouterr()
    assert cli.main(["merge", str(result.run_dir), str(out)]) == cli.EXIT_ERROR
    message = _one_line_error(capsys.readouterr().err)
    assert str(out) in message and "--overwrite" in message
    assert (out.read_text() if target == "file" else (out / "notes.txt").read_text()) == "precious"
    assert _snapshot(tmp_path / "run") == before
    assert cli.main(["merge", str(result.run_dir), str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and AutoModelForCausalLM.from_pretrained(out) is not None


# ---------------------------------------------------------------- item 6: regexes that backtrack

def test_a_catastrophic_regex_cannot_hang_loading(tiny_model, tmp_path):
    """Python's re needs minutes per 30-character name for this pattern; the old code hung here."""
    adapter = _train(_job(tiny_model, tmp_path / "run", 2)).adapter_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": [HOSTILE_REGEX]}))
    script = f"""
import time
from transformers import AutoModelForCausalLM
import hybridpeft as hp
from hybridpeft.train import load_config
start = time.time()
for source in ("config", "inject", "adapter_config.json"):
    model = AutoModelForCausalLM.from_pretrained({str(tiny_model)!r})
    try:
        if source == "config":
            load_config(overrides=["adapter.method=lora", "adapter.target_modules=[{HOSTILE_REGEX!r}]"])
            print("config: accepted")
        elif source == "inject":
            hp.inject(model, hp.LoraConfig(target_modules=[{HOSTILE_REGEX!r}]))
        else:
            hp.load_adapter(model, {str(adapter)!r})
    except ValueError as err:
        print(source + ": " + str(err).splitlines()[0])
print("seconds", round(time.time() - start, 2))
"""
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "config: accepted" in out  # a valid regex; what it matches is only known on a model
    for source in ("inject", "adapter_config.json"):
        assert f"{source}: target_modules entry {HOSTILE_REGEX!r} matches no module" in out, out


@pytest.mark.parametrize("field", ["target_modules", "trainable_modules"])
def test_regex_matching_time_is_bounded_and_the_error_names_field_and_pattern(field, tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hybridpeft import patterns

    monkeypatch.setattr(patterns, "MATCH_BUDGET_S", 0.0)  # stands in for a pattern that outlasts the budget
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = _snapshot_model(model)
    entries = {"target_modules": ["re:.*q_proj"]} if field == "target_modules" else \
        {"target_modules": ["q_proj"], "trainable_modules": ["re:.*norm"]}
    with pytest.raises(ValueError, match=rf"{field} entry 're:\.\*\w+' is invalid: matching it .* took over 0 s"):
        hp.inject(model, hp.LoraConfig(**entries))
    assert _same_model(_snapshot_model(model), before)  # nothing was wrapped or unfrozen


def _snapshot_model(model: torch.nn.Module) -> tuple:
    return (type(model.get_submodule("model.layers.0.self_attn.q_proj")).__name__,
            hasattr(model, "hybridpeft_config"),
            tuple((n, p.requires_grad) for n, p in model.named_parameters()),
            tuple((k, v.clone()) for k, v in model.state_dict().items()))


def _same_model(a: tuple, b: tuple) -> bool:
    return a[:3] == b[:3] and [k for k, _ in a[3]] == [k for k, _ in b[3]] and \
        all(torch.equal(x, y) for (_, x), (_, y) in zip(a[3], b[3]))


# ---------------------------------------------------------------- item 8: one line instead of a traceback

@pytest.mark.parametrize("command", ["train", "bench"])
def test_malformed_yaml_names_file_and_line(command, tmp_path, capsys):
    bad = tmp_path / "job.yaml"
    bad.write_text("train:\n  lr: 2e-4\n model: x\n")
    code = cli.main([command, "-c", str(bad)] if command == "train" else [command, str(bad)])
    assert code == (cli.EXIT_CONFIG if command == "train" else cli.EXIT_ERROR)
    message = _one_line_error(capsys.readouterr().err)
    assert f"{bad}, line 3, column 2: not valid YAML" in message


def test_a_missing_model_directory_or_an_unreachable_hub_id_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "model"
    assert cli.main(["eval", "--base", "--model", str(missing), "--task", "arith"]) == cli.EXIT_ERROR
    assert f"model {str(missing)!r}: no such directory" in _one_line_error(capsys.readouterr().err)
    assert cli.main(["train", "--print-config", "--set", "model.name=checkpoints/no/such-model"]) == cli.EXIT_CONFIG
    assert "model.name='checkpoints/no/such-model' is invalid: expected an existing model directory" in \
        capsys.readouterr().err
    # a hub id with the hub unreachable (HF_HUB_OFFLINE makes that immediate instead of a minute of retries)
    proc = subprocess.run(_cli(["eval", "--base", "--model", "hybridpeft-tests/no-such-model", "--task", "arith"]),
                          env=_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == cli.EXIT_ERROR
    message = _one_line_error(proc.stderr)
    assert message.startswith("hybridpeft: error: model 'hybridpeft-tests/no-such-model' is not a local directory "
                              "and could not be loaded from the Hugging Face hub")


@pytest.mark.parametrize("template,problem", [("runs/{taks}", "unknown: {taks}"), ("runs/{seed:q}", "Unknown format code"),
                                              ("runs/{task", "expected '}'")])
def test_run_dir_placeholders_are_checked_with_the_config(template, problem, capsys):
    assert cli.main(["train", "--print-config", "--set", f"output.run_dir={template}"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"output.run_dir={template!r} is invalid" in err and problem in err


@pytest.mark.parametrize("marker", ["[]", '{"files": {"trainer_state.pt": 5}}',
                                    '{"files": {"trainer_state.pt": {"size": 1, "sha256": "x"}, "../../etc/passwd": '
                                    '{"size": 1, "sha256": "x"}}}'])
def test_a_marker_of_the_wrong_shape_is_a_corrupt_checkpoint(marker, tiny_model, tmp_path, capsys):
    job = _job(tiny_model, tmp_path / "run", 4)
    _train(job)
    newest = job.run_dir() / "checkpoints" / "step-000004"
    (newest / ckpt.MARKER).write_text(marker)
    assert "wrong shape" in ckpt.verify(newest)
    assert cli.main(["info", str(job.run_dir())]) == 0
    assert "checkpoint step 4: UNUSABLE" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="skipping corrupt or partial checkpoint .*step-000004"):
        assert train(job, resume=True).step == 4  # resumed from step 2 and redid steps 3 and 4


def _executed(flag: str) -> None:  # what a malicious pickle would run on load
    Path(flag).write_text("code from a checkpoint ran")


class _Payload:
    def __init__(self, flag: Path) -> None:
        self.flag = str(flag)

    def __reduce__(self):
        return (_executed, (self.flag,))


@pytest.mark.parametrize("name,content", [("trainer_state.pt", "pickle"), ("rng-rank0.pt", "pickle"),
                                          ("trainer_state.pt", "garbage"), ("trainer_state.pt", "wrong structure")])
def test_a_pickle_bearing_or_corrupt_state_file_is_refused_and_resume_falls_back(name, content, tiny_model, tmp_path):
    """The file's hash is made to match (an old writer, or tampering): only loading it can tell."""
    job = _job(tiny_model, tmp_path / "run", 4)
    _train(job)
    newest = job.run_dir() / "checkpoints" / "step-000004"
    flag = tmp_path / "executed"
    target = newest / name
    if content == "pickle":
        torch.save({"loop": {"step": 4}, "payload": _Payload(flag)}, target)
    elif content == "garbage":
        target.write_bytes(os.urandom(4096))
    else:
        torch.save({"format_version": 1, "loop": [4]}, target)
    marker = json.loads((newest / ckpt.MARKER).read_text())
    marker["files"][name] = {"size": target.stat().st_size, "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
    (newest / ckpt.MARKER).write_text(json.dumps(marker))
    assert ckpt.verify(newest) is None  # sizes and hashes agree
    with pytest.warns(UserWarning, match=f"skipping corrupt or partial checkpoint .*step-000004: {name}"):
        result = train(job, resume=True)
    assert result.step == 4 and not flag.exists()


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount_tmpfs(path, options)``: a tmpfs there (root only; skips where mounting is not allowed)."""
    mounted: list[Path] = []

    def mount(path: Path, options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_read_only_run_dir_is_one_line(tiny_model, tmp_path, mount_tmpfs, capsys):
    if os.geteuid() != 0:  # permissions bind anyone but root
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o555)
    else:
        read_only = mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    sets = _sets(tiny_model, read_only / "run", 2)
    assert cli.main(["train", *[a for s in sets for a in ("--set", s)]]) == cli.EXIT_ERROR
    message = _one_line_error(capsys.readouterr().err)
    assert f"output.run_dir={str(read_only / 'run')!r} is not writable" in message


@pytest.mark.parametrize("how", ["injected ENOSPC", "real tmpfs"])
def test_a_full_disk_says_so_and_keeps_the_last_checkpoint(how, tiny_model, tmp_path, monkeypatch, mount_tmpfs):
    root = mount_tmpfs(tmp_path / "disk", "size=8m") if how == "real tmpfs" else tmp_path
    job = _job(tiny_model, root / "run", 6)
    real_finalize, real_save = ckpt.finalize, ckpt.save_tensors
    ballast = root / "ballast"

    def fill_disk_after_step_2(checkpoints, step, extra=None):
        final = real_finalize(checkpoints, step, extra)
        if step == 2 and how == "real tmpfs":
            with open(ballast, "wb", buffering=0) as f:  # take every free byte
                try:
                    while True:
                        f.write(b"\0" * (1 << 16))
                except OSError as err:
                    assert err.errno == errno.ENOSPC
        return final

    def no_space_after_step_2(obj, path):
        if path.parent.name == ".tmp-step-000004":
            path.write_bytes(b"\0" * 100)  # a part was written before the disk filled up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(obj, path)

    monkeypatch.setattr(ckpt, "finalize", fill_disk_after_step_2)
    if how == "injected ENOSPC":
        monkeypatch.setattr(ckpt, "save_tensors", no_space_after_step_2)
    with pytest.raises(OSError, match="disk full: no space left on the device") as err:
        _train(job)
    message = str(err.value)
    checkpoints = job.run_dir() / "checkpoints"
    assert f"the newest complete one is {checkpoints / 'step-000002'}" in message and "--resume" in message
    assert not list(checkpoints.glob(".tmp-*"))  # the unfinished checkpoint was removed
    assert ckpt.verify(checkpoints / "step-000002", deep=True) is None
    monkeypatch.undo()
    ballast.unlink(missing_ok=True)
    assert _train(job, resume=True).step == 6  # space freed: the run continues


@pytest.mark.parametrize("content", ["[1, 2]", '"lora"', "{not json", '{"method": "lora", "target_modules": 5}'])
def test_an_adapter_config_that_is_not_a_json_object_is_one_line(content, tiny_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    adapter = _train(_job(tiny_model, tmp_path / "run", 2)).adapter_dir
    (adapter / "adapter_config.json").write_text(content)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = _snapshot_model(model)
    with pytest.raises(ValueError, match="adapter_config.json"):
        hp.load_adapter(model, adapter)
    assert _same_model(_snapshot_model(model), before)
    assert cli.main(["info", str(adapter)]) == cli.EXIT_ERROR
    assert "adapter_config.json" in _one_line_error(capsys.readouterr().err)


def test_eval_limit_zero_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--base", "--model", "x", "--task", "arith", "--limit", "0"])
    assert exit_.value.code == 2 and "--limit: '0' is invalid: expected a positive integer" in capsys.readouterr().err


def _faulty(tensors: dict[str, torch.Tensor], fault: str) -> dict[str, torch.Tensor]:
    keys = sorted(tensors)
    last = keys[-1]
    if fault == "wrong shape":
        tensors[last] = torch.zeros(3, 3)
    elif fault == "integer dtype":
        tensors[last] = tensors[last].to(torch.int64)
    elif fault == "bool dtype":
        tensors[last] = tensors[last] > 0
    elif fault == "NaN value":
        tensors[last] = tensors[last].clone()
        tensors[last].view(-1)[0] = float("nan")
    elif fault == "inf value":
        tensors[last] = tensors[last].clone()
        tensors[last].view(-1)[0] = float("inf")
    else:
        del tensors[last]
    return tensors


@pytest.mark.parametrize("fault", ["wrong shape", "integer dtype", "bool dtype", "NaN value", "inf value", "missing key"])
@pytest.mark.parametrize("into", ["base model", "injected model"])
def test_a_failed_load_adapter_leaves_the_model_as_it_was(fault, into, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = _train(_job(tiny_model, tmp_path / "run", 2)).adapter_dir
    weights = adapter / "adapter.safetensors"
    tensors = load_file(str(weights))
    last = sorted(tensors)[-1]  # keys before it would be written first by a loader that checks as it goes
    save_file(_faulty(tensors, fault), str(weights))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if into == "injected model":
        hp.inject(model, hp.read_adapter_config(adapter))
    before = _snapshot_model(model)
    with pytest.raises(ValueError) as err:
        hp.load_adapter(model, adapter)
    assert repr(last) in str(err.value) or (fault == "missing key" and last in str(err.value))
    assert _same_model(_snapshot_model(model), before)
    if into == "base model":
        assert not any(isinstance(m, AdaptedLinear) for m in model.modules())


def test_sigterm_keeps_the_checkpoints_and_says_how_to_resume(tiny_model, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli_train(tiny_model, run, 30, ["train.save_every=5", "debug.step_sleep_s=0.3"]),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run / "checkpoints" / "step-000005" / ckpt.MARKER, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    message = _one_line_error(err)
    newest = ckpt.newest_sealed(run / "checkpoints")
    assert f"interrupted (signal {int(signal.SIGTERM)})" in message and f"the newest complete one is {newest}" in message
    assert "continue with: hybridpeft train --set" in message and message.endswith("--resume")
    assert ckpt.verify(newest, deep=True) is None
    resumed = _train(_job(tiny_model, run, 30, ["train.save_every=5"]), resume=True)  # the lock was released
    assert resumed.step == 30 and _steps(run) == list(range(1, 31))


# ---------------------------------------------------------------- item 8: the checkpoint named after a NaN abort

def _blow_up_at_step(monkeypatch, step: int, factor: float) -> None:
    """Multiply every trainable weight by ``factor`` right after optimizer step ``step`` (what a far
    too high learning rate does, at once), by wrapping the loop's per-step bookkeeping."""
    import hybridpeft.train.loop as loop

    real, calls = loop.after_optimizer_step, []

    def wrapped(model):
        real(model)
        calls.append(1)
        if len(calls) == step:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.mul_(factor)

    monkeypatch.setattr(loop, "after_optimizer_step", wrapped)


def _finite_adapter(checkpoint: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(checkpoint / "adapter" / "adapter.safetensors")).values())


@pytest.mark.parametrize("factor", [1e30, math.inf], ids=["huge", "inf"])
def test_after_a_nan_abort_the_named_checkpoint_resumes_at_a_lower_lr(factor, tiny_model, tmp_path, monkeypatch):
    """Huge finite weights saved at step 4 make every later loss NaN; infinite ones are not even finite.
    Either way the checkpoint the abort names must be one a resume at a lower lr can go on from."""
    job = _job(tiny_model, tmp_path / "run", 10, ["train.nan_abort_after=3"])
    _blow_up_at_step(monkeypatch, 4, factor)
    with pytest.raises(TrainingAborted) as err:
        _train(job)
    monkeypatch.undo()
    message = str(err.value)
    checkpoints = job.run_dir() / "checkpoints"
    named = checkpoints / "step-000002"
    assert f"Last good checkpoint: {named}." in message and _finite_adapter(named)
    assert [s for s, _ in ckpt.list_checkpoints(checkpoints)] == [2]
    if factor == math.inf:
        assert "training aborted at step 4: after this step's update the weights are not finite" in message
    else:
        assert "steps [5, 6, 7]" in message and "step-000004.suspect" in message
    resumed = _train(_job(tiny_model, tmp_path / "run", 10, ["train.nan_abort_after=3", "train.lr=1e-3"]), resume=True)
    assert resumed.step == 10 and resumed.skipped_steps == 0


def test_the_pre_save_check_names_non_finite_weights_and_optimizer_state():
    from hybridpeft.train.health import non_finite_names

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    params = list(model.parameters())
    assert non_finite_names(model, params, optimizer) == []
    with torch.no_grad():
        model[1].bias.fill_(float("inf"))
    optimizer.state[model[0].weight]["exp_avg_sq"][0, 0] = float("nan")
    assert non_finite_names(model, params, optimizer) == ["optimizer state 'exp_avg_sq' of 0.weight", "1.bias"]
