"""Riemannian optimizers and build_optimizer: descent, orthogonality, schedulers, state round trip."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import hybridpeft as hp
from hybridpeft.optim import CombinedOptimizer, RiemannianAdam, RiemannianSGD, build_optimizer, retract, skew_direction

transformers = pytest.importorskip("transformers")

K, C, M = 3, 6, 20  # blocks, block size, samples


def procrustes(seed=0):
    """Blocks U (start I), a random rotation T (det +1, so reachable from I) and data X."""
    torch.manual_seed(seed)
    s = torch.randn(K, C, C, dtype=torch.float64)
    target = torch.linalg.matrix_exp(s - s.transpose(-1, -2))  # (K, C, C)
    x = torch.randn(K, C, M, dtype=torch.float64) / M**0.5  # (K, C, M)
    u = nn.Parameter(torch.eye(C, dtype=torch.float64).repeat(K, 1, 1))
    return u, target, x


def loss_fn(u, target, x):
    return ((u - target) @ x).square().sum()


def orthogonality_error(u):
    eye = torch.eye(u.shape[-1], dtype=u.dtype)
    return (u.transpose(-1, -2) @ u - eye).abs().max().item()


def fit(opt_factory, steps=1000):
    u, target, x = procrustes()
    opt = opt_factory([u])
    first = loss_fn(u, target, x).item()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(u, target, x)
        loss.backward()
        opt.step()
    return first, loss_fn(u, target, x).item(), u.detach()


@pytest.mark.parametrize("retraction", ["cayley", "exp"])
def test_sgd_fits_orthogonal_target_and_stays_orthogonal(retraction):
    first, last, u = fit(lambda ps: RiemannianSGD(ps, lr=0.1, retraction=retraction))
    assert last < 1e-8 * first
    assert orthogonality_error(u) < 1e-6  # no re-orthonormalization was needed in 1,000 steps


@pytest.mark.parametrize("retraction", ["cayley", "exp"])
def test_momentum_and_adam_variants_fit_too(retraction):
    for factory in (lambda ps: RiemannianSGD(ps, lr=0.05, momentum=0.9, retraction=retraction),
                    lambda ps: RiemannianAdam(ps, lr=0.01, retraction=retraction)):
        first, last, u = fit(factory, steps=400)
        assert last < 1e-4 * first
        assert orthogonality_error(u) < 1e-6


def test_one_step_descends_and_the_papers_sign_ascends():
    u, target, x = procrustes(1)
    with torch.no_grad():
        u.copy_(torch.linalg.qr(torch.randn(K, C, C, dtype=torch.float64)).Q)
    loss = loss_fn(u, target, x)
    loss.backward()
    a = skew_direction(u.grad, u.detach())
    for retraction in ("cayley", "exp"):
        down = loss_fn(retract(u.detach(), a, 1e-3, retraction), target, x)
        up = loss_fn(retract(u.detach(), a, -1e-3, retraction), target, x)  # exp(+ηB) U, as eq. 12 writes it
        assert down < loss < up


def test_direction_is_skew_and_retractions_agree_to_second_order():
    torch.manual_seed(2)
    u = torch.linalg.qr(torch.randn(4, 5, 5, dtype=torch.float64)).Q
    a = skew_direction(torch.randn(4, 5, 5, dtype=torch.float64), u)
    assert torch.allclose(a, -a.transpose(-1, -2))
    gaps = [(retract(u, a, eta, "cayley") - retract(u, a, eta, "exp")).abs().max().item() for eta in (1e-2, 1e-3)]
    assert gaps[1] < gaps[0] / 500  # O(η³): a 10× smaller step shrinks the gap ~1000×


def test_stiefel_tall_matrices_keep_orthonormal_columns():
    torch.manual_seed(3)
    u = nn.Parameter(torch.linalg.qr(torch.randn(2, 8, 3, dtype=torch.float64)).Q)  # (2, 8, 3)
    target = torch.randn(2, 8, 3, dtype=torch.float64)
    opt = RiemannianSGD([u], lr=0.05)
    first = (u - target).square().sum().item()
    for _ in range(200):
        opt.zero_grad()
        (u - target).square().sum().backward()
        opt.step()
    assert (u - target).square().sum().item() < first
    assert orthogonality_error(u.detach()) < 1e-10


def test_low_precision_parameters_step_in_float32():
    u = nn.Parameter(torch.eye(4, dtype=torch.bfloat16).repeat(2, 1, 1))
    u.grad = torch.randn(2, 4, 4).to(torch.bfloat16)
    RiemannianSGD([u], lr=0.1).step()
    assert u.dtype == torch.bfloat16 and torch.isfinite(u).all() and not torch.equal(u, torch.eye(4).repeat(2, 1, 1).bfloat16())


def test_closure_is_evaluated():
    u, target, x = procrustes()
    opt = RiemannianAdam([u], lr=0.01)

    def closure():
        opt.zero_grad()
        loss = loss_fn(u, target, x)
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(loss_fn(procrustes()[0], target, x).item())


@pytest.mark.parametrize(
    "make, field",
    [(lambda p: RiemannianSGD(p, lr=-1.0), "lr"), (lambda p: RiemannianSGD(p, retraction="qr"), "retraction"),
     (lambda p: RiemannianSGD(p, momentum=1.0), "momentum"), (lambda p: RiemannianAdam(p, betas=(0.9, 1.0)), "betas"),
     (lambda p: RiemannianAdam(p, eps=0.0), "eps")],
)
def test_bad_arguments_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make([nn.Parameter(torch.eye(3))])


def test_wide_parameters_are_refused():
    with pytest.raises(ValueError, match=r"n >= p.*\(3, 5\)"):
        RiemannianSGD([nn.Parameter(torch.zeros(3, 5))])


# build_optimizer on models


def tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def full_unitary_model(**kw):
    config = hp.UnitaryConfig(target_modules=["q_proj", "down_proj"], parameterization="full", block_size=8,
                              trainable_modules=["lm_head"], **kw)
    return hp.inject(tiny_llama(), config)


def blocks_of(model):
    return [p for _, layer in hp.adapted_layers(model) for p in layer.adapter.manifold_parameters()]


def test_manifold_tensors_go_to_riemannian_optimizer_and_the_rest_to_adamw():
    model = full_unitary_model()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, CombinedOptimizer)
    adamw, riemannian = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(riemannian, RiemannianAdam)
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    in_riemannian = {id(p) for g in riemannian.param_groups for p in g["params"]}
    assert in_riemannian == {id(p) for p in blocks_of(model)}
    assert in_adamw == {id(p) for p in hp.trainable_parameters(model).values()} - in_riemannian
    assert id(model.lm_head.weight) in in_adamw
    assert isinstance(build_optimizer(model, riemannian="sgd").optimizers[1], RiemannianSGD)


def test_without_manifold_tensors_plain_adamw():
    model = hp.inject(tiny_llama(), hp.UnitaryConfig(target_modules=["q_proj"]))  # structured
    opt = build_optimizer(model, lr=1e-3)
    assert type(opt) is torch.optim.AdamW


def test_retraction_follows_config_unless_overridden():
    model = full_unitary_model(retraction="exp")
    groups = build_optimizer(model).optimizers[1].param_groups
    assert [g["retraction"] for g in groups] == ["exp"]
    groups = build_optimizer(model, retraction="cayley").optimizers[1].param_groups
    assert [g["retraction"] for g in groups] == ["cayley"]


def run_steps(model, opt, steps, scheduler=None):
    torch.manual_seed(5)
    x = torch.randint(0, 64, (2, 8))
    losses = []
    for _ in range(steps):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        hp.after_optimizer_step(model)
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def test_training_with_built_optimizer_lowers_loss_and_keeps_blocks_orthogonal():
    model = full_unitary_model()
    losses = run_steps(model, build_optimizer(model, lr=1e-2), 15)
    assert losses[-1] < 0.9 * losses[0]
    for p in blocks_of(model):
        assert orthogonality_error(p.detach().double()) < 1e-5
        assert (p - torch.eye(8)).abs().max() > 1e-3  # the blocks themselves moved


def test_lambda_lr_scheduler_drives_every_group():
    model = full_unitary_model()
    opt = build_optimizer(model, lr=1e-2, riemannian_lr=0.5, riemannian="sgd")
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    run_steps(model, opt, 3, scheduler)
    adamw, riemannian = opt.optimizers
    assert adamw.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    assert riemannian.param_groups[0]["lr"] == pytest.approx(0.5 / 4)
    assert scheduler.get_last_lr() == pytest.approx([1e-2 / 4, 0.5 / 4])


def test_state_dict_round_trip_continues_identically():
    model_a, model_b = full_unitary_model(), full_unitary_model()
    opt_a, opt_b = build_optimizer(model_a, lr=1e-2), build_optimizer(model_b, lr=1e-2)
    run_steps(model_a, opt_a, 2)
    model_b.load_state_dict(model_a.state_dict())
    buffer = io.BytesIO()  # through bytes, as a checkpoint would: load_state_dict may alias tensors
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer))
    assert opt_b.optimizers[1].state[blocks_of(model_b)[0]]["step"] == 2
    run_steps(model_a, opt_a, 1)
    run_steps(model_b, opt_b, 1)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_zero_grad_clears_every_child_and_groups_cannot_be_added():
    model = full_unitary_model()
    opt = build_optimizer(model)
    x = torch.randint(0, 64, (1, 4))
    model(x, labels=x).loss.backward()
    opt.zero_grad()
    assert all(p.grad is None for p in hp.trainable_parameters(model).values())
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def test_nothing_trainable_is_an_error():
    model = nn.Linear(2, 2)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model)
