"""LoRA-GA's sketch estimator: subspace recovery, linearity, one all-reduce across ranks,
no d_out × d_in tensor on the activation path, lora_ga_init with estimator="sketch", cache, config errors."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hybridpeft as hp
from hybridpeft import gradient_init as gradient_init_module
from hybridpeft.gradient_sketch import (GradientSketch, LowRankGradient, SketchBank, SubspaceSketch, random_signs,
                                       sketch_bytes)
from hybridpeft.gradient_init import choose_estimator, lora_ga_targets

transformers = pytest.importorskip("transformers")
import tiny_models  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]  # d_out × d_in: 32×32, 16×32, 32×64


def max_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (degrees) between the column spans of a and b (orthonormal columns)."""
    cosines = torch.linalg.svdvals(a.double().t() @ b.double())
    return math.degrees(math.acos(min(1.0, cosines.min().item())))


def low_rank_plus_noise(d_out: int, d_in: int, rank: int, noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=g, dtype=torch.float64))
    s = 10.0 * torch.logspace(0, -1, rank, dtype=torch.float64)  # σ from 10 down to 1
    return (u * s) @ v.t() + noise * torch.randn(d_out, d_in, generator=g, dtype=torch.float64), u, v


# ---------------------------------------------------------------------------
# The sketch itself


@pytest.mark.parametrize("k, bound_deg", [(24, 10.0), (32, 6.0), (64, 3.0)])
def test_sketch_recovers_top_subspace_of_low_rank_plus_noise(k, bound_deg):
    """G = U diag(σ) Vᵀ + E: rank 16, σ from 10 to 1, E Gaussian with entries of 1e-3 (‖E‖₂ ≈ 0.03).
    The sketch's top-16 singular vectors span U and V within the stated angle, and the angle
    shrinks as k grows (measured: 8.5°/2.6° at k=24, 4.0°/2.4° at 32, 2.2°/1.4° at 64)."""
    d_out, d_in, rank = 300, 200, 16
    G, u_true, v_true = low_rank_plus_noise(d_out, d_in, rank, noise=1e-3)
    sketch = GradientSketch(d_out, d_in, k, seed=0, name="layer")
    for part in torch.arange(d_out).chunk(3):  # streamed: three updates that sum to G
        piece = torch.zeros_like(G)
        piece[part] = G[part]
        sketch.add_matrix(piece)
    est = sketch.low_rank(rank)
    assert max_principal_angle(est.u, u_true) < bound_deg
    assert max_principal_angle(est.v, v_true) < bound_deg
    s_true = torch.linalg.svdvals(G)[:rank]
    assert (est.s.double() - s_true).abs().max() < 0.05 * s_true[0]


@pytest.mark.parametrize("passes, bound_deg", [(2, 75.0), (4, 45.0), (6, 35.0)])
def test_more_passes_separate_a_slowly_decaying_spectrum(passes, bound_deg):
    """Noise of 3e-2 per entry (‖E‖₂ ≈ 0.9, close to σ_16 = 1): one pass cannot find the top-16
    subspace (measured 79°/83° at k = 32); subspace iteration approaches what the full SVD of the
    noisy G itself finds (30°/26°): measured 70°/54° (2 passes), 42°/32° (4), 32°/27° (6)."""
    d_out, d_in, rank, k = 300, 200, 16, 32
    G, u_true, v_true = low_rank_plus_noise(d_out, d_in, rank, noise=3e-2)
    single = GradientSketch(d_out, d_in, k, seed=0, name="layer")
    single.add_matrix(G)
    assert max_principal_angle(single.low_rank(rank).u, u_true) > 70.0
    sketch = SubspaceSketch(d_out, d_in, k, seed=0, name="layer", passes=passes)
    for _ in range(passes):
        for rows in torch.arange(d_out).chunk(3):  # each sweep streamed in three pieces that sum to G
            piece = torch.zeros_like(G)
            piece[rows] = G[rows]
            sketch.add_matrix(piece)
        sketch.end_pass()
    est = sketch.low_rank(rank)
    assert max_principal_angle(est.u, u_true) < bound_deg and max_principal_angle(est.v, v_true) < bound_deg
    with pytest.raises(RuntimeError, match="run 0 of its 2 passes"):
        SubspaceSketch(d_out, d_in, k, seed=0, passes=2).low_rank(4)


def test_subspace_outer_updates_equal_dense_ones_on_both_sides():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(7, 40, generator=gen, dtype=torch.float64)  # (tokens, d_out)
    x = torch.randn(7, 24, generator=gen, dtype=torch.float64)  # (tokens, d_in)
    for passes in (2, 3):  # starts on the right, on the left
        dense = SubspaceSketch(40, 24, 6, seed=2, name="n", passes=passes)
        outer = SubspaceSketch(40, 24, 6, seed=2, name="n", passes=passes)
        for _ in range(passes):
            dense.add_matrix(g.t() @ x)
            outer.add_outer(g, x)
            torch.testing.assert_close(outer.acc, dense.acc, atol=1e-4, rtol=1e-5)
            dense.end_pass()
            outer.end_pass()


def test_sketch_is_exact_when_k_spans_the_smaller_side():
    """k = min(d_out, d_in): Ω is invertible, so Q X reproduces G up to float32 rounding."""
    G, _, _ = low_rank_plus_noise(40, 24, 6, noise=0.1, seed=3)
    sketch = GradientSketch(40, 24, 24, seed=1, name="w")
    sketch.add_matrix(G)
    est = sketch.low_rank(24)
    torch.testing.assert_close(est.dense().double(), G, atol=1e-4 * G.abs().max().item(), rtol=0)


def test_sketch_is_linear_and_outer_updates_equal_dense_ones():
    """sketch(G1 + G2) = sketch(G1) + sketch(G2), and the activation update gᵀ(xΩ), (Ψgᵀ)x equals
    the dense update with G = gᵀx (different summation order: a tolerance, not equality)."""
    gen = torch.Generator().manual_seed(0)
    d_out, d_in, k = 48, 40, 8
    g = torch.randn(2, 5, d_out, generator=gen, dtype=torch.float64)  # (batch, tokens, d_out)
    x = torch.randn(2, 5, d_in, generator=gen, dtype=torch.float64)
    g1, g2 = torch.randn(d_out, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen)
    both = GradientSketch(d_out, d_in, k, seed=4, name="n")
    both.add_matrix(g1 + g2)
    parts = GradientSketch(d_out, d_in, k, seed=4, name="n")
    parts.add_matrix(g1)
    parts.add_matrix(g2)
    torch.testing.assert_close(parts.y, both.y, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(parts.z, both.z, atol=1e-4, rtol=1e-5)

    dense = GradientSketch(d_out, d_in, k, seed=4, name="n")
    dense.add_matrix(g.reshape(-1, d_out).t() @ x.reshape(-1, d_in))
    outer = GradientSketch(d_out, d_in, k, seed=4, name="n")
    outer.add_outer(g, x)
    torch.testing.assert_close(outer.y, dense.y, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(outer.z, dense.z, atol=1e-4, rtol=1e-5)


def test_test_matrices_are_signs_fixed_by_seed_and_name():
    a = random_signs(30, 7, 5, "layers.0.q_proj:omega")
    assert a.dtype == torch.int8 and set(a.unique().tolist()) == {-1, 1}
    assert torch.equal(a, random_signs(30, 7, 5, "layers.0.q_proj:omega"))
    assert not torch.equal(a, random_signs(30, 7, 6, "layers.0.q_proj:omega"))
    assert not torch.equal(a, random_signs(30, 7, 5, "layers.1.q_proj:omega"))


def test_bank_stacks_every_sketch_in_one_buffer_and_counts_its_bytes():
    bank = SketchBank({"a": (32, 16, torch.device("cpu")), "b": (8, 64, torch.device("cpu"))}, {"a": 8, "b": 4}, seed=0)
    (flat,) = bank.buffers.values()
    assert flat.numel() == 32 * 8 + 17 * 16 + 8 * 4 + 8 * 64  # Y and Z of both; l = min(2k+1, d_out)
    bank["b"].add_matrix(torch.ones(8, 64))
    assert flat.abs().sum() > 0 and bank["a"].y.abs().sum() == 0  # views into the one buffer
    assert bank.nbytes() == sketch_bytes(32, 16, 8) + sketch_bytes(8, 64, 4)


# ---------------------------------------------------------------------------
# In lora_ga_init


def lm_batches(n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, 64, (2, 9), generator=g)), "labels": ids.clone()} for _ in range(n)]


def projector(t: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the column span of t (sign- and basis-invariant)."""
    q, _ = torch.linalg.qr(t.double())
    return q @ q.t()


@pytest.mark.parametrize("build, targets, source, passes", [
    (tiny_models.tiny_llama, TARGETS, "auto", 1),
    (tiny_models.tiny_llama, TARGETS, "activations", 1),
    (tiny_models.tiny_gpt2, ["c_attn", "c_fc"], "auto", 1),
    (tiny_models.tiny_llama, TARGETS, "auto", 2),
    (tiny_models.tiny_llama, TARGETS, "activations", 3),
    (tiny_models.tiny_gpt2, ["c_attn", "c_fc"], "auto", 3),
], ids=["llama-param-hooks", "llama-activations", "gpt2-conv1d", "llama-2-passes", "llama-activations-3-passes",
        "gpt2-conv1d-3-passes"])
def test_sketch_start_equals_exact_start_when_k_is_full(build, targets, source, passes):
    """With k = min(d_in, d_out) (the default 2·rank_needed() with r = 8, capped per layer) the
    sketch recovers G exactly, in one pass or several, so A0's rows and B0's columns span the
    exact start's subspaces; and the output is unchanged at init."""
    def model_with(estimator):
        return hp.inject(build(torch.float64), hp.LoraGAConfig(target_modules=targets, r=8, estimator=estimator,
                                                               sketch_passes=passes))

    exact, sketched = model_with("exact"), model_with("sketch")
    ids = lm_batches(1, seed=9)[0]["input_ids"]
    before = sketched(input_ids=ids).logits
    grads = hp.lora_ga_init(exact, lm_batches(), num_batches=3, gradient_source=source)
    lows = hp.lora_ga_init(sketched, lm_batches(), num_batches=3, gradient_source=source)
    assert all(isinstance(g, torch.Tensor) for g in grads.values())
    assert all(isinstance(g, LowRankGradient) for g in lows.values())
    for name, (_, part) in lora_ga_targets(exact).items():
        other = lora_ga_targets(sketched)[name][1]
        torch.testing.assert_close(projector(other.lora_A0.t()), projector(part.lora_A0.t()), atol=1e-4, rtol=0)
        torch.testing.assert_close(projector(other.lora_B0), projector(part.lora_B0), atol=1e-4, rtol=0)
        top = lows[name].s.numel()
        torch.testing.assert_close(lows[name].s.double(), torch.linalg.svdvals(grads[name].double())[:top],
                                   atol=1e-5 * grads[name].abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(sketched(input_ids=ids).logits, before, atol=1e-12, rtol=0)


def test_hybrid_takes_the_sketch_from_its_ga_fields():
    config = hp.HybridConfig(target_modules=TARGETS, lora_r=2, boft_block_size=4, boft_n_factors=2,
                             ga_estimator="sketch", ga_sketch_size=6)
    model = hp.inject(tiny_models.tiny_llama(torch.float64), config)
    lows = hp.lora_ga_init(model, lm_batches(2), num_batches=2)
    assert all(isinstance(g, LowRankGradient) and g.s.numel() == 4 for g in lows.values())
    assert all(part.lora_A0.norm() > 0 for _, part in lora_ga_targets(model).values())


class AllocationLog(TorchDispatchMode):
    """Records the shape and storage size of every tensor an ATen operator returns in new memory
    (views of an input, e.g. ``Wᵀ`` for a matmul, are not allocations)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.elements: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(t.shape))
                self.elements.append(t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("estimator, passes", [("sketch", 1), ("sketch", 3), ("exact", 1)])
def test_activation_path_never_forms_a_dense_gradient(estimator, passes):
    """A wide layer (3072 × 2048) on the activation path (the 4-bit / FSDP path): the sketch's
    largest allocation is its stacked [Y; Z] buffer (d_out·k + l·d_in, under 1% of d_out × d_in);
    the exact estimator's gᵀx is d_out × d_in (the control case, which shows the check can fail)."""
    d_in, d_out = 2048, 3072
    torch.manual_seed(0)
    model = hp.inject(nn.Sequential(nn.Linear(d_in, d_out, bias=False)),
                      hp.LoraGAConfig(target_modules=["0"], r=2, estimator=estimator, sketch_passes=passes))
    x = torch.randn(2, 3, d_in)
    log = AllocationLog()
    with log:
        hp.lora_ga_init(model, [x], num_batches=1, loss_fn=lambda m, b: m(b).square().mean(),
                        gradient_source="activations")
    largest = max(log.elements)
    if estimator == "sketch":
        k = 8  # default: 2 × rank_needed() = 4r
        assert largest <= d_out * k + (2 * k + 1) * d_in, f"a {largest}-element tensor was allocated"
        assert not any(set(s) >= {d_out, d_in} for s in log.shapes)
    else:
        assert largest >= d_out * d_in


# ---------------------------------------------------------------------------
# Two processes: one all-reduce of the stacked sketches


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        calls = []
        reduce = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            calls.append(tuple(tensor.shape))
            return reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        for passes in PASSES:
            calls.clear()
            model = hp.inject(tiny_models.tiny_llama(torch.float64),
                              hp.LoraGAConfig(target_modules=TARGETS, r=2, estimator="sketch", sketch_size=6,
                                              sketch_passes=passes))
            mine = lm_batches(4)[2 * rank:2 * rank + 2]  # each rank its half of the batches
            lows = hp.lora_ga_init(model, mine, num_batches=2)
            torch.save({"calls": list(calls), "dense": {n: g.dense() for n, g in lows.items()}},
                       os.path.join(out_dir, f"rank{rank}-{passes}.pt"))
    finally:
        dist.destroy_process_group()


PASSES = (1, 3)


def test_two_process_all_reduce_equals_one_process(tmp_path):
    """Two gloo ranks, each with half the batches, end with the one-process sketch of all of them;
    each pass is one all-reduce of the stacked sums (single pass: every layer's [Y; Z])."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")  # not fork: a child forked after OpenMP ran deadlocks in libgomp
    for passes in PASSES:
        model = hp.inject(tiny_models.tiny_llama(torch.float64),
                          hp.LoraGAConfig(target_modules=TARGETS, r=2, estimator="sketch", sketch_size=6,
                                          sketch_passes=passes))
        single = {n: g.dense() for n, g in hp.lora_ga_init(model, lm_batches(4), num_batches=4).items()}
        for rank in range(2):
            got = torch.load(tmp_path / f"rank{rank}-{passes}.pt", weights_only=True)
            assert len(got["calls"]) == passes, f"rank {rank} made {len(got['calls'])} all-reduce calls"
            for name, g in single.items():
                # the sum of two half-sums vs one sum of four: float32 rounding apart
                torch.testing.assert_close(got["dense"][name], g, atol=1e-5 * g.abs().max().item(), rtol=0)


# ---------------------------------------------------------------------------
# Cache, auto rule, bad input


def test_sketch_cache_is_written_and_hit(tmp_path, monkeypatch):
    def model():
        return hp.inject(tiny_models.tiny_llama(torch.float64), hp.LoraGAConfig(target_modules=TARGETS, r=2,
                                                                                 estimator="sketch"))

    first = hp.lora_ga_init(model(), lm_batches(2), num_batches=2, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("lora_ga_sketch-*.safetensors"))) == 1
    monkeypatch.setattr(gradient_init_module, "sketch_gradients", lambda *a, **k: pytest.fail("estimated again"))
    again = hp.lora_ga_init(model(), lm_batches(2), num_batches=2, cache_dir=tmp_path)
    for name, low in first.items():  # the same sketches, the same recovery: bitwise
        assert torch.equal(again[name].u, low.u) and torch.equal(again[name].s, low.s)
    other = hp.inject(tiny_models.tiny_llama(torch.float64),
                      hp.LoraGAConfig(target_modules=TARGETS, r=2, estimator="sketch", sketch_seed=1))
    with pytest.raises(pytest.fail.Exception, match="estimated again"):  # another seed: another key
        hp.lora_ga_init(other, lm_batches(2), num_batches=2, cache_dir=tmp_path)
    monkeypatch.undo()

    def two_pass():
        return hp.inject(tiny_models.tiny_llama(torch.float64),
                         hp.LoraGAConfig(target_modules=TARGETS, r=2, estimator="sketch", sketch_passes=2))

    first = hp.lora_ga_init(two_pass(), lm_batches(2), num_batches=2, cache_dir=tmp_path)
    monkeypatch.setattr(gradient_init_module, "sketch_gradients", lambda *a, **k: pytest.fail("estimated again"))
    again = hp.lora_ga_init(two_pass(), lm_batches(2), num_batches=2, cache_dir=tmp_path)
    assert all(torch.equal(again[n].u, low.u) and torch.equal(again[n].v, low.v) for n, low in first.items())


def test_auto_picks_exact_below_the_threshold_and_the_sketch_above(monkeypatch):
    limit = gradient_init_module.AUTO_EXACT_MAX_BYTES
    assert choose_estimator("auto", limit // 4) == "exact"
    assert choose_estimator("auto", limit // 4 + 1) == "sketch"
    assert choose_estimator("exact", 10**12) == "exact" and choose_estimator("sketch", 1) == "sketch"
    model = hp.inject(tiny_models.tiny_llama(torch.float64), hp.LoraGAConfig(target_modules=TARGETS, r=2))
    assert all(isinstance(g, torch.Tensor) for g in hp.lora_ga_init(model, lm_batches(1), num_batches=1).values())
    monkeypatch.setattr(gradient_init_module, "AUTO_EXACT_MAX_BYTES", 4 * 1000)  # below the 3 layers' 4096 parameters
    lows = hp.lora_ga_init(model, lm_batches(1), num_batches=1)
    assert all(isinstance(g, LowRankGradient) for g in lows.values())


@pytest.mark.parametrize("make, match", [
    (lambda: hp.LoraGAConfig(r=4, sketch_size=7), r"^sketch_size=7 is invalid: expected None or an integer ≥ 8"),
    (lambda: hp.LoraGAConfig(r=4, init_form="paper_eq8", sketch_size=3), r"^sketch_size=3 .*≥ 4"),
    (lambda: hp.LoraGAConfig(estimator="dense"), r"^estimator='dense' is invalid: expected one of \['auto', 'exact', 'sketch'\]"),
    (lambda: hp.LoraGAConfig(sketch_seed=-1), r"^sketch_seed=-1 is invalid"),
    (lambda: hp.LoraGAConfig(sketch_passes=0), r"^sketch_passes=0 is invalid: expected a positive integer"),
    (lambda: hp.HybridConfig(ga_sketch_passes=1.5), r"^ga_sketch_passes=1.5 is invalid"),
    (lambda: hp.HybridConfig(lora_r=4, ga_sketch_size=2), r"^ga_sketch_size=2 is invalid"),
    (lambda: hp.HybridConfig(ga_estimator="svd"), r"^ga_estimator='svd' is invalid"),
    (lambda: hp.inject(nn.Sequential(nn.Linear(64, 20)), hp.LoraGAConfig(target_modules=["0"], r=2, sketch_size=21)),
     r"cannot adapt '0' \(d_in=64, d_out=20\): sketch_size=21 is invalid: expected at most min\(d_in, d_out\) = 20"),
    (lambda: hp.inject(nn.Sequential(nn.Linear(64, 20)), hp.HybridConfig(target_modules=["0"], lora_r=2, boft_block_size=4,
                                                                          boft_n_factors=1, ga_sketch_size=30)),
     r"ga_sketch_size=30 is invalid: expected at most min\(d_in, d_out\) = 20"),
], ids=["below-2r", "below-r-eq8", "unknown-estimator", "negative-seed", "zero-passes", "hybrid-fractional-passes",
        "hybrid-below-2r", "hybrid-unknown",
        "above-min-d", "hybrid-above-min-d"])
def test_bad_sketch_settings_name_the_field_and_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_lora_ga_init_rejects_unknown_estimator_and_source():
    model = hp.inject(tiny_models.tiny_llama(torch.float64), hp.LoraGAConfig(target_modules=TARGETS, r=2))
    with pytest.raises(ValueError, match=r"^estimator='svd' is invalid"):
        hp.lora_ga_init(model, lm_batches(1), num_batches=1, estimator="svd")
    with pytest.raises(ValueError, match=r"^gradient_source='weights' is invalid"):
        hp.lora_ga_init(model, lm_batches(1), num_batches=1, gradient_source="weights")
