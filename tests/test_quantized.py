"""A bitsandbytes-quantized base from the command line and the bench: nf4, fp4 and int8 on CPU.

``model.quantization`` loads the base through transformers' ``BitsAndBytesConfig``; the
adapters stay in float. A few training steps, ``hybridpeft eval`` and ``hybridpeft merge``
(a float model that plain transformers loads) on a tiny Llama (hidden 64: bitsandbytes'
CPU kernels repack 4-bit weights in blocks of 64, and fail on narrower layers); LoRA-GA's
start comes from activations there (a packed weight cannot take a gradient). The Hybrid
and nf4 run in the default suite; the other methods and SmolLM2 with ``-m slow``.

Tolerances: a 4-bit layer computes ``dequant(W) x`` in float32 (bitsandbytes dequantizes,
then multiplies), so the merged float model reproduces the adapted one to float32
rounding (bound 1e-4 relative, measured ~1e-6). int8 (LLM.int8()) also rounds the
activations to int8 and multiplies in float16, so there the bound is on the weights:
the merged weight equals the adapter applied to the dequantized ``W`` exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

import hybridpeft as hp  # noqa: E402
from hybridpeft.adapters.base import AdaptedLinear, is_quantized_layer  # noqa: E402
from hybridpeft.cli import main  # noqa: E402
from hybridpeft.inject import adapted_layers  # noqa: E402
from hybridpeft.models import dequantize_model, load_causal_lm  # noqa: E402
from hybridpeft.train import ConfigError, load_config  # noqa: E402
from hybridpeft.train.artifacts import load_adapted  # noqa: E402
from tiny_models import save_tiny_causal_lm, smoke_overrides  # noqa: E402

QUANTS = [pytest.param(q, marks=() if q == "nf4" else pytest.mark.slow) for q in ("nf4", "fp4", "int8")]
ADAPTER_METHODS = ("lora", "lora_ga", "boft", "unitary", "hybrid", "dora", "ia3")


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny64") / "model", hidden_size=64)


def _sets(model: Path, run_dir: Path, quantization: str, method: str = "hybrid") -> list[str]:
    sets = smoke_overrides(model, run_dir, steps=3) + [
        f"model.quantization={quantization}", f"adapter.method={method}", "train.batch_size=2",
        "data.max_length=48", "eval.limit=4", "eval.batch_size=4", "eval.every=0", "data.val_limit=4",
    ]
    return [a for s in sets for a in ("--set", s)]


def _probe() -> torch.Tensor:
    return torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("quantization", QUANTS)
def test_train_eval_merge_from_the_command_line(quantization, tiny64, tmp_path, capsys):
    run_dir, merged_dir = tmp_path / "run", tmp_path / "merged"
    assert main(["train", *_sets(tiny64, run_dir, quantization)]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["step"] == 3 and "exact_match" in results["after"]
    info = json.loads((run_dir / "adapter" / "hybridpeft_run.json").read_text())
    assert info["quantization"] == quantization

    adapted, _, _ = load_adapted(run_dir)  # the base quantized again, as the run info says
    hosts = [layer for _, layer in adapted_layers(adapted)]
    assert hosts and all(layer.quantized and is_quantized_layer(layer.base_layer) for layer in hosts)
    # LoRA-GA's start was estimated from activations on the quantized base: a real, non-zero start
    part = hosts[0].adapter.lora
    assert part.lora_A0.abs().sum() > 0 and part.lora_B0.abs().sum() > 0

    capsys.readouterr()
    assert main(["eval", str(run_dir), "--limit", "4", "--batch-size", "4"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["n"] == 4 and scored["exact_match"] == results["after"]["exact_match"]

    assert main(["merge", str(run_dir), str(merged_dir)]) == 0
    from transformers import AutoModelForCausalLM

    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any(is_quantized_layer(m) for m in plain.modules())
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    with torch.no_grad():
        expected = adapted.eval()(input_ids=_probe()).logits
        actual = plain(input_ids=_probe()).logits
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= (5e-2 if quantization == "int8" else 1e-4), error
    if quantization == "int8":  # exact on the weights: W' = adapter applied to the dequantized W
        for name, layer in adapted_layers(adapted):
            with torch.no_grad():
                expected_w = layer.adapter.merged_weight(layer.weight.float())
            torch.testing.assert_close(plain.get_submodule(name).weight, expected_w, rtol=0, atol=0)


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m == "hybrid" else pytest.mark.slow)
                                    for m in ADAPTER_METHODS])
def test_bench_runs_every_method_on_a_4bit_base(method, tiny64, tmp_path):
    from hybridpeft.bench.job import run_training_job

    config = {
        "run": {"model": str(tiny64), "task": "arith", "method": method, "seed": 0},
        "model": {"quantization": "nf4"},
        "adapter": {"method": method, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train_limit": 24, "val_limit": 4, "max_length": 48},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-2, "save_every": 0},
        "eval": {"every": 0, "limit": 4, "batch_size": 4},
    }
    out = run_training_job(config, tmp_path / "bench")
    assert out["job_config"]["model"]["quantization"] == "nf4"
    assert out["metrics"]["steps"] == 2 and "exact_match" in out["metrics"]
    assert 0 < out["footprint"]["tunable_params"] < out["footprint"]["total_params"]


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_every_method_on_every_quantized_base(method, quantization, tiny64):
    """Output unchanged at init, only adapter tensors train (the codes stay byte-identical),
    and ``merge_and_unload`` gives float layers holding the adapter applied to the dequantized W."""
    model, _ = load_causal_lm(str(tiny64), quantization=quantization)
    codes = {n: m.weight.data.clone() for n, m in model.named_modules() if is_quantized_layer(m)}
    model.train()
    with torch.no_grad():
        before = model(input_ids=_probe()).logits
    config = load_config(data={}, overrides=[f"adapter.method={method}", "adapter.target_modules=[q_proj,v_proj]",
                                             "adapter.boft.block_size=4"]).adapter
    torch.manual_seed(0)
    hp.inject(model, config)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=_probe()).logits, before, rtol=0, atol=1e-5 * before.abs().max())
    optimizer = hp.build_optimizer(model, lr=1e-2)
    ids = _probe()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        hp.after_optimizer_step(model)
        optimizer.zero_grad()
    after = {n.removesuffix(".base_layer"): m.weight.data for n, m in model.named_modules() if is_quantized_layer(m)}
    assert after.keys() == codes.keys()
    for name, packed in codes.items():
        assert torch.equal(after[name], packed), name
    with torch.no_grad():  # the path merge_and_unload takes (no autograd Function)
        merged_weights = {name: layer.adapter.merged_weight(layer.weight.float()) for name, layer in adapted_layers(model)}
    assert any(not torch.equal(w, layer.weight.float()) for (_, layer), w in zip(adapted_layers(model), merged_weights.values()))
    plain = dequantize_model(hp.merge_and_unload(model))
    assert not any(isinstance(m, AdaptedLinear) or is_quantized_layer(m) for m in plain.modules())
    for name, expected in merged_weights.items():
        torch.testing.assert_close(plain.get_submodule(name).weight.float(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("sets, field", [
    (["model.quantization=nf8"], "model.quantization='nf8'"),
    (["model.quantization=int8", "model.compute_dtype=bfloat16"], "model.compute_dtype='bfloat16'"),
    (["model.compute_dtype=float16"], "model.compute_dtype='float16'"),
    (["model.quantization=nf4", "adapter.method=full"], "adapter.method='full'"),
    (["model.quantization=nf4", "fsdp.enabled=true"], "model.quantization='nf4' is not supported with fsdp"),
])
def test_bad_quantization_settings_are_named(sets, field, tiny64, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(data={}, overrides=smoke_overrides(tiny64, tmp_path / "r") + sets)
    assert any(line.startswith(field) for line in err.value.errors), err.value.errors


@pytest.mark.slow
def test_smollm2_nf4_trains_evaluates_and_merges(tmp_path, capsys):
    """The real offline model (SmolLM2-135M) in NF4: a few steps of the Hybrid, eval, merge."""
    run_dir, merged_dir = tmp_path / "run", tmp_path / "merged"
    sets = ["model.name=smollm2-135m", f"output.run_dir={run_dir}", "model.quantization=nf4",
            "adapter.method=hybrid", "adapter.target_modules=[q_proj,v_proj]", "adapter.hybrid.ga_num_batches=2",
            "train.max_steps=3", "train.batch_size=2", "train.progress=false", "train.save_every=0",
            "data.train_limit=16", "data.val_limit=4", "data.max_length=48", "eval.every=0", "eval.limit=4",
            "eval.batch_size=4"]
    assert main(["train", *[a for s in sets for a in ("--set", s)]]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["step"] == 3 and results["after"]["n"] == 4
    assert main(["merge", str(run_dir), str(merged_dir)]) == 0
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    adapted, tokenizer, _ = load_adapted(run_dir)
    ids = tokenizer("Twelve plus seven is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, actual = adapted.eval()(input_ids=ids).logits, plain(input_ids=ids).logits
    assert ((actual - expected).abs().max() / expected.abs().max()).item() <= 1e-3


def _gradients_after(tiny64: Path, evaluate_first: bool, allow_repack: bool) -> dict[str, torch.Tensor]:
    model, _ = load_causal_lm(str(tiny64), quantization="nf4")
    if allow_repack:  # what a 4-bit model loaded without hybridpeft.models does on AVX512-BF16 CPUs
        from bitsandbytes.functional import has_avx512bf16

        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = has_avx512bf16()
    if evaluate_first:
        with torch.no_grad():
            model.eval()(input_ids=_probe())
    model.train()
    torch.manual_seed(0)
    hp.inject(model, hp.LoraConfig(target_modules=["q_proj"], r=2))
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.adapter.lora_B.normal_()  # B = 0 would zero A's gradient
    ids = _probe()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_an_eval_pass_before_training_keeps_4bit_gradients(tiny64):
    """bitsandbytes repacks a 4-bit layer's codes for its CPU inference kernel the first time the
    layer runs in eval mode without gradients (on AVX512-BF16 CPUs); that kernel has no backward,
    so training afterwards got no gradient through those layers (torch only warns), and the
    repack rounds the block scales to bfloat16. The task metric before training is such a pass.
    Loaded through hybridpeft the layers never repack: gradients after an eval pass are exactly
    those of a model that never ran in eval mode. A model that did repack (loaded elsewhere) is
    converted back by ``inject``: gradients flow again (their ``W`` keeps the repack's rounding,
    ~0.3%, which moves these tiny gradients by up to ~20%; bound: cosine similarity ≥ 0.9).
    (On CPUs without AVX512-BF16 bitsandbytes never repacks and both parts pass either way.)"""
    reference = _gradients_after(tiny64, evaluate_first=False, allow_repack=False)
    ours = _gradients_after(tiny64, evaluate_first=True, allow_repack=False)
    repacked = _gradients_after(tiny64, evaluate_first=True, allow_repack=True)
    for name, expected in reference.items():
        assert torch.equal(ours[name], expected), (name, (ours[name] - expected).abs().max().item())
        assert repacked[name] is not None, f"{name}: no gradient through the repacked layers"
        cosine = torch.nn.functional.cosine_similarity(repacked[name].flatten(), expected.flatten(), dim=0)
        assert cosine >= 0.9, (name, cosine.item())
