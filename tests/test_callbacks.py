"""``HybridPeftCallback`` in a real ``transformers.Trainer``: LoRA-GA's start from the Trainer's
own training data at train begin (not again on resume), adapter-only checkpoints in our
format and PEFT's."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

import hybridpeft as hp
import hybridpeft.gradient_init

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_llama  # noqa: E402

from hybridpeft.callbacks import HybridPeftCallback  # noqa: E402


class Rows(Dataset):
    """16 random token sequences, labels = inputs."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(0, 64, (12,), generator=gen) for _ in range(16)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _args(tmp_path, **extra):
    settings = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                    logging_steps=1, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True)
    return transformers.TrainingArguments(**{**settings, **extra})


@pytest.fixture
def spy(monkeypatch):
    """Records every lora_ga_init call (the batches it got, the Trainer step it ran at) and runs it."""
    calls = []
    original = hybridpeft.gradient_init.lora_ga_init

    def recording(model, batches, **kwargs):
        batches = list(batches)
        calls.append({"batches": batches, "kwargs": kwargs})
        return original(model, batches, **kwargs)

    monkeypatch.setattr(hybridpeft.gradient_init, "lora_ga_init", recording)
    return calls


def test_lora_ga_start_from_the_trainers_data_and_adapter_checkpoints(tmp_path, spy):
    peft = pytest.importorskip("peft")
    model = hp.inject(tiny_llama(), hp.LoraGAConfig(target_modules=["q_proj", "v_proj"], r=2, num_batches=3))
    starts_seen = []

    class FirstStep(transformers.TrainerCallback):  # runs after ours: the start must be set by then
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                starts_seen.append([part.lora_B0.clone() for _, part in hybridpeft.gradient_init.lora_ga_targets(model).values()])

    data = Rows()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=data,
                                   callbacks=[HybridPeftCallback(), FirstStep()])
    trainer.train()
    assert len(spy) == 1 and len(spy[0]["batches"]) == 3  # the config's num_batches, from the Trainer's loader
    rows = {tuple(r.tolist()) for r in data.rows}
    for batch in spy[0]["batches"]:
        assert batch["input_ids"].shape == (2, 12)  # the Trainer's batch size
        assert {tuple(r.tolist()) for r in batch["input_ids"]} <= rows
    assert starts_seen and all(b0.abs().max() > 0 for b0 in starts_seen[0])  # set before the first step

    x = data.rows[0][None]
    expected = model(x).logits
    for where in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path):
        assert (where / "adapter" / "adapter.safetensors").is_file(), where
        meta = json.loads((where / "adapter-peft" / "adapter_config.json").read_text())
        assert meta["peft_type"] == "LORA" and meta["r"] == 4  # LoRA-GA r = 2 as a rank-2r LoRA
    ours = hp.load_adapter(tiny_llama(), tmp_path / "checkpoint-4" / "adapter")
    assert torch.equal(ours(x).logits, expected)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter-peft")).eval()
    torch.testing.assert_close(theirs(x).logits, expected, rtol=1e-5, atol=1e-6)
    early = hp.load_adapter(tiny_llama(), tmp_path / "checkpoint-2" / "adapter")
    assert not torch.equal(early(x).logits, expected)  # checkpoint-2 holds step 2's adapter, not the last


def test_no_second_estimate_on_resume_or_after_a_manual_init(tmp_path, spy):
    model = hp.inject(tiny_llama(), hp.LoraGAConfig(target_modules=["q_proj"], r=2, num_batches=2))
    transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=Rows(),
                         callbacks=[HybridPeftCallback()]).train()
    assert len(spy) == 1
    resumed = hp.inject(tiny_llama(), hp.LoraGAConfig(target_modules=["q_proj"], r=2, num_batches=2))
    args = _args(tmp_path, max_steps=6)
    transformers.Trainer(model=resumed, args=args, train_dataset=Rows(),
                         callbacks=[HybridPeftCallback()]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert len(spy) == 1  # resuming keeps the checkpoint's start
    assert (tmp_path / "checkpoint-6" / "adapter-peft" / "adapter_model.safetensors").is_file()

    manual = hp.inject(tiny_llama(), hp.LoraGAConfig(target_modules=["q_proj"], r=2, num_batches=2))
    x = Rows().rows[0][None]
    hybridpeft.gradient_init.lora_ga_init(manual, [{"input_ids": x, "labels": x}] * 2)  # through the spy too
    start = [part.lora_B0.clone() for _, part in hybridpeft.gradient_init.lora_ga_targets(manual).values()]
    transformers.Trainer(model=manual, args=_args(tmp_path / "manual"), train_dataset=Rows(),
                         callbacks=[HybridPeftCallback()]).train()
    assert len(spy) == 2  # only the manual call
    assert all(torch.equal(a, part.lora_B0) for a, (_, part) in zip(start, hybridpeft.gradient_init.lora_ga_targets(manual).values()))


def test_methods_without_a_peft_form_get_our_checkpoints_only(tmp_path):
    model = hp.inject(tiny_llama(), hp.BoftConfig(target_modules=["q_proj"], block_size=4, n_factors=2))
    transformers.Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=Rows(),
                         callbacks=[HybridPeftCallback()]).train()
    assert (tmp_path / "checkpoint-2" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "checkpoint-2" / "adapter-peft").exists() and not (tmp_path / "adapter-peft").exists()


def test_trainer_example_runs(tmp_path):
    """examples/trainer_lora_ga.py end to end on the tiny model (SmolLM2 in the real example)."""
    import importlib.util
    from pathlib import Path

    from tiny_models import save_tiny_causal_lm

    model_dir = save_tiny_causal_lm(tmp_path / "model")
    path = Path(__file__).resolve().parents[1] / "examples" / "trainer_lora_ga.py"
    spec = importlib.util.spec_from_file_location("trainer_lora_ga", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.main(["--model", str(model_dir), "--max-steps", "4", "--lr", "1e-2", "--out", str(tmp_path / "out")])
    assert losses["after"] < losses["before"] - 0.05, losses  # it trains: 4.373 -> 4.262 measured
    for where in (tmp_path / "out", tmp_path / "out" / "checkpoint-2"):
        assert (where / "adapter" / "adapter_config.json").is_file()
        assert (where / "adapter-peft" / "adapter_model.safetensors").is_file()
