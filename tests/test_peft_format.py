"""HF PEFT's adapter format: export (LoRA, LoRA-GA as rank 2r, DoRA, IA³) that
``peft.PeftModel.from_pretrained`` loads with our outputs, import of PEFT-made adapters,
the refusals (unrepresentable methods, unsupported PEFT features, other shapes, pickles)
and the serving-engine field check. float64 on a tiny Llama and a tiny GPT-2.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridpeft as hp
from hybridpeft.inject import config_of
from hybridpeft.peft_format import NotRepresentable, serving_problems

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_gpt2, tiny_llama  # noqa: E402

BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": (["q_proj", "v_proj", "down_proj"], ["down_proj"]), "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}
EXPORT_CASES = {
    "lora": lambda t, ff: hp.LoraConfig(target_modules=t, r=4, alpha=8.0),
    "lora-rslora": lambda t, ff: hp.LoraConfig(target_modules=t, r=4, alpha=3.0, rslora=True, dropout=0.1),
    "lora_ga": lambda t, ff: hp.LoraGAConfig(target_modules=t, r=3, alpha=8.0, num_batches=2),
    "lora_ga-rslora-subtract": lambda t, ff: hp.LoraGAConfig(target_modules=t, r=3, alpha=5.0, rslora=True,
                                                             offset="subtract", num_batches=2),
    "dora": lambda t, ff: hp.DoraConfig(target_modules=t, r=4, alpha=8.0),
    "ia3": lambda t, ff: hp.IA3Config(target_modules=t, feedforward_modules=ff),
}


def build(arch: str):
    model = BUILD[arch](torch.float64)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # GPT-2 starts biases at 0; non-zero ones show IA³ scaling them
        for name, p in model.named_parameters():
            if name.endswith("bias") and "ln_" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def tokens(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def trained_like(arch: str, config) -> torch.nn.Module:
    """Our model with ``config``, LoRA-GA started from real gradients, every tensor moved off its start."""
    model = hp.inject(build(arch), config)
    if config.method == "lora_ga":
        x = tokens(9)
        hp.lora_ga_init(model, [{"input_ids": x, "labels": x}] * 2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hp.trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def load_in_peft(arch: str, path: Path):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(build(arch), str(path))
    complaints = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not complaints, complaints  # no missing or unexpected adapter keys
    return model.eval()


# ---------------------------------------------------------------- export

@pytest.mark.parametrize("arch", sorted(BUILD))
@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_loads_in_peft_with_our_outputs(case, arch, tmp_path):
    targets, feedforward = TARGETS[arch]
    config = EXPORT_CASES[case](targets, feedforward)
    ours = trained_like(arch, config)
    x = tokens()
    expected = ours(x).logits
    assert (expected - build(arch)(x).logits).abs().max() > 1e-3
    hp.export_peft(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = load_in_peft(arch, tmp_path)
    torch.testing.assert_close(theirs(x).logits, expected, rtol=1e-12, atol=1e-12)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["target_modules"] == targets and meta["fan_in_fan_out"] == (arch == "gpt2")
    assert meta["task_type"] == "CAUSAL_LM"
    if config.method == "ia3":
        assert meta["peft_type"] == "IA3" and meta["feedforward_modules"] == feedforward
        return
    rank = 2 * config.r if config.method == "lora_ga" else config.r
    assert meta["r"] == rank and meta["use_rslora"] == config.rslora and meta["use_dora"] == (config.method == "dora")
    scaling = meta["lora_alpha"] / (rank ** 0.5 if meta["use_rslora"] else rank)
    assert scaling == pytest.approx(config.scaling(), rel=1e-15)
    assert meta["lora_dropout"] == config.dropout


def test_lora_ga_export_holds_the_frozen_start(tmp_path):
    """[B, −B0] · [A; A0] with both halves in the file: PEFT's B A is our s(BA − B0A0)/s."""
    ours = trained_like("llama", hp.LoraGAConfig(target_modules=["q_proj"], r=2, num_batches=2))
    hp.export_peft(ours, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, layer in hp.adapted_layers(ours):
        a, b = (tensors[f"base_model.model.{name}.lora_{p}.weight"] for p in "AB")
        ad = layer.adapter
        assert torch.equal(a, torch.cat([ad.lora_A, ad.lora_A0]).detach())
        assert torch.equal(b, torch.cat([ad.lora_B, -ad.lora_B0], dim=1).detach())
        assert ad.lora_B0.abs().max() > 0  # lora_ga_init ran: the start is not zero


def test_export_carries_trainable_modules_as_modules_to_save(tmp_path):
    ours = trained_like("llama", hp.LoraConfig(target_modules=["q_proj"], r=2, trainable_modules=["lm_head"]))
    x = tokens()
    hp.export_peft(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    torch.testing.assert_close(load_in_peft("llama", tmp_path)(x).logits, ours(x).logits, rtol=1e-12, atol=1e-12)


def test_export_target_patterns_fall_back_to_what_peft_can_express(tmp_path):
    """A regex and a layer-specific name have no single PEFT list; the export still selects exactly our modules."""
    config = hp.LoraConfig(target_modules=[r"re:model\.layers\.0\.self_attn\.(q|v)_proj", "layers.1.mlp.up_proj"], r=2)
    ours = trained_like("llama", config)
    hp.export_peft(ours, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(meta["target_modules"]) == sorted(n for n, _ in hp.adapted_layers(ours))
    x = tokens()
    torch.testing.assert_close(load_in_peft("llama", tmp_path)(x).logits, ours(x).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config, why", [
    (lambda: hp.BoftConfig(target_modules=["q_proj"], block_size=4, n_factors=2), "input side"),
    (lambda: hp.UnitaryConfig(target_modules=["q_proj"]), "no unitary"),
    (lambda: hp.HybridConfig(target_modules=["q_proj"], lora_r=2, boft_block_size=4, boft_n_factors=2), "no Hybrid"),
    (lambda: hp.FullConfig(), "every weight"),
])
def test_export_refuses_methods_peft_cannot_hold_and_writes_nothing(config, why, tmp_path):
    model = hp.inject(tiny_llama(), config())
    out = tmp_path / "out"
    with pytest.raises(NotRepresentable, match=why) as err:
        hp.export_peft(model, out)
    assert "merge" in str(err.value) and "\n" not in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- serving fields

def test_serving_check_accepts_lora_and_names_what_engines_refuse(tmp_path):
    lora = tmp_path / "lora"
    hp.export_peft(trained_like("llama", hp.LoraConfig(target_modules=["q_proj", "v_proj"], r=4)), lora)
    assert serving_problems(lora) == []
    ga = tmp_path / "ga"  # rank 2r = 32 > vLLM's default max_lora_rank 16
    hp.export_peft(trained_like("llama", hp.LoraGAConfig(target_modules=["q_proj"], r=16, num_batches=2)), ga)
    assert serving_problems(ga) == ["r=32 is above vLLM's max_lora_rank 16: start vLLM with --max-lora-rank 32"]
    assert serving_problems(ga, max_lora_rank=32) == []
    dora = tmp_path / "dora"
    hp.export_peft(trained_like("llama", hp.DoraConfig(target_modules=["q_proj"], r=4)), dora)
    assert serving_problems(dora) == ["use_dora=true: vLLM does not serve DoRA (merge the adapter instead)"]
    head = tmp_path / "head"
    hp.export_peft(trained_like("llama", hp.LoraConfig(target_modules=["q_proj"], r=2, trainable_modules=["lm_head"])), head)
    assert [p for p in serving_problems(head) if "modules_to_save=['lm_head']" in p]
    # a hand-broken file: a missing half and a rank that disagrees with r
    tensors = load_file(str(lora / "adapter_model.safetensors"))
    tensors.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"] = torch.zeros(3, 32)
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    problems = " | ".join(serving_problems(lora))
    assert "has lora_A only" in problems and "has rank 3, config r=4" in problems


# ---------------------------------------------------------------- import

def _peft_adapter(arch: str, path: Path, config, seed: int = 0):
    """A PEFT model with random adapter tensors, saved to ``path``; returns it (eval mode)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build(arch), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.save_pretrained(str(path))
    return model.eval()


IMPORT_CASES = {
    "lora-list": lambda peft, arch: peft.LoraConfig(target_modules=TARGETS[arch][0], r=3, lora_alpha=7),
    "lora-rslora-regex": lambda peft, arch: peft.LoraConfig(
        target_modules=r".*\.(q_proj|down_proj)" if arch == "llama" else r".*\.c_attn", r=5, lora_alpha=2,
        use_rslora=True, lora_dropout=0.05),
    "lora-layers_to_transform": lambda peft, arch: peft.LoraConfig(
        target_modules=TARGETS[arch][0], r=2, lora_alpha=4, layers_to_transform=[1]),
    "lora-modules_to_save": lambda peft, arch: peft.LoraConfig(
        target_modules=TARGETS[arch][0], r=2, lora_alpha=4, modules_to_save=["lm_head"]),
    "dora": lambda peft, arch: peft.LoraConfig(target_modules=TARGETS[arch][0], r=4, lora_alpha=8, use_dora=True),
    "ia3": lambda peft, arch: peft.IA3Config(target_modules=TARGETS[arch][0], feedforward_modules=TARGETS[arch][1],
                                             fan_in_fan_out=arch == "gpt2"),
}


@pytest.mark.parametrize("arch", sorted(BUILD))
@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_load_peft_reproduces_pefts_outputs_and_trains(case, arch, tmp_path):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _peft_adapter(arch, tmp_path, IMPORT_CASES[case](peft, arch))
    x = tokens()
    expected = theirs(x).logits
    if case == "lora-modules_to_save" and arch == "gpt2":  # GPT-2 ties lm_head to wte
        model = build(arch)
        with pytest.raises(ValueError, match="shares lm_head.weight with 'transformer.wte.weight' .tied weights."):
            hp.load_peft(model, tmp_path)
        assert _untouched(model)
        return
    ours = hp.load_peft(build(arch), tmp_path)
    torch.testing.assert_close(ours(x).logits, expected, rtol=1e-12, atol=1e-12)
    peft_names = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert hp.count_trainable(ours) == sum(p.numel() for n, p in theirs.named_parameters() if n in peft_names)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    config = config_of(ours)
    if meta["peft_type"] == "LORA":
        assert (config.r, config.alpha, config.rslora, config.dropout) == (
            meta["r"], meta["lora_alpha"], meta["use_rslora"], meta["lora_dropout"])
    # our own save/load round trip of what was imported, and one training step moves only adapter tensors
    hp.save_adapter(ours, tmp_path / "ours")
    assert torch.equal(hp.load_adapter(build(arch), tmp_path / "ours")(x).logits, ours(x).logits)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    trainable = hp.trainable_parameters(ours)
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    ours(x, labels=x).loss.backward()
    opt.step()
    assert {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])} == set(trainable)


def test_our_loader_points_a_peft_directory_to_load_peft(tmp_path):
    hp.export_peft(trained_like("llama", hp.LoraConfig(target_modules=["q_proj"], r=2)), tmp_path)
    with pytest.raises(ValueError, match=r"HF PEFT adapter \(peft_type='LORA'\).*hybridpeft.load_peft"):
        hp.load_adapter(build("llama"), tmp_path)


def test_our_export_imports_back_exactly(tmp_path):
    ours = trained_like("gpt2", hp.LoraGAConfig(target_modules=["c_attn"], r=2, num_batches=2))
    hp.export_peft(ours, tmp_path)
    back = hp.load_peft(build("gpt2"), tmp_path)
    x = tokens()
    torch.testing.assert_close(back(x).logits, ours(x).logits, rtol=1e-12, atol=1e-12)
    assert config_of(back).r == 4  # the rank-2r LoRA, trainable as plain LoRA


def _untouched(model) -> bool:
    return not hp.adapted_layers(model) and not hasattr(model, "hybridpeft_config")


@pytest.mark.parametrize("edit, named", [
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern={'q_proj': 8}"),
    ({"alpha_pattern": {"v_proj": 2}, "lora_bias": True}, "alpha_pattern={'v_proj': 2}|lora_bias=True"),
    ({"bias": "all"}, "bias='all'"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"layer_replication": [[0, 2]]}, "layer_replication=[[0, 2]]"),
    ({"some_future_feature": {"on": True}}, "some_future_feature={'on': True}"),
    ({"peft_type": "BOFT"}, "peft_type='BOFT'"),
])
def test_load_peft_refuses_unsupported_features_in_one_line(edit, named, tmp_path):
    peft = pytest.importorskip("peft")
    _peft_adapter("llama", tmp_path, peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=2))
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**meta, **edit}))
    model = build("llama")
    with pytest.raises(ValueError) as err:
        hp.load_peft(model, tmp_path)
    assert all(part in str(err.value) for part in named.split("|")) and "\n" not in str(err.value)
    assert _untouched(model)


def test_load_peft_names_tensor_and_both_shapes_for_another_model(tmp_path):
    peft = pytest.importorskip("peft")
    _peft_adapter("llama", tmp_path, peft.LoraConfig(target_modules=["q_proj"], r=2))
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    other = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' "
                                         r"has shape \(2, 32\), but 'model\.layers\.0\.self_attn\.q_proj' \(d_in=48, d_out=48\) "
                                         r"needs \(2, 48\)"):
        hp.load_peft(other, tmp_path)
    assert _untouched(other)
    gpt2 = build("gpt2")
    with pytest.raises(ValueError, match="is for module 'model.layers.0.self_attn.q_proj', which GPT2LMHeadModel does not have"):
        hp.load_peft(gpt2, tmp_path)
    assert _untouched(gpt2)


def test_load_peft_never_unpickles(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    _peft_adapter("llama", tmp_path, peft.LoraConfig(target_modules=["q_proj"], r=2))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(ValueError, match="adapter_model.bin is a pickle"):
        hp.load_peft(build("llama"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        hp.load_peft(build("llama"), tmp_path / "nowhere")


# ---------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


def _train_run(model_dir: Path, run_dir: Path, method: str):
    from hybridpeft.train import load_config, train
    from tiny_models import smoke_overrides

    job = load_config(overrides=smoke_overrides(model_dir, run_dir, 3) + [
        f"adapter.method={method}", "eval.before=false", "eval.after=false", "eval.every=0",
        "adapter.boft.block_size=4", "adapter.boft.n_factors=2", "adapter.lora_ga.num_batches=1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(job)


def test_cli_export_writes_a_peft_adapter_of_a_run(tiny_model_dir, tmp_path, capsys):
    from hybridpeft import cli
    from hybridpeft.train.artifacts import load_adapted

    peft = pytest.importorskip("peft")
    result = _train_run(tiny_model_dir, tmp_path / "run", "lora_ga")
    out = tmp_path / "peft"
    capsys.readouterr()
    assert cli.main(["export", str(result.run_dir), str(out), "--format", "peft", "--check"]) == 0
    printed = capsys.readouterr().out
    assert "PEFT adapter written to" in printed and "reproduces our logits within" in printed
    assert float(printed.split("within ")[1].split(" ")[0]) < 1e-5
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == str(tiny_model_dir) and meta["r"] == 16  # LoRA-GA r = 8 -> 2r
    ours, tokenizer, _ = load_adapted(result.adapter_dir)
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    ids = tokenizer(["Question: Tom has 3 apples."], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(**ids).logits, ours.eval()(**ids).logits, rtol=1e-5, atol=1e-6)
    # as for merge: a non-empty target needs --overwrite, and a file is never written over
    assert cli.main(["export", str(result.run_dir), str(out)]) == cli.EXIT_ERROR
    assert "non-empty directory" in capsys.readouterr().err
    assert cli.main(["export", str(result.run_dir), str(out), "--overwrite"]) == 0
    (tmp_path / "file").write_text("x")
    assert cli.main(["export", str(result.run_dir), str(tmp_path / "file"), "--overwrite"]) == cli.EXIT_ERROR
    assert (tmp_path / "file").read_text() == "x"


def test_cli_export_refuses_boft_with_exit_2_and_writes_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from hybridpeft import cli

    result = _train_run(tiny_model_dir, tmp_path / "run", "boft")
    monkeypatch.setattr("hybridpeft.train.artifacts.load_adapted",
                        lambda *a, **k: pytest.fail("a model was loaded for a method that cannot be exported"))
    out = tmp_path / "peft"
    capsys.readouterr()  # training's own output
    assert cli.main(["export", str(result.run_dir), str(out)]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "method='boft' cannot be exported" in err and "hybridpeft merge" in err
    assert not out.exists()
