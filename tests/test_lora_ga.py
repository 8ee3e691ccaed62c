"""LoRA-GA: hook-based gradient estimation, SVD start, offset modes, merge, save/load, cache."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

import hybridpeft as hp
from hybridpeft.adapters.lora_ga import LoraGAAdapter
from hybridpeft.gradient_init import estimate_gradients, lora_ga_targets, start_factors

transformers = pytest.importorskip("transformers")
import tiny_models
TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama(dtype=torch.float64):
    return tiny_models.tiny_llama(dtype)


def tiny_gpt2(dtype=torch.float64):
    return tiny_models.tiny_gpt2(dtype)


def lm_batches(n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 9), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def plain_mean_grads(model, weights, batches):
    """Reference: an ordinary full backward per batch, gradients kept on the parameters."""
    for w in weights.values():
        w.requires_grad_(True)
    sums = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for n, w in weights.items():
            sums[n] += w.grad.float()
    for w in weights.values():
        w.requires_grad_(False)
        w.grad = None
    return {n: s / len(batches) for n, s in sums.items()}


def ga_model(build=tiny_llama, targets=TARGETS, **kw):
    kw.setdefault("r", 2)
    return hp.inject(build(), hp.LoraGAConfig(target_modules=targets, **kw))


def logits(model, batch):
    return model(input_ids=batch["input_ids"]).logits


# ---------------------------------------------------------------------------
# Estimation


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_hook_estimate_equals_plain_backward(build):
    targets = TARGETS if build is tiny_llama else ["c_attn", "c_fc"]
    model = ga_model(build, targets, r=2)
    batches = lm_batches()
    weights = {n: layer.base_layer.weight for n, (layer, _) in lora_ga_targets(model).items()}
    expected = plain_mean_grads(model, weights, batches)
    grads = hp.lora_ga_init(model, batches, num_batches=3)
    for name, (layer, _) in lora_ga_targets(model).items():
        ref = expected[name] if isinstance(layer.base_layer, nn.Linear) else expected[name].t()
        assert grads[name].dtype == torch.float32 and grads[name].shape == layer.weight.shape
        torch.testing.assert_close(grads[name], ref, atol=1e-6, rtol=0)
    # flags are restored: only the adapter trains, nothing holds a gradient
    assert all(not w.requires_grad and w.grad is None for w in weights.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(hp.trainable_parameters(model))
    assert all("lora_A" in n or "lora_B" in n for n in hp.trainable_parameters(model))


def _grads_alive_when_backward_reaches_layer_1(model, weights, run_backward):
    """Count target weights holding a .grad when backward reaches the input of decoder layer 1."""
    alive = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.register_hook(lambda g: alive.append(sum(w.grad is not None for w in weights.values())))

    handle = model.model.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run_backward()
    finally:
        handle.remove()
    return alive


def test_hooks_free_gradients_as_they_arrive():
    """With the hooks, layer 1's gradients are already off the weights when backward leaves layer 1."""
    model = ga_model()
    weights = {n: layer.base_layer.weight for n, (layer, _) in lora_ga_targets(model).items()}
    batch = lm_batches(1)
    alive = _grads_alive_when_backward_reaches_layer_1(
        model, weights, lambda: estimate_gradients(model, weights, batch, num_batches=1))
    assert alive == [0]
    plain = _grads_alive_when_backward_reaches_layer_1(model, weights, lambda: plain_mean_grads(model, weights, batch))
    assert plain == [3]  # a plain backward holds layer 1's q, v, down gradients at that point


def test_estimate_in_bfloat16_is_float32_and_close():
    batches = lm_batches(2)
    ref_model = ga_model(lambda: tiny_llama(torch.float32))
    ref = hp.lora_ga_init(ref_model, batches, num_batches=2)
    model = ga_model(lambda: tiny_llama(torch.bfloat16))
    grads = hp.lora_ga_init(model, batches, num_batches=2)
    for name, g in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        assert (g - ref[name]).norm() / ref[name].norm() < 0.1
    for _, part in lora_ga_targets(model).values():
        assert part.lora_A0.dtype == torch.bfloat16 and part.lora_A0.abs().sum() > 0


def test_estimate_respects_num_batches_and_refuses_empty():
    model = ga_model()
    g1 = hp.lora_ga_init(model, lm_batches(3), num_batches=1)
    g1_ref = hp.lora_ga_init(ga_model(), lm_batches(1), num_batches=5)  # only 1 available
    for name in g1:
        torch.testing.assert_close(g1[name], g1_ref[name])
    with pytest.raises(ValueError, match="no batch"):
        hp.lora_ga_init(ga_model(), [], num_batches=2)
    with pytest.raises(ValueError, match="num_batches"):
        hp.lora_ga_init(ga_model(), lm_batches(1), num_batches=0)


# ---------------------------------------------------------------------------
# SVD start on a known gradient


def known_gradient(d_out=24, d_in=16, seed=0):
    """G = U diag(2^-i) Vᵀ with random orthonormal U, V, and a loss whose ∇_W is exactly G."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, d_in, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    s = 2.0 ** -torch.arange(d_in, dtype=torch.float64)
    G = u @ torch.diag(s) @ v.t()

    def loss_fn(model, batch):  # <W, G>: model(I) has rows W[:, i]ᵀ
        return (model(torch.eye(d_in, dtype=torch.float64)) * G.t()).sum()

    return G, u, v, loss_fn


def max_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle between the column spans of a and b."""
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    cos = torch.linalg.svdvals(qa.t() @ qb).clamp(max=1.0)
    return math.acos(cos.min().item())


@pytest.mark.parametrize("direction,a_cols,b_cols", [
    ("ArB2r", slice(0, 3), slice(3, 6)),
    ("A2rBr", slice(3, 6), slice(0, 3)),
    ("ArBr", slice(1, 6, 2), slice(0, 6, 2)),
])
def test_start_spans_known_singular_subspaces(direction, a_cols, b_cols):
    G, u, v, loss_fn = known_gradient()
    model = hp.inject(nn.Sequential(nn.Linear(16, 24, bias=False)).double(),
                      hp.LoraGAConfig(target_modules=["0"], r=3, direction=direction))
    grads = hp.lora_ga_init(model, [None], num_batches=1, loss_fn=loss_fn)
    torch.testing.assert_close(grads["0"].double(), G, atol=1e-6, rtol=0)
    part = model[0].adapter
    assert max_principal_angle(part.lora_A0.t(), v[:, a_cols]) < 1e-4  # rows of A0 ⟂-free in top right subspace
    assert max_principal_angle(part.lora_B0, u[:, b_cols]) < 1e-4
    # stable scale: orthonormal vectors times d_out^{1/4}/√16
    c = 24 ** 0.25 / 4
    torch.testing.assert_close(part.lora_A0 @ part.lora_A0.t(), c * c * torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(part.lora_A, part.lora_A0) and torch.equal(part.lora_B, part.lora_B0)
    # a wrong direction would not span it
    other = v[:, 6:9]
    assert max_principal_angle(part.lora_A0.t(), other) > 1.0


def test_paper_eq8_is_best_rank_r_approximation():
    G, u, v, _ = known_gradient()
    cfg = hp.LoraGAConfig(target_modules=["x"], r=3, init_form="paper_eq8", scale="unit")
    a0, b0 = start_factors(G.float(), cfg, scaling=cfg.scaling())
    assert a0.shape == (3, 16) and b0.shape == (24, 3)
    best = u[:, :3] @ torch.diag(2.0 ** -torch.arange(3, dtype=torch.float64)) @ v[:, :3].t()
    torch.testing.assert_close((b0 @ a0).double(), best, atol=1e-5, rtol=0)


def test_scales():
    G, _, _, _ = known_gradient()
    unit = hp.LoraGAConfig(target_modules=["x"], r=2, scale="unit")
    a_unit, _ = start_factors(G.float(), unit, scaling=2.0)
    for scale, expected in [("stable", 24 ** 0.25 / 4), ("gd", 1 / 2.0)]:
        cfg = hp.LoraGAConfig(target_modules=["x"], r=2, scale=scale)
        a, _ = start_factors(G.float(), cfg, scaling=2.0)
        torch.testing.assert_close(a.abs(), a_unit.abs() * expected)
    w = torch.eye(24, 16) * torch.tensor([9.0, 4.0] + [1.0] * 14)  # top singular values 9, 4
    cfg = hp.LoraGAConfig(target_modules=["x"], r=2, scale="weight_svd")
    a, _ = start_factors(G.float(), cfg, scaling=1.0, weight=w)
    torch.testing.assert_close(a.abs(), a_unit.abs() * (3.0 + 2.0) / 2)
    with pytest.raises(ValueError, match="weight"):
        start_factors(G.float(), cfg, scaling=1.0)


def test_random_direction_uses_disjoint_indices():
    G, u, v, _ = known_gradient()
    torch.manual_seed(3)
    cfg = hp.LoraGAConfig(target_modules=["x"], r=3, direction="random", scale="unit")
    a0, b0 = start_factors(G.float(), cfg, scaling=1.0)
    # each row of A0 is ± one of the top-6 right vectors; each column of B0 one of the top-6 left vectors
    a_hits = (a0.double() @ v[:, :6]).abs().argmax(1)
    b_hits = (b0.double().t() @ u[:, :6]).abs().argmax(1)
    assert set(a_hits.tolist()).isdisjoint(b_hits.tolist())
    assert sorted(a_hits.tolist() + b_hits.tolist()) == list(range(6))


# ---------------------------------------------------------------------------
# Output unchanged, merge, offsets, save/load


def test_before_init_behaves_like_lora():
    batch = lm_batches(1)[0]
    base = logits(tiny_llama(), batch)
    model = ga_model()
    assert torch.allclose(logits(model, batch), base, atol=1e-12, rtol=0)
    for _, part in lora_ga_targets(model).values():
        assert part.lora_A0.abs().sum() == 0 and part.lora_B.abs().sum() == 0


@pytest.mark.parametrize("offset", ["adapter", "subtract"])
def test_output_unchanged_at_init(offset):
    batch = lm_batches(1, seed=9)[0]
    base_model = tiny_llama()
    base = logits(base_model, batch)
    model = ga_model(offset=offset)
    hp.lora_ga_init(model, lm_batches(2), num_batches=2)
    for name, (layer, part) in lora_ga_targets(model).items():
        assert part.lora_B0.norm() > 0 and part.lora_A0.norm() > 0
        original = base_model.get_submodule(name).weight
        assert torch.equal(layer.weight, original) == (offset == "adapter")
        assert part.offset_in_base == (offset == "subtract")
    torch.testing.assert_close(logits(model, batch), base, atol=1e-10, rtol=0)


def _init_and_train(offset):
    model = ga_model(offset=offset)
    hp.lora_ga_init(model, lm_batches(2), num_batches=2)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in hp.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("offset", ["adapter", "subtract"])
def test_merge_equivalence_and_unmerge(offset):
    batch = lm_batches(1, seed=9)[0]
    model = _init_and_train(offset)
    before = {n: layer.weight.detach().clone() for n, (layer, _) in lora_ga_targets(model).items()}
    adapted = logits(model, batch)
    hp.merge(model)
    torch.testing.assert_close(logits(model, batch), adapted, atol=1e-10, rtol=0)
    hp.unmerge(model)
    for n, (layer, _) in lora_ga_targets(model).items():
        torch.testing.assert_close(layer.weight, before[n], atol=1e-12, rtol=0)


def test_both_offsets_merge_onto_the_original_base():
    """merge_and_unload gives W_orig + s(BA − B0A0) whichever place held the offset."""
    merged = {}
    for offset in ("adapter", "subtract"):
        model = hp.merge_and_unload(_init_and_train(offset))
        merged[offset] = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, w in merged["adapter"].items():
        torch.testing.assert_close(merged["subtract"][name], w, atol=1e-12, rtol=0)
    original = dict((n, m.weight) for n, m in tiny_llama().named_modules() if isinstance(m, nn.Linear))
    changed = [n for n in original if not torch.equal(original[n], merged["adapter"][n])]
    assert sorted(changed) == sorted(n for n in original if n.endswith(tuple(TARGETS)))


@pytest.mark.parametrize("offset", ["adapter", "subtract"])
def test_save_load_round_trip_onto_original_base(tmp_path, offset):
    batch = lm_batches(1, seed=9)[0]
    model = _init_and_train(offset)
    adapted = logits(model, batch)
    hp.save_adapter(model, tmp_path)
    loaded = hp.load_adapter(tiny_llama(), tmp_path)  # the original, unshifted base
    assert isinstance(hp.read_adapter_config(tmp_path), hp.LoraGAConfig)
    for name, (_, part) in lora_ga_targets(loaded).items():
        src = model.get_submodule(name).adapter
        assert torch.equal(part.lora_A0, src.lora_A0) and torch.equal(part.lora_B0, src.lora_B0)
        assert not part.offset_in_base  # the loaded adapter carries the offset itself
    torch.testing.assert_close(logits(loaded, batch), adapted, atol=1e-10, rtol=0)


def test_disabled_runs_original_base_only_in_adapter_mode():
    batch = lm_batches(1, seed=9)[0]
    base = logits(tiny_llama(), batch)
    for offset, same in (("adapter", True), ("subtract", False)):
        model = _init_and_train(offset)
        with hp.disabled(model):
            out = logits(model, batch)
        assert torch.allclose(out, base, atol=1e-12, rtol=0) == same


def test_second_init_restores_the_shift_first():
    model = ga_model(offset="subtract")
    original = {n: layer.weight.detach().clone() for n, (layer, _) in lora_ga_targets(model).items()}
    batches = lm_batches(2)
    g1 = hp.lora_ga_init(model, batches, num_batches=2)
    g2 = hp.lora_ga_init(model, batches, num_batches=2)  # must estimate on the original W again
    for name, (layer, part) in lora_ga_targets(model).items():
        torch.testing.assert_close(g2[name], g1[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.weight + part.start_delta(), original[name], atol=1e-12, rtol=0)


def test_rank_2r_branch_equals_two_products():
    torch.manual_seed(0)
    part = LoraGAAdapter(12, 10, hp.LoraGAConfig(target_modules=["x"], r=3))
    part = part.double()
    with torch.no_grad():
        for t in (part.lora_A, part.lora_B, part.lora_A0, part.lora_B0):
            t.copy_(torch.randn_like(t))
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    ref = part.scaling * (x @ part.lora_A.t() @ part.lora_B.t() - x @ part.lora_A0.t() @ part.lora_B0.t())
    torch.testing.assert_close(part.branch(x), ref)
    torch.testing.assert_close(part.delta_weight(), part.scaling * (part.lora_B @ part.lora_A - part.lora_B0 @ part.lora_A0))


# ---------------------------------------------------------------------------
# Cache, distributed, config


def test_gradient_cache_skips_estimation(tmp_path):
    calls = []

    def counting_loss(model, batch):
        calls.append(1)
        return model(**batch).loss

    batches = lm_batches(2)
    g1 = hp.lora_ga_init(ga_model(), batches, num_batches=2, cache_dir=tmp_path, loss_fn=counting_loss)
    assert len(calls) == 2 and len(list(tmp_path.glob("*.safetensors"))) == 1
    model = ga_model()
    g2 = hp.lora_ga_init(model, batches, num_batches=2, cache_dir=tmp_path, loss_fn=counting_loss)
    assert len(calls) == 2  # hit: no forward/backward
    for name in g1:
        assert torch.equal(g1[name], g2[name])
    assert all(part.lora_A0.abs().sum() > 0 for _, part in lora_ga_targets(model).values())
    hp.lora_ga_init(ga_model(), lm_batches(2, seed=6), num_batches=2, cache_dir=tmp_path, loss_fn=counting_loss)
    assert len(calls) == 4  # other data: miss
    hp.lora_ga_init(ga_model(), batches, num_batches=1, cache_dir=tmp_path, loss_fn=counting_loss)
    assert len(calls) == 5  # other num_batches: miss


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    # A forked child must not start OpenMP threads: libgomp's team does not survive fork, and the
    # child hung in a barrier (inside linalg's LU) whenever the parent had run a parallel region.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = hp.inject(nn.Sequential(nn.Linear(6, 5, bias=False)).double(), hp.LoraGAConfig(target_modules=["0"], r=1))
        torch.manual_seed(0)
        with torch.no_grad():
            model[0].base_layer.weight.copy_(torch.randn(5, 6))
        x = torch.full((1, 6), float(rank + 1), dtype=torch.float64)
        grads = hp.lora_ga_init(model, [x], num_batches=1, loss_fn=lambda m, b: (m(b) ** 2).sum())
        torch.save(grads["0"], os.path.join(out_dir, f"g{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_estimate_is_averaged_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="spawn")  # not fork: a child forked after OpenMP ran deadlocks in libgomp
    torch.manual_seed(0)
    w = torch.randn(5, 6).double()
    expected = sum(2 * (w @ x.t()) @ x for x in (torch.full((1, 6), 1.0).double(), torch.full((1, 6), 2.0).double())) / 2
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"g{rank}.pt").double(), expected, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("field,value", [
    ("direction", "A2rB2r"), ("scale", "big"), ("init_form", "eq9"), ("offset", "weights"),
    ("stable_gamma", 0), ("num_batches", 0), ("svd_niter", -1), ("norm_bound", 0.1),
    ("stable_gamma", "16"), ("num_batches", True), ("svd_niter", 2.0),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}="):
        hp.LoraGAConfig(**{field: value})


def test_rank_too_large_for_layer_is_refused():
    with pytest.raises(ValueError, match="r=3"):
        hp.inject(nn.Sequential(nn.Linear(5, 8)), hp.LoraGAConfig(target_modules=["0"], r=3))
    hp.inject(nn.Sequential(nn.Linear(5, 8)), hp.LoraGAConfig(target_modules=["0"], r=3, init_form="paper_eq8"))


def test_lora_ga_init_refuses_other_methods():
    model = hp.inject(tiny_llama(), hp.LoraConfig(target_modules=TARGETS, r=2))
    with pytest.raises(ValueError, match="method='lora'"):
        hp.lora_ga_init(model, lm_batches(1))
