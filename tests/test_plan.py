"""``hybridpeft plan``: the byte formulas against real tiny models, the CLI, and bad input."""
from __future__ import annotations

import json
import re

import pytest
import torch

import hybridpeft as hp
from hybridpeft import cli
from hybridpeft.adapters.config import config_class
from hybridpeft.gradient_sketch import sketch_bytes
from hybridpeft.plan import PlanInputError, PlanRequest, plan
from hybridpeft.plan.estimate import NF4_BYTES_PER_PARAM

transformers = pytest.importorskip("transformers")

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOOM_ALL = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
METHODS = {  # name -> (method, adapter fields); BOFT/Hybrid b = 8, m = 3 fit every width below
    "lora": ("lora", {}),
    "lora-dropout": ("lora", {"dropout": 0.1}),
    "lora_ga": ("lora_ga", {}),
    "boft": ("boft", {}),
    "boft-recompute_base": ("boft", {"recompute_base": True}),
    "unitary": ("unitary", {}),
    "unitary-recompute": ("unitary", {"recompute": True}),
    "unitary-recompute_base": ("unitary", {"recompute_base": True}),
    "unitary-full": ("unitary", {"parameterization": "full"}),
    "hybrid": ("hybrid", {"boft_block_size": 8, "boft_n_factors": 3}),
    "hybrid-recompute_base": ("hybrid", {"boft_block_size": 8, "boft_n_factors": 3, "recompute_base": True}),
    "full": ("full", {}),
}
CASES = [  # (architecture, dtype, targets): full targets and a partial set whose first block starts late
    ("llama", "float32", None), ("llama", "bfloat16", ["q_proj", "v_proj"]),
    ("bloom", "float32", None), ("bloom", "bfloat16", ["dense_h_to_4h"]),
]


def tiny_config(arch: str):
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return transformers.BloomConfig(vocab_size=96, hidden_size=64, n_layer=2, n_head=4, use_cache=False)


def saved_bytes(model, ids) -> int:
    """Distinct storages autograd saves in one training forward, parameters and buffers aside
    (what benchmarks/recompute_memory.py counts)."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            storages[ptr] = t.untyped_storage().nbytes()
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss
    return sum(storages.values())


FORMULA_CASES = [pytest.param(name, case, id=f"{name}-{case[0]}-{case[1]}-{'partial' if case[2] else 'all'}")
                 for case in CASES for name in METHODS if not (name == "full" and case[2])]  # full FT has no targets


@pytest.mark.parametrize("name, case", FORMULA_CASES)
def test_activation_and_parameter_formulas_equal_a_real_model(name, case, tmp_path):
    """On tiny Llama and BLOOM models (the planner reads their config.json), the predicted saved
    activations equal the bytes autograd saves, to the byte, and the trainable parameters equal
    the injected model's; dropout masks are counted as on a CPU (device_kind='cpu')."""
    arch, dtype, targets = case
    method, fields = METHODS[name]
    config = tiny_config(arch)
    (tmp_path / "config.json").write_text(config.to_json_string())
    torch.manual_seed(0)
    model = (transformers.LlamaForCausalLM if arch == "llama" else transformers.BloomForCausalLM)(config)
    model = model.to(getattr(torch, dtype)).train()
    adapter = config_class(method)(target_modules=targets or (LLAMA_ALL if arch == "llama" else BLOOM_ALL), **fields) \
        if method != "full" else hp.FullConfig()
    hp.inject(model, adapter)
    measured = saved_bytes(model, torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0)))

    p = plan(PlanRequest(str(tmp_path), method, fields, targets=targets, batch=2, seq=16, dtype=dtype, device_kind="cpu"))
    assert p.activations["base"] + p.activations["adapted_modules"] == measured
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    assert p.trainable_params == trainable


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weight_bytes_equal_the_model_parameters(dtype, tmp_path):
    config = tiny_config("llama")
    (tmp_path / "config.json").write_text(config.to_json_string())
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
    expected = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan(PlanRequest(str(tmp_path / "config.json"), "lora", dtype=dtype)).parts["weights"] == expected
    nf4 = plan(PlanRequest(str(tmp_path), "lora", dtype=dtype, quantization="nf4")).parts["weights"]
    linears = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert nf4 == int(expected - linears * getattr(torch, dtype).itemsize + linears * NF4_BYTES_PER_PARAM)


def test_sharding_divides_what_fsdp_shards_and_not_activations():
    one = plan(PlanRequest("llama-3.1-8b", "lora", batch=1, seq=1024))
    eight = plan(PlanRequest("llama-3.1-8b", "lora", batch=1, seq=1024, world_size=8, sharding="fsdp"))
    ddp = plan(PlanRequest("llama-3.1-8b", "lora", batch=1, seq=1024, world_size=8, sharding="ddp"))
    assert eight.parts["activations"] == one.parts["activations"] == ddp.parts["activations"]
    assert eight.parts["optimizer_states"] == one.parts["optimizer_states"] // 8
    assert one.parts["weights"] / 8 < eight.parts["weights"] < one.parts["weights"] / 4  # + two gathered layers
    assert ddp.parts["weights"] == one.parts["weights"] and ddp.parts["ddp_buckets"] == one.parts["gradients"]


def test_lora_ga_estimate_exact_keeps_host_accumulators_and_the_sketch_does_not():
    p = plan(PlanRequest("llama-3.1-8b", "lora_ga", {"r": 8}))
    adapted = 32 * (4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336)
    exact, sketch = p.estimate
    assert (exact.estimator, sketch.estimator) == ("exact", "sketch")
    assert exact.detail["accumulators_host"] == 4 * adapted  # ~28 GB, the figure
    assert sketch.host == 0
    k = hp.LoraGAConfig(r=8).sketch_size_for(10**6, 10**6)
    shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
    passes = hp.LoraGAConfig(r=8).sketch_passes
    assert sketch.detail["sketches"] == 32 * sum(sketch_bytes(d_out, d_in, k, passes) for d_out, d_in in shapes)
    assert p.auto_estimator == "sketch"
    small = plan(PlanRequest("tiny", "lora_ga", {"r": 2}))
    assert small.auto_estimator == "exact"


def test_cli_prints_the_breakdown_offline(capsys):
    assert cli.main(["plan", "--model", "llama-3.1-8b", "--method", "hybrid", "--quantization", "nf4"]) == 0
    out = capsys.readouterr().out
    for row in ("weights (frozen base, nf4)", "optimizer states", "saved activations", "adapted modules",
                "LoRA-GA gradient estimate", "exact", "sketch", "PEAK"):
        assert row in out
    assert cli.main(["plan", "--model", "bloomz-7b1", "--method", "lora", "--json", "--device-memory", "80"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] in (True, False) and data["peak"] == max(data["phases"].values())


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt-7"], r"model='gpt-7' is invalid: not a named shape"),
    (["--model", "tiny", "--dtype", "float8"], r"dtype='float8' is invalid"),
    (["--model", "tiny", "--method", "full", "--quantization", "nf4"], r"quantization='nf4' is invalid: .*cannot be trained"),
    (["--model", "tiny", "--world-size", "8", "--sharding", "none"], r"sharding='none' is invalid"),
    (["--model", "tiny", "--batch", "0"], r"batch=0 is invalid"),
    (["--model", "tiny", "--batch", "two"], r"batch='two' is invalid"),
    (["--model", "tiny", "--method", "bogus"], r"method='bogus' is invalid"),
    (["--model", "tiny", "--method", "dora"], r"method='dora' is invalid: .*no byte formula for 'dora'"),
    (["--model", "tiny", "--adapter", "rank=4"], r"adapter='rank' is invalid"),
    (["--model", "tiny", "--method", "lora_ga", "--adapter", "sketch_size=3", "--adapter", "r=2"], r"sketch_size=3 is invalid"),
    (["--model", "tiny", "--method", "lora_ga", "--adapter", "sketch_size=100", "--adapter", "r=2"],
     r"cannot adapt 'model.layers.0.self_attn.q_proj' .*sketch_size=100 is invalid: expected at most min\(d_in, d_out\) = 64"),
    (["--model", "tiny", "--method", "lora_ga", "--adapter", "estimator=dense"], r"estimator='dense' is invalid"),
    (["--model", "tiny", "--targets", "attn"], r"target_modules entry 'attn' matches no module"),
    (["--model", "tiny", "--device-memory", "-3"], r"device_memory=-3.0 is invalid"),
], ids=["unknown-shape", "dtype", "nf4-full", "sharding", "batch-zero", "batch-text", "method", "unplanned-method", "adapter-field",
        "sketch-below-2r", "sketch-above-min-d", "estimator", "targets", "memory"])
def test_bad_input_is_one_line_naming_field_and_value_and_exit_2(argv, message, capsys):
    assert cli.main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert re.search(message, err), err


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(transformers.GPT2Config(n_layer=1).to_json_string())
    with pytest.raises(PlanInputError, match=r"model_type='gpt2' is invalid"):
        plan(PlanRequest(str(tmp_path), "lora"))
