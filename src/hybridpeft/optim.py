"""Riemannian optimizers for orthogonal blocks, and ``build_optimizer`` for a whole model.

A parameter ``U`` of shape ``(..., n, p)`` (``n ≥ p``; square for the unitary
adapter's blocks) with ``UᵀU = I`` is moved along the manifold. With the Euclidean
gradient ``G = ∂L/∂U`` (Wisdom et al. 2016, after Tagare):

    A = G Uᵀ − U Gᵀ                                (n × n, skew-symmetric)
    Cayley:  U ← (I + η/2 A)⁻¹ (I − η/2 A) U
    exp:     U ← exp(−η A) U

Both factors are orthogonal for every ``η`` because ``A`` is skew, so ``UᵀU = I``
is kept up to rounding. The first-order change ``−η A U`` descends:
``⟨G, −A U⟩ = −(‖G‖² − tr((GᵀU)²)) ≤ 0``. (The paper's eq. 12 writes ``exp(+η B)``,
which ascends the loss.)
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.optim import AdamW, Optimizer

from . import distributed
from .adapters.unitary import RETRACTIONS
from .checks import check
from .inject import adapted_layers


def skew_direction(grad: Tensor, u: Tensor) -> Tensor:
    """``A = G Uᵀ − U Gᵀ`` for batched G, U: (..., n, p) -> (..., n, n)."""
    return grad @ u.transpose(-1, -2) - u @ grad.transpose(-1, -2)


def retract(u: Tensor, direction: Tensor, lr: float, retraction: str) -> Tensor:
    """Move ``u`` (..., n, p) by ``−lr · direction`` (..., n, n skew) and stay on the manifold."""
    if retraction == "exp":
        return torch.linalg.matrix_exp(-lr * direction) @ u
    eye = torch.eye(direction.shape[-1], dtype=direction.dtype, device=direction.device)
    half = (lr / 2) * direction
    return torch.linalg.solve_ex(eye + half, (eye - half) @ u)[0]  # (I + η/2 A)⁻¹ (I − η/2 A) U


def _check_manifold_param(p: Tensor) -> None:
    if p.dim() < 2 or p.shape[-2] < p.shape[-1]:
        raise ValueError(f"Riemannian optimizers need parameters of shape (..., n, p) with n >= p; "
                         f"got shape {tuple(p.shape)}")


class _RiemannianBase(Optimizer):
    """Shared step loop: compute in ≥ float32, retract, write back in the parameter dtype."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        check(defaults["lr"] >= 0, "lr", defaults["lr"], "a non-negative number")
        check(defaults["retraction"] in RETRACTIONS, "retraction", defaults["retraction"],
              " or ".join(repr(r) for r in RETRACTIONS))
        super().__init__(params, defaults)
        for group in self.param_groups:
            check(group["retraction"] in RETRACTIONS, "retraction", group["retraction"],
                  " or ".join(repr(r) for r in RETRACTIONS))
            for p in group["params"]:
                _check_manifold_param(p)

    def _direction(self, state: dict[str, Any], a: Tensor, group: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                # Every matrix moves on its own, so a sharded (FSDP) parameter steps on the whole
                # matrices this rank holds: dim 0 indexes the matrices, and FSDP splits only dim 0.
                piece = distributed.local(p)  # (..., n, p), a view of this rank's matrices
                dtype = torch.promote_types(p.dtype, torch.float32)
                u, g = piece.to(dtype), distributed.local(p.grad).to(dtype)
                state = {k: distributed.local(v) if torch.is_tensor(v) else v for k, v in self.state[p].items()}
                direction = self._direction(state, skew_direction(g, u), group)  # (..., n, n)
                piece.copy_(retract(u, direction, group["lr"], group["retraction"]).to(p.dtype))
                # state pieces are kept sharded like p, so checkpoints gather them like AdamW's
                self.state[p].update({k: distributed.like(p, v) if torch.is_tensor(v) else v for k, v in state.items()})
        return loss


class RiemannianSGD(_RiemannianBase):
    """Gradient descent on the orthogonal group / Stiefel manifold (the paper's Algorithm 1).

    Args:
        params: tensors of shape (..., n, p), n ≥ p, with orthonormal columns.
        lr: step size η.
        retraction: ``"cayley"`` or ``"exp"``.
        momentum: heavy-ball coefficient μ; the buffer accumulates the skew
            directions ``M ← μ M + A`` (left-trivialized, so it stays skew and can
            be applied at the next point).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, retraction: str = "cayley",
                 momentum: float = 0.0) -> None:
        check(0.0 <= momentum < 1.0, "momentum", momentum, "a number in [0, 1)")
        super().__init__(params, dict(lr=lr, retraction=retraction, momentum=momentum))

    def _direction(self, state: dict[str, Any], a: Tensor, group: dict[str, Any]) -> Tensor:
        if group["momentum"] == 0:
            return a
        buf = state.get("momentum_buffer")
        state["momentum_buffer"] = a if buf is None else buf.mul_(group["momentum"]).add_(a)
        return state["momentum_buffer"]


class RiemannianAdam(_RiemannianBase):
    """Adam-style steps on the manifold with one adaptive scale per matrix.

    ``m ← β1 m + (1 − β1) A`` (skew, like ``A``), ``v ← β2 v + (1 − β2) mean(A²)`` per
    matrix, direction ``m̂ / (√v̂ + ε)``. A per-entry second moment would break the
    skew symmetry (and so orthogonality); a scalar per matrix keeps it while making
    the step size insensitive to the gradient scale, so ``lr`` means roughly what it
    means for AdamW (entries of ``U`` move by about ``lr`` per step).

    Args:
        params: tensors of shape (..., n, p), n ≥ p, with orthonormal columns.
        lr: step size.
        betas: decay rates of the first and second moments.
        eps: added to ``√v̂``.
        retraction: ``"cayley"`` or ``"exp"``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, retraction: str = "cayley") -> None:
        check(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), "betas", betas, "two numbers in [0, 1)")
        check(eps > 0, "eps", eps, "a positive number")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, retraction=retraction))

    def _direction(self, state: dict[str, Any], a: Tensor, group: dict[str, Any]) -> Tensor:
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(a)  # (..., n, n)
            state["exp_avg_sq"] = torch.zeros(a.shape[:-2], dtype=a.dtype, device=a.device)  # (...,)
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].mul_(beta1).add_(a, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).add_(a.square().mean(dim=(-2, -1)), alpha=1 - beta2)
        m_hat = state["exp_avg"] / (1 - beta1**t)
        v_hat = state["exp_avg_sq"] / (1 - beta2**t)
        return m_hat / (v_hat.sqrt() + group["eps"])[..., None, None]


class CombinedOptimizer(Optimizer):
    """Several optimizers stepped as one (AdamW for ordinary tensors, a Riemannian one for blocks).

    ``param_groups`` is the concatenation of the children's group dicts (the same
    objects), so LR schedulers, gradient clipping and accelerate see every group.
    Per-parameter state lives in the children (``self.optimizers[i].state``).
    """

    def __init__(self, optimizers: list[Optimizer]) -> None:
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)
        params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        self._constructed = False
        super().__init__(params, {})  # sets up the hook machinery schedulers rely on
        self._constructed = True
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"state has {len(states)} optimizers, this CombinedOptimizer has {len(self.optimizers)}")
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._constructed:  # which child would own the group is ambiguous
            raise NotImplementedError("add groups to one of CombinedOptimizer.optimizers instead")
        super().add_param_group(param_group)


def build_optimizer(
    model: nn.Module,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    riemannian_lr: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    riemannian: str = "adam",
    momentum: float = 0.0,
    retraction: str | None = None,
    branch_lr: Mapping[str, float | None] | None = None,
) -> Optimizer:
    """AdamW for the trainable tensors, a Riemannian optimizer for adapters' manifold tensors.

    Manifold tensors are those returned by ``adapter.manifold_parameters()`` of the
    model's adapted layers (the full-capacity unitary blocks); they are grouped by
    the adapter's ``retraction`` unless ``retraction`` overrides it.

    Args:
        model: a model with (or without) hybridpeft adapters.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (never applied to manifold tensors).
        riemannian_lr: step size of the Riemannian optimizer; ``None`` uses ``lr``
            (sensible for ``"adam"``, whose steps are scale-free; SGD on the manifold
            usually wants a larger one).
        betas, eps: AdamW's, shared with ``RiemannianAdam``.
        riemannian: ``"adam"`` (``RiemannianAdam``) or ``"sgd"`` (``RiemannianSGD``,
            the paper's Algorithm 1).
        momentum: ``RiemannianSGD`` momentum.
        retraction: ``"cayley"``/``"exp"`` for every manifold tensor, or ``None``.
        branch_lr: a learning rate per adapter branch (``adapter.branch_parameters()``),
            e.g. ``{"lora": 1e-3, "boft": 5e-3}`` for the Hybrid's η_LoRA and η_BOFT;
            each named branch becomes its own AdamW parameter group. ``None`` values
            and branches not named keep ``lr``.

    Returns:
        plain ``AdamW`` if there are no manifold tensors, else a ``CombinedOptimizer``.

    Raises:
        ValueError: nothing trains, a ``branch_lr`` name is no branch of the model's
            adapters, or an argument is invalid (named).
    """
    check(riemannian in ("adam", "sgd"), "riemannian", riemannian, "'adam' or 'sgd'")
    check(retraction is None or retraction in RETRACTIONS, "retraction", retraction, "None, 'cayley' or 'exp'")
    wanted = {name: value for name, value in (branch_lr or {}).items() if value is not None}
    for name, value in wanted.items():
        check(isinstance(value, (int, float)) and value > 0, f"branch_lr[{name!r}]", value, "a positive number")
    manifold: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for _, layer in adapted_layers(model):
        for p in layer.adapter.manifold_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                manifold.setdefault(retraction or getattr(layer.adapter, "retraction", "cayley"), []).append(p)
    branches: dict[str, list[nn.Parameter]] = {name: [] for name in wanted}
    found: set[str] = set()
    for _, layer in adapted_layers(model):
        for name, params in layer.adapter.branch_parameters().items():
            found.add(name)
            if name in branches:
                branches[name] += [p for p in params if p.requires_grad and id(p) not in seen]
    unknown = sorted(set(wanted) - found)
    check(not unknown, "branch_lr", dict(branch_lr or {}),
          f"branch names among {sorted(found)} (the model's adapters have no branch {unknown})" if found
          else "None: the model's adapters have no separately tunable branches (only the Hybrid has them)")
    in_branch = {id(p) for params in branches.values() for p in params}
    euclidean = [p for p in model.parameters() if p.requires_grad and id(p) not in seen and id(p) not in in_branch]
    if not euclidean and not manifold and not in_branch:
        raise ValueError("model has no trainable parameters")
    optimizers: list[Optimizer] = []
    if in_branch:  # one AdamW, a parameter group per named branch (schedulers scale each group's lr)
        groups = [{"params": euclidean, "lr": lr, "branch": "default"}] if euclidean else []
        groups += [{"params": params, "lr": wanted[name], "branch": name} for name, params in branches.items() if params]
        optimizers.append(AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
    elif euclidean:
        optimizers.append(AdamW(euclidean, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
    if manifold:
        groups = [{"params": ps, "retraction": r} for r, ps in manifold.items()]
        step = lr if riemannian_lr is None else riemannian_lr
        if riemannian == "adam":
            optimizers.append(RiemannianAdam(groups, lr=step, betas=betas, eps=eps))
        else:
            optimizers.append(RiemannianSGD(groups, lr=step, momentum=momentum))
    return optimizers[0] if len(optimizers) == 1 else CombinedOptimizer(optimizers)
