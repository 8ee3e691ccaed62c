"""Hybrid (LoRA-GA × BOFT, per-layer λ): identity at init, dense formula, merge, λ rules and schedules,
save/load, ranks, Trainer callback; slow: SmolLM2 + GSM8K."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import hybridpeft as hp
from hybridpeft.adapters.hybrid import HybridAdapter
from hybridpeft.adapters.mixing import MixingRule, mixing_target
from hybridpeft.api import set_anneal_steps

transformers = pytest.importorskip("transformers")
import tiny_models
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
REPO = Path(__file__).resolve().parents[1]


def tiny_llama(dtype=torch.float64):
    return tiny_models.tiny_llama(dtype)


def hybrid(build=tiny_llama, **kw):
    kw = {"target_modules": TARGETS, "lora_r": 2, "boft_block_size": 4, "boft_n_factors": 2, **kw}
    return hp.inject(build(), hp.HybridConfig(**kw))


def lm_batches(n=2, seed=5, length=9):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, length), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def logits(model, batch):
    return model(input_ids=batch["input_ids"]).logits


def hybrids(model):
    return [(n, layer.adapter) for n, layer in hp.adapted_layers(model)]


def perturb(model, scale=0.2, lam=None):
    torch.manual_seed(4)
    with torch.no_grad():
        for p in hp.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * scale)
        for _, a in hybrids(model):
            if lam is not None:
                a.mix_lambda.fill_(lam)


def train(model, steps, batches=None, lr=1e-2):
    batches = batches or lm_batches(4, seed=11)
    opt = torch.optim.Adam(hp.trainable_parameters(model).values(), lr=lr)
    model.train()
    losses, lams = [], []
    for t in range(steps):
        loss = model(**batches[t % len(batches)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        hp.after_optimizer_step(model)
        losses.append(loss.item())
        lams.append({n: a.mix_lambda.item() for n, a in hybrids(model)})
    model.eval()
    return losses, lams


# ---------------------------------------------------------------------------
# Forward, merge, identity


@pytest.mark.parametrize("schedule", ["adaptive", "fixed", "anneal"])
def test_output_unchanged_at_init(schedule):
    batch = lm_batches(1, seed=9)[0]
    base = logits(tiny_llama(), batch)
    model = hybrid(schedule=schedule, lam_fixed=0.25, anneal_steps=10)
    expected_lam = {"adaptive": 0.5, "fixed": 0.25, "anneal": 0.75}[schedule]
    assert all(a.mix_lambda.item() == expected_lam for _, a in hybrids(model))
    torch.testing.assert_close(logits(model, batch), base, atol=1e-12, rtol=0)
    hp.lora_ga_init(model, lm_batches(2), num_batches=2)
    assert all(a.lora.lora_B0.norm() > 0 for _, a in hybrids(model))
    torch.testing.assert_close(logits(model, batch), base, atol=1e-10, rtol=0)


def test_forward_equals_dense_formula():
    """y = (λ W + (1 − λ) R W + λ s (BA − B0A0)) x + b with R built densely."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 16).double()
    model = hp.inject(nn.Sequential(layer), hp.HybridConfig(target_modules=["0"], lora_r=2, boft_block_size=4, boft_n_factors=3))
    a = model[0].adapter
    with torch.no_grad():
        for t in (a.lora.lora_A, a.lora.lora_B, a.lora.lora_A0, a.lora.lora_B0, a.boft.boft_Q):
            t.copy_(torch.randn_like(t) * 0.3)
        a.mix_lambda.fill_(0.3)
    W, lam = layer.weight.detach(), 0.3
    R = a.boft.dense_rotation()
    torch.testing.assert_close(R @ R.t(), torch.eye(16, dtype=torch.float64), atol=1e-12, rtol=0)
    dW = a.lora.scaling * (a.lora.lora_B @ a.lora.lora_A - a.lora.lora_B0 @ a.lora.lora_A0)
    W_eff = lam * W + (1 - lam) * R @ W + lam * dW
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ W_eff.t() + layer.bias, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.merged_weight(W), W_eff, atol=1e-12, rtol=0)


@pytest.mark.parametrize("lam", [0.3, 0.7])
def test_merge_equivalence_and_unmerge(lam):
    batch = lm_batches(1, seed=9)[0]
    model = hybrid()
    hp.lora_ga_init(model, lm_batches(2), num_batches=2)
    perturb(model, lam=lam)
    before = {n: layer.weight.detach().clone() for n, layer in hp.adapted_layers(model)}
    adapted = logits(model, batch)
    assert not torch.allclose(adapted, logits(tiny_llama(), batch))
    hp.merge(model)
    torch.testing.assert_close(logits(model, batch), adapted, atol=1e-10, rtol=0)
    hp.unmerge(model)
    for n, layer in hp.adapted_layers(model):
        torch.testing.assert_close(layer.weight, before[n], atol=1e-10, rtol=0)
    merged = hp.merge_and_unload(model)
    torch.testing.assert_close(logits(merged, batch), adapted, atol=1e-10, rtol=0)


def test_save_load_restores_lambda_step_and_start(tmp_path):
    batch = lm_batches(1, seed=9)[0]
    model = hybrid()
    hp.lora_ga_init(model, lm_batches(2), num_batches=2)
    train(model, 3)
    adapted = logits(model, batch)
    hp.save_adapter(model, tmp_path)
    loaded = hp.load_adapter(tiny_llama(), tmp_path)
    assert isinstance(hp.read_adapter_config(tmp_path), hp.HybridConfig)
    for (name, a), (_, b) in zip(hybrids(model), hybrids(loaded)):
        assert b.mix_lambda.item() == a.mix_lambda.item() != 0.5
        assert b.mix_step.item() == 3
        assert torch.equal(b.lora.lora_A0, a.lora.lora_A0) and torch.equal(b.boft.boft_Q, a.boft.boft_Q)
    torch.testing.assert_close(logits(loaded, batch), adapted, atol=1e-12, rtol=0)


def test_lambda_stays_float32_in_bfloat16_model():
    model = hybrid(lambda: tiny_llama(torch.bfloat16), lam_init=0.3)
    for _, a in hybrids(model):
        assert a.lora.lora_A.dtype == torch.bfloat16 and a.boft.boft_Q.dtype == torch.bfloat16
        assert a.mix_lambda.dtype == torch.float32 and a.mix_lambda.item() == pytest.approx(0.3, abs=1e-7)
    losses, _ = train(model, 2, lr=1e-3)
    assert all(math.isfinite(x) for x in losses)
    state = hp.mixing_state(model)
    assert all(0.05 <= v["lambda"] <= 0.95 and v["g_lora"] > 0 and v["g_boft"] > 0 for v in state.values())


# ---------------------------------------------------------------------------
# λ rules


def test_mixing_target_formulas():
    lam, gl, gb = torch.tensor(0.25), torch.tensor(1.0), torch.tensor(3.0)
    assert mixing_target(lam, gl, gb, "paper_literal").item() == pytest.approx(0.25)
    # relative: a = 1 / 0.25 = 4, b = 3 / 0.75 = 4
    assert mixing_target(lam, gl, gb, "relative").item() == pytest.approx(0.5)
    assert math.isnan(mixing_target(lam, torch.tensor(0.0), torch.tensor(0.0), "relative").item())


@pytest.mark.parametrize("norm_rule", ["relative", "paper_literal"])
def test_lambda_always_within_clamp(norm_rule):
    rule = MixingRule(ema=0.5, lam_min=0.1, lam_max=0.8, norm_rule=norm_rule)
    g = torch.Generator().manual_seed(0)
    lam = torch.tensor(0.5, dtype=torch.float64)
    for step in range(1, 500):
        # heavy-tailed norms, sometimes zero or non-finite
        gl, gb = (torch.rand(2, generator=g, dtype=torch.float64) ** 8 * 10.0 ** torch.randint(-6, 6, (2,), generator=g)).unbind()
        if step % 37 == 0:
            gl = torch.tensor(float("inf"))
        if step % 41 == 0:
            gl, gb = torch.tensor(0.0), torch.tensor(0.0)
        lam = rule.next(lam, torch.tensor(step), gl, gb)
        assert 0.1 <= lam.item() <= 0.8


def test_adaptive_lambda_differs_across_layers_and_moves():
    model = hybrid()
    hp.lora_ga_init(model, lm_batches(2), num_batches=2)
    _, lams = train(model, 6)
    last = lams[-1]
    assert len(set(round(v, 6) for v in last.values())) == len(last)  # every layer its own λ
    assert all(abs(v - 0.5) > 1e-3 for v in last.values())
    assert any(abs(lams[-1][n] - lams[-2][n]) > 1e-6 for n in last)  # still moving
    for step_lams in lams:
        assert all(0.05 <= v <= 0.95 for v in step_lams.values())
    state = hp.mixing_state(model)
    assert set(state) == set(last) and all(s["step"] == 6 and s["g_lora"] > 0 and s["g_boft"] > 0 for s in state.values())


def test_fixed_never_moves():
    model = hybrid(schedule="fixed", lam_fixed=0.75)
    hp.lora_ga_init(model, lm_batches(2), num_batches=2)
    losses, lams = train(model, 5)
    assert all(v == 0.75 for step in lams for v in step.values())
    assert all(math.isfinite(s["g_lora"]) for s in hp.mixing_state(model).values())  # norms still logged


def test_anneal_follows_its_line():
    model = hybrid(schedule="anneal", anneal_steps=4)
    _, lams = train(model, 6)
    for t, step in enumerate(lams, start=1):
        expected = 0.75 - 0.5 * min(t / 4, 1.0)
        assert all(v == pytest.approx(expected, abs=1e-7) for v in step.values())
    other = hybrid(schedule="anneal", anneal_start=0.9, anneal_end=0.1)
    with pytest.raises(ValueError, match="anneal_steps"):
        train(other, 1)
    set_anneal_steps(other, 8)
    _, lams = train(other, 2)
    assert all(v == pytest.approx(0.9 - 0.8 * 2 / 8, abs=1e-7) for v in lams[-1].values())


def toy_problem_lambdas(norm_rule: str, steps: int = 200, seed: int = 0) -> tuple[list[float], list[float]]:
    """A 32×32 layer whose teacher is a rotation of W plus a rank-2 update; Hybrid trained by Adam."""
    torch.manual_seed(seed)
    d = 32
    base = nn.Sequential(nn.Linear(d, d, bias=False))
    W = base[0].weight.detach().clone()
    skew = torch.randn(d, d) * 0.3
    teacher = torch.linalg.matrix_exp(skew - skew.t()) @ W + torch.randn(d, 2) @ torch.randn(2, d) * 0.3
    X = torch.randn(256, d)
    Y = X @ teacher.t()
    model = hp.inject(base, hp.HybridConfig(target_modules=["0"], lora_r=2, boft_block_size=4, boft_n_factors=2,
                                            norm_rule=norm_rule))

    def loss_fn(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    hp.lora_ga_init(model, [(X[:64], Y[:64])], num_batches=1, loss_fn=loss_fn)
    opt = torch.optim.Adam(hp.trainable_parameters(model).values(), lr=1e-2)
    lams, losses = [], []
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,))
        loss = loss_fn(model, (X[idx], Y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        hp.after_optimizer_step(model)
        lams.append(model[0].adapter.mix_lambda.item())
        losses.append(loss.item())
    return lams, losses


def test_positive_feedback_paper_literal_runs_to_bound_relative_does_not(record_property):
    """The paper's rule scales the LoRA gradient by λ itself, so λ feeds on itself up to λ_max;
    the default (relative) rule divides that factor out and settles inside the interval."""
    lit, lit_loss = toy_problem_lambdas("paper_literal")
    rel, rel_loss = toy_problem_lambdas("relative")
    record_property("lambda_paper_literal", [round(x, 4) for x in lit[::20]])
    record_property("lambda_relative", [round(x, 4) for x in rel[::20]])
    print(f"\nλ every 20 steps  paper_literal: {[round(x, 3) for x in lit[::20]]}\n"
          f"                  relative:      {[round(x, 3) for x in rel[::20]]}")
    assert all(x == pytest.approx(0.95, abs=1e-6) for x in lit[100:])  # collapsed onto λ_max and stays
    tail = rel[-50:]
    assert min(tail) > 0.05 + 0.02 and max(tail) < 0.95 - 0.02  # default: inside, away from both bounds
    assert sum(rel_loss[-20:]) < sum(rel_loss[:20])


# ---------------------------------------------------------------------------
# Ranks, callback, config


def _rank_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    # A forked child must not start OpenMP threads: libgomp's team does not survive fork, and the
    # child hung in a barrier (inside linalg's LU) whenever the parent had run a parallel region.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = hp.inject(nn.Sequential(nn.Linear(8, 8, bias=False)).double(),
                          hp.HybridConfig(target_modules=["0"], lora_r=1, boft_block_size=2, boft_n_factors=2))
        perturb(model)
        x = torch.randn(4, 8, dtype=torch.float64) * (rank + 1) ** 3  # different data → different local grads
        (model(x) ** 2).sum().backward()
        a = model[0].adapter
        local = [p.grad.norm().item() for p in (a.lora.lora_A, a.lora.lora_B, a.boft.boft_Q)]
        hp.after_optimizer_step(model)
        json.dump({"lambda": a.mix_lambda.item(), "local": local, "g_lora": a.grad_norm_lora.item()},
                  open(os.path.join(out_dir, f"r{rank}.json"), "w"))
    finally:
        dist.destroy_process_group()


def test_lambda_identical_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="spawn")  # not fork: a child forked after OpenMP ran deadlocks in libgomp
    r0, r1 = (json.load(open(tmp_path / f"r{r}.json")) for r in range(2))
    assert r0["lambda"] == r1["lambda"] and r0["g_lora"] == r1["g_lora"]
    gl = [math.hypot(*r["local"][:2]) for r in (r0, r1)]
    gb = [r["local"][2] for r in (r0, r1)]
    assert gl[0] != pytest.approx(gl[1])  # the ranks did see different gradients
    rms_l, rms_b = (math.sqrt((g[0] ** 2 + g[1] ** 2) / 2) for g in (gl, gb))
    target = (rms_l / 0.5) / (rms_l / 0.5 + rms_b / 0.5)
    assert r0["lambda"] == pytest.approx(min(max(0.9 * 0.5 + 0.1 * target, 0.05), 0.95), rel=1e-5)


def test_trainer_callback_updates_lambda_while_grads_exist(tmp_path):
    from torch.utils.data import Dataset

    from hybridpeft.callbacks import HybridPeftCallback

    class Data(Dataset):
        def __init__(self):
            self.rows = [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in lm_batches(4) for i in range(2)]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    model = hybrid(lambda: tiny_llama(torch.float32), schedule="anneal")
    hp.lora_ga_init(model, lm_batches(2), num_batches=2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    callback = HybridPeftCallback()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[callback])
    trainer.train()
    state = hp.mixing_state(model)
    assert all(s["step"] == 4 for s in state.values())  # once per optimizer step, not per micro-batch
    assert all(a.rule.anneal_steps == 4 for _, a in hybrids(model))  # filled from max_steps
    assert all(s["lambda"] == pytest.approx(0.25, abs=1e-6) for s in state.values())
    assert all(s["g_lora"] > 0 and s["g_boft"] > 0 for s in state.values())  # it saw gradients
    assert [step for step, _ in callback.history] == [1, 2, 3, 4]
    assert any("mixing/lambda_mean" in row for row in trainer.state.log_history)


def test_branch_defaults_are_the_branch_configs_defaults():
    hybrid = hp.HybridConfig()
    assert hybrid.lora_ga_config() == hp.LoraGAConfig()
    assert hybrid.boft_config() == hp.BoftConfig(side="output")
    assert hybrid.mixing_rule() == MixingRule()


@pytest.mark.parametrize("kw,field", [
    (dict(schedule="cosine"), "schedule"), (dict(norm_rule="x"), "norm_rule"), (dict(lam_min=0.0), "lam_min"),
    (dict(lam_max=1.0), "lam_max"), (dict(lam_init=0.99), "lam_init"), (dict(lam_fixed=1.5), "lam_fixed"),
    (dict(anneal_steps=0), "anneal_steps"), (dict(ema=1.0), "ema"), (dict(lora_r=0), "lora_r"),
    (dict(ga_direction="A2rB2r"), "ga_direction"), (dict(boft_n_factors=0), "boft_n_factors"),
])
def test_config_errors_name_the_hybrid_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        hp.HybridConfig(**kw)


def test_boft_misfit_names_hybrid_field():
    with pytest.raises(ValueError, match="boft_block_size"):
        hybrid(boft_block_size=5)


# ---------------------------------------------------------------------------
# Slow: the real model


def _smollm2():
    try:
        from hybridpeft.models import load_causal_lm

        return load_causal_lm("smollm2-135m")
    except (FileNotFoundError, OSError) as err:  # pragma: no cover - offline package missing
        pytest.skip(f"SmolLM2 not available: {err}")


def _gsm8k_batches(tokenizer, n, batch_size=2, max_len=64):
    path = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"no GSM8K data at {path}")
    rows = [json.loads(line) for line in path.open().readlines()[: n * batch_size]]
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return batches


@pytest.mark.slow
def test_smollm2_lora_ga_hybrid_gsm8k_loss_falls_and_lambda_differs():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model, tokenizer = _smollm2()
    batches = _gsm8k_batches(tokenizer, n=2)  # 4 real examples: ~20 s per step on a loaded 2-core CPU
    model = hp.inject(model, hp.HybridConfig(target_modules=["q_proj", "v_proj", "down_proj"], lora_r=8))
    base_eval = [model(**b).loss.item() for b in batches]
    hp.lora_ga_init(model, batches, num_batches=2)
    after_init = [model(**b).loss.item() for b in batches]
    assert after_init == pytest.approx(base_eval, abs=1e-4)  # output unchanged at init
    opt = torch.optim.AdamW(hp.trainable_parameters(model).values(), lr=5e-4)
    model.train()
    for step in range(20):
        loss = model(**batches[step % len(batches)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        hp.after_optimizer_step(model)
    model.eval()
    with torch.no_grad():
        final = [model(**b).loss.item() for b in batches]
    assert sum(final) < 0.8 * sum(base_eval)
    lams = [s["lambda"] for s in hp.mixing_state(model).values()]
    assert len(lams) == 30 * 3 and len(set(round(x, 5) for x in lams)) > 30
    assert all(0.05 <= x <= 0.95 for x in lams) and any(abs(x - 0.5) > 0.01 for x in lams)


def _reference_lambda(adapter: HybridAdapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's next λ the slow way: a norm per branch from its own parameters, then the rule."""
    from hybridpeft.adapters.mixing import grad_norm

    g_lora = grad_norm(list(adapter.lora.parameters())).double()
    g_boft = grad_norm(list(adapter.boft.parameters())).double()
    return adapter.rule.next(adapter.mix_lambda, adapter.mix_step + 1, g_lora, g_boft), g_lora, g_boft


def test_model_wide_lambda_update_equals_the_per_layer_rule():
    """after_optimizer_step moves all layers with fused norms and one vectorized rule step; it must give
    each layer exactly what the per-layer rule gives, also with two rules in one model (two groups)."""
    from dataclasses import replace

    torch.manual_seed(0)
    model = hybrid(lora_r=2)
    adapters = [m for m in model.modules() if isinstance(m, HybridAdapter)]
    adapters[1].rule = replace(adapters[1].rule, ema=0.5)  # a second group
    hp.lora_ga_init(model, lm_batches())
    for step in range(3):
        model.zero_grad()
        model(**lm_batches(seed=step)[0]).loss.backward()
        expected = [_reference_lambda(a) for a in adapters]
        hp.after_optimizer_step(model)
        for adapter, (lam, g_lora, g_boft) in zip(adapters, expected):
            # the reference's norms are float32 (grad_norm); the fused path keeps float64 here
            torch.testing.assert_close(adapter.mix_lambda, lam, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(adapter.grad_norm_lora.double(), g_lora, rtol=1e-6, atol=0)
            torch.testing.assert_close(adapter.grad_norm_boft.double(), g_boft, rtol=1e-6, atol=0)
            assert int(adapter.mix_step) == step + 1
    lams = torch.stack([a.mix_lambda for a in adapters])
    assert lams.unique().numel() > 1  # the layers did not all move alike


def test_refused_anneal_group_changes_no_layer():
    from dataclasses import replace

    model = hybrid()
    adapters = [m for m in model.modules() if isinstance(m, HybridAdapter)]
    adapters[0].rule = replace(adapters[0].rule, schedule="anneal", anneal_steps=None)
    model(**lm_batches()[0]).loss.backward()
    before = [(a.mix_lambda.clone(), a.mix_step.clone()) for a in adapters]
    with pytest.raises(ValueError, match="anneal_steps"):
        hp.after_optimizer_step(model)
    for a, (lam, step) in zip(adapters, before):
        assert torch.equal(a.mix_lambda, lam) and torch.equal(a.mix_step, step)


# ---------------------------------------------------------------------------
# Branch learning rates (the paper's η_LoRA, η_BOFT)


def test_branch_learning_rates_move_each_branch_by_its_own_rate():
    """AdamW's first step moves every entry by lr·m̂/(√v̂+ε) = ±lr (up to ε), so one step shows the
    rate each tensor got: η_LoRA for A, B; η_BOFT for the Cayley blocks; lr for anything else."""
    model = hybrid()
    before = {n: p.detach().clone() for n, p in hp.trainable_parameters(model).items()}
    opt = hp.build_optimizer(model, lr=1e-3, branch_lr={"lora": 2e-3, "boft": 5e-3})
    by_branch = {g["branch"]: g["lr"] for g in opt.param_groups}
    assert by_branch == {"lora": 2e-3, "boft": 5e-3}  # no parameter is left for the default group
    perturb(model, scale=0.05)  # non-zero B so every tensor gets a gradient
    moved_from = {n: p.detach().clone() for n, p in hp.trainable_parameters(model).items()}
    model(**lm_batches(1)[0]).loss.backward()
    opt.step()
    steps = {n: (p.detach() - moved_from[n]).abs().max().item() for n, p in hp.trainable_parameters(model).items()}
    lora = [s for n, s in steps.items() if ".lora." in n]
    boft = [s for n, s in steps.items() if ".boft." in n]
    assert lora and boft and len(lora) + len(boft) == len(steps) == len(before)
    assert all(s == pytest.approx(2e-3, rel=1e-3) for s in lora), lora
    assert all(s == pytest.approx(5e-3, rel=1e-3) for s in boft), boft


def test_branch_learning_rates_default_unchanged_and_errors_named():
    model = hybrid()
    plain = hp.build_optimizer(model, lr=1e-3)
    same = hp.build_optimizer(model, lr=1e-3, branch_lr={"lora": None, "boft": None})
    for opt in (plain, same):
        assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 1e-3 and "branch" not in opt.param_groups[0]
    half = hp.build_optimizer(model, lr=1e-3, branch_lr={"boft": 4e-3})
    assert sorted((g["branch"], g["lr"]) for g in half.param_groups) == [("boft", 4e-3), ("default", 1e-3)]
    with pytest.raises(ValueError, match=r"branch_lr=\{'lorra': 0.001\} is invalid: expected branch names among \['boft', 'lora'\]"):
        hp.build_optimizer(model, lr=1e-3, branch_lr={"lorra": 1e-3})
    lora_model = hp.inject(tiny_llama(), hp.LoraConfig(r=2, target_modules=TARGETS))
    with pytest.raises(ValueError, match="only the Hybrid has them"):
        hp.build_optimizer(lora_model, lr=1e-3, branch_lr={"boft": 1e-3})
    with pytest.raises(ValueError, match=r"branch_lr\['lora'\]=-1"):
        hp.build_optimizer(model, lr=1e-3, branch_lr={"lora": -1})


def test_job_branch_learning_rates_reach_the_optimizer_and_follow_the_schedule():
    from hybridpeft.train import ConfigError, load_config
    from hybridpeft.train.setup import build_optimizer, build_scheduler

    job = load_config(data={"adapter": {"method": "hybrid", "target_modules": TARGETS, "lora_r": 2,
                                        "boft_block_size": 4, "boft_n_factors": 2},
                            "train": {"lr": 1e-3, "lr_lora": 2e-3, "lr_boft": 8e-3, "warmup_steps": 1,
                                      "schedule": "constant"}})
    model = hybrid()
    opt = build_optimizer(model, job)
    sched = build_scheduler(opt, job, total_steps=10)
    lrs = {g["branch"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"lora": pytest.approx(1e-3), "boft": pytest.approx(4e-3)}  # warm-up halves both at step 0
    opt.step()
    sched.step()
    assert {g["branch"]: g["lr"] for g in opt.param_groups} == {"lora": 2e-3, "boft": 8e-3}
    with pytest.raises(ConfigError, match=r"train.lr_lora=-2.0 is invalid: expected null or a positive number"):
        load_config(data={"adapter": {"method": "hybrid"}, "train": {"lr_lora": -2.0}})
    with pytest.raises(ConfigError, match=r"train.lr_boft=0.001 is invalid for adapter.method='lora': expected null"):
        load_config(data={"adapter": {"method": "lora"}, "train": {"lr_boft": 1e-3}})
