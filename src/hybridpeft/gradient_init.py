"""LoRA-GA's start for a whole model: estimate the full-weight gradients, then start A, B on their SVD.

The per-layer adapter (``ΔW = s (B A − B0 A0)``) is ``hybridpeft.adapters.lora_ga``; this module
runs the model-level part.

``lora_ga_init(model, batches)`` runs on a model injected with ``LoraGAConfig`` or
``HybridConfig``:

1. ``G_ℓ = mean_n ∇_{W_ℓ} L(batch_n)`` over ``num_batches`` batches, for every
   adapted weight ``W_ℓ`` (d_out, d_in). Per-parameter hooks move each gradient
   off the device (CPU, float32, accumulated) as soon as autograd has produced
   it and free it, so peak device memory is ≈ model + activations + one layer's
   gradient rather than model + all gradients. A weight that cannot require
   grad (a bitsandbytes 4-bit base) is estimated from activations instead:
   ``∇_W L = Σ_tokens gᵀ x`` with ``x`` the input of the base matmul and
   ``g = ∂L/∂(W x)``, captured by a hook on the host layer. Under
   ``torch.distributed`` the estimate is averaged over ranks.
   Two ways to keep ``G_ℓ`` (the config's ``estimator``): ``exact`` adds each gradient
   into a dense float32 host accumulator (4 bytes per adapted parameter);
   ``sketch`` keeps only ``Y = G Ω`` and ``Z = Ψ G`` per layer on the device
   (``hybridpeft.gradient_sketch``), summed over ranks by one all-reduce, and never
   forms a d_out × d_in matrix on the activation path.
2. ``U, Σ, V = svd_lowrank(G_ℓ, q = min(4r, d_out, d_in))`` (exact) or the sketch's
   single-pass recovery, and the adapter's ``direction`` / ``scale`` / ``init_form``
   give ``(A0, B0)``; see ``start_factors``.
3. ``A = A0``, ``B = B0`` (trainable) and frozen copies, so the output is unchanged.

A cache (safetensors) of the estimate — dense gradients or sketches — keyed by a hash
of the adapted weights, the batches' content, ``num_batches`` and the sketch's sizes
lets a rerun skip step 1.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import distributed
from .adapters.base import AdaptedLinear, layer_shape
from .adapters.lora_ga import ESTIMATORS, LoraGAAdapter, LoraGAConfig
from .checks import check, is_int
from .gradient_sketch import LowRankGradient, SketchBank
from .inject import adapted_layers, config_of

LossFn = Callable[[nn.Module, Any], Tensor]
CACHE_VERSION = "1"
GRADIENT_SOURCES = ("auto", "activations")
# "auto" keeps the exact estimate while its float32 host accumulators total at most this (4 GiB:
# ~1.07e9 adapted parameters, e.g. every projection of a 1B Llama); above, the sketch.
AUTO_EXACT_MAX_BYTES = 4 * 2**30


# ---------------------------------------------------------------------------
# Gradient estimation


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """``model(**batch).loss`` with the batch's tensors moved to the model's device."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"default loss needs a dict-like batch (e.g. input_ids, labels), got {type(batch).__name__}; pass loss_fn")
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()})
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("model output has no loss; give the batch labels or pass loss_fn")
    return loss


GradSink = Callable[[str, Tensor], None]  # (name, ∇_W in the parameter's layout) -> None
OuterSink = Callable[[str, Tensor, Tensor], None]  # (name, g (..., d_out), x (..., d_in)) -> None


def run_backward_passes(
    model: nn.Module,
    weights: Mapping[str, nn.Parameter],
    batches: Iterable[Any],
    *,
    num_batches: int,
    loss_fn: LossFn,
    hosts: Mapping[str, AdaptedLinear],
    on_grad: GradSink,
    on_outer: OuterSink,
) -> int:
    """Run forward + backward on up to ``num_batches`` batches and hand every gradient to a sink.

    Only ``weights`` require grad while this runs (everything else is frozen; the previous
    flags and any existing ``.grad`` are restored afterwards). A post-accumulate hook on
    each weight calls ``on_grad(name, grad)`` and drops the gradient, so at most the
    gradients autograd is producing at one moment live on the device. For each host (a
    layer whose ``W`` never requires grad, e.g. 4-bit), a base hook keeps the base matmul's
    input ``x`` and a tensor hook on its output ``h = W x`` calls ``on_outer(name, g, x)``
    with ``g = ∂L/∂h`` when backward reaches it (``∇_W L = gᵀ x``, whatever the adapter does
    with ``h``). If nothing upstream of ``h`` needs a gradient, ``h`` is made a leaf that
    does, so the loss still reaches it. The model's train/eval mode is left as it is.

    Returns:
        the number of batches used.

    Raises:
        ValueError: ``batches`` yields no batch, a weight or host got no gradient, or a
            name is in both ``weights`` and ``hosts``.
    """
    both = sorted(set(weights) & set(hosts))
    if both:
        raise ValueError(f"{both} are in both weights and hosts; estimate each once")
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    stashed = {name: w.grad for name, w in weights.items()}
    seen = {name: 0 for name in [*weights, *hosts]}

    def offload(name: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            on_grad(name, param.grad.detach())
            seen[name] += 1
            param.grad = None  # free the device copy now, not at the end of backward
        return hook

    def observe(name: str) -> Callable[[Tensor, Tensor], None]:
        def hook(x: Tensor, h: Tensor) -> None:
            if not torch.is_grad_enabled():
                return
            x = x.detach()

            def add(g: Tensor) -> None:
                on_outer(name, g, x)
                seen[name] += 1

            def add_and_drop(leaf: Tensor) -> None:
                add(leaf.grad)
                leaf.grad = None

            if h.requires_grad:
                h.register_hook(add)
            else:  # h is a leaf (nothing before it trains): let it take a gradient, then drop it
                h.requires_grad_(True)
                h.register_post_accumulate_grad_hook(add_and_drop)
        return hook

    handles = []
    count = 0
    try:
        for p in params:
            p.requires_grad_(False)
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(offload(name)))
        for name, host in hosts.items():
            handles.append(host.register_base_hook(observe(name)))
        for batch in islice(batches, num_batches):
            loss_fn(model, batch).backward()
            count += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for name, w in weights.items():
            w.grad = stashed[name]
    if count == 0:
        raise ValueError("batches yielded no batch; lora_ga_init needs at least one")
    unreached = sorted(n for n, k in seen.items() if k == 0)
    if unreached:
        raise ValueError(f"the loss does not depend on {unreached}; they got no gradient")
    return count


def estimate_gradients(
    model: nn.Module,
    weights: Mapping[str, nn.Parameter],
    batches: Iterable[Any],
    *,
    num_batches: int,
    loss_fn: LossFn = default_loss,
    hosts: Mapping[str, AdaptedLinear] | None = None,
) -> dict[str, Tensor]:
    """The exact estimate: ``mean_n ∇_w L(batch_n)`` for each ``w`` in ``weights`` (CPU float32,
    in ``w``'s layout) and for each host layer's frozen ``W`` (CPU float32, (d_out, d_in)).

    Each gradient is added into a dense CPU float32 accumulator (4 bytes per adapted
    parameter on the host) as ``run_backward_passes`` hands it over; a host's ``gᵀ x``
    (tokens flattened, float32 at least) is formed on the device, one layer at a time.

    Args:
        model: any module whose forward reaches ``weights`` and ``hosts``.
        weights: name → parameter (e.g. the adapted layers' frozen weights).
        batches: an iterable (list, DataLoader); the first ``num_batches`` are used.
        num_batches: how many batches to average.
        loss_fn: ``(model, batch) -> scalar loss``.
        hosts: name → adapted layer whose ``W`` is estimated from activations (names
            distinct from ``weights``').

    Raises:
        ValueError: see ``run_backward_passes``.
    """
    hosts = dict(hosts or {})
    sums = {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}  # CPU
    for name, host in hosts.items():
        d_in, d_out = layer_shape(host.base_layer)
        sums[name] = torch.zeros(d_out, d_in, dtype=torch.float32)  # CPU

    def add_grad(name: str, grad: Tensor) -> None:
        sums[name].add_(grad.to("cpu").float())

    def add_outer(name: str, g: Tensor, x: Tensor) -> None:
        math_dtype = torch.promote_types(g.dtype, torch.float32)
        gx = g.reshape(-1, g.shape[-1]).to(math_dtype).t() @ x.reshape(-1, x.shape[-1]).to(math_dtype)
        sums[name].add_(gx.to("cpu", torch.float32))  # (d_out, d_in)

    count = run_backward_passes(model, weights, batches, num_batches=num_batches, loss_fn=loss_fn, hosts=hosts,
                                on_grad=add_grad, on_outer=add_outer)
    return {name: s.div_(count) for name, s in sums.items()}


def sketch_gradients(
    model: nn.Module,
    weights: Mapping[str, nn.Parameter],
    batches: Iterable[Any],
    bank: SketchBank,
    *,
    num_batches: int,
    loss_fn: LossFn = default_loss,
    hosts: Mapping[str, AdaptedLinear] | None = None,
    transposed: Iterable[str] = (),
) -> SketchBank:
    """One pass of the sketched estimate: every sketch in ``bank`` sums its pass's products of the
    mean gradient ``Ḡ`` of each weight and host (``Y = Ḡ Ω``, ``Z = Ψ Ḡ`` for the single pass; see
    ``hybridpeft.gradient_sketch``), averaged over the batches and, in one all-reduce, the ranks.
    Call it ``bank.passes`` times on the same batches.

    A weight's gradient updates its sketch as soon as autograd produces it (two GEMMs
    with ``k``/``l`` columns) and is then dropped; nothing of size d_out × d_in is kept.
    A host's sketch is updated from ``g`` and ``x`` directly (``gᵀ (x Ω)``, ``(Ψ gᵀ) x``),
    so no d_out × d_in tensor is ever formed for it.

    Args:
        bank: the sketches, one per name in ``weights`` and ``hosts``.
        transposed: names whose parameter is stored (d_in, d_out) (GPT-2 ``Conv1D``).
        The rest as for ``estimate_gradients``.
    """
    hosts = dict(hosts or {})
    flipped = set(transposed)

    def add_grad(name: str, grad: Tensor) -> None:
        bank[name].add_matrix(grad.t() if name in flipped else grad)

    def add_outer(name: str, g: Tensor, x: Tensor) -> None:
        bank[name].add_outer(g, x)

    count = run_backward_passes(model, weights, batches, num_batches=num_batches, loss_fn=loss_fn, hosts=hosts,
                                on_grad=add_grad, on_outer=add_outer)
    bank.finish_pass(count)
    return bank


def all_reduce_mean(grads: dict[str, Tensor], devices: Mapping[str, torch.device]) -> None:
    """Average ``grads`` (in place) over the ranks of the default process group, if one is running."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    on_cpu = dist.get_backend() == "gloo"
    for name, g in grads.items():
        buf = g if on_cpu else g.to(devices[name])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        g.copy_(buf.to("cpu")).div_(world)


# ---------------------------------------------------------------------------
# Start factors from the gradient


def start_factors(
    grad: Tensor | LowRankGradient,
    config: LoraGAConfig,
    *,
    scaling: float,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(A0, B0)`` of shapes ``(r, d_in)``, ``(d_out, r)`` from a gradient ``G`` (d_out, d_in).

    ``G`` is either dense — then ``U, Σ, V = svd_lowrank(G, q = min(4r, d_out, d_in),
    niter = config.svd_niter)`` — or already its leading singular triplets (the sketch's
    ``LowRankGradient``, at least ``rank_needed()`` of them). Then the ``direction`` picks
    columns of ``V`` for ``A0`` and of ``U`` for ``B0`` (or ``init_form="paper_eq8"`` takes
    ``B0 = U_r Σ_r^{1/2}``, ``A0 = Σ_r^{1/2} V_rᵀ``), and both are multiplied by the
    ``scale`` factor (see ``LoraGAConfig``).

    Args:
        grad: the estimated gradient, (d_out, d_in), or its ``LowRankGradient``.
        config: direction, scale, stable_gamma, init_form, r, svd_niter.
        scaling: the adapter's ``s`` (used by ``"gd"`` and ``"weight_svd"``).
        weight: the frozen ``W`` (d_out, d_in); required by ``scale="weight_svd"``.

    Raises:
        ValueError: ``scale="weight_svd"`` without ``weight``, or a low-rank ``grad`` with
            fewer than ``rank_needed()`` triplets.
    """
    r = config.r
    if isinstance(grad, LowRankGradient):
        u, s, v = grad.u.float(), grad.s.float(), grad.v.float()
        if s.numel() < config.rank_needed():
            raise ValueError(f"the low-rank gradient has {s.numel()} singular triplets; the start needs "
                             f"{config.rank_needed()}")
    else:
        g = grad.float()
        q = min(4 * r, *g.shape)
        u, s, v = torch.svd_lowrank(g, q=q, niter=config.svd_niter)  # (d_out, q), (q,), (d_in, q)
    d_out = u.shape[0]
    if config.init_form == "paper_eq8":
        root = s[:r].sqrt()  # (r,)
        a0, b0 = root[:, None] * v[:, :r].t(), u[:, :r] * root[None, :]
    else:
        a_idx, b_idx = _direction_indices(config.direction, r)
        a0, b0 = v[:, a_idx].t(), u[:, b_idx]  # (r, d_in), (d_out, r)
    c = _scale_factor(config, d_out=d_out, scaling=scaling, weight=weight)
    return (a0 * c).contiguous(), (b0 * c).contiguous()


def _direction_indices(direction: str, r: int) -> tuple[Tensor, Tensor]:
    """Indices into the singular vectors for A0 (rows of Vᵀ) and B0 (columns of U)."""
    idx = torch.arange(2 * r)
    if direction == "ArB2r":
        return idx[:r], idx[r:]
    if direction == "A2rBr":
        return idx[r:], idx[:r]
    if direction == "ArBr":
        return idx[1::2], idx[0::2]
    perm = torch.randperm(2 * r)  # "random"
    return perm[:r], perm[r:]


def _scale_factor(config: LoraGAConfig, *, d_out: int, scaling: float, weight: Tensor | None) -> float:
    if config.scale == "stable":
        return d_out ** 0.25 / math.sqrt(config.stable_gamma)
    if config.scale == "gd":
        return 1.0 / scaling
    if config.scale == "weight_svd":
        if weight is None:
            raise ValueError("scale='weight_svd' needs the frozen weight")
        w = weight.detach().float()
        _, sw, _ = torch.svd_lowrank(w, q=min(4 * config.r, *w.shape), niter=config.svd_niter)
        return (sw[: config.r] / scaling).sqrt().mean().item()
    return 1.0  # "unit"


# ---------------------------------------------------------------------------
# Cache


def _hash_value(h: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            h.update(f"K{key!r}".encode())
            _hash_value(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _hash_value(h, item)
    else:
        h.update(f"V{value!r}".encode())


def _weight_fingerprint(h: "hashlib._Hash", name: str, weight: Tensor) -> None:
    # A strided sample plus the float64 sum identifies a weight without hashing all its bytes.
    w = weight.detach()
    flat = w.reshape(-1)
    step = max(1, flat.numel() // 4096)
    h.update(f"W{name}{w.dtype}{tuple(w.shape)}{w.double().sum().item():.17g}".encode())
    _hash_value(h, flat[::step])


def cache_key(model: nn.Module, weights: Mapping[str, Tensor], batches: Sequence[Any], num_batches: int, loss_fn: LossFn,
              *, estimate: str = "exact") -> str:
    """A hex digest of the model class, the adapted weights, the batches, the loss function's name
    and ``estimate`` (what the file holds: ``"exact"``, or the sketch's sizes and seed)."""
    h = hashlib.sha256(f"lora-ga-grad v{CACHE_VERSION} {type(model).__qualname__} n={num_batches}".encode())
    h.update(getattr(loss_fn, "__qualname__", repr(loss_fn)).encode())
    if estimate != "exact":  # exact keys are unchanged, so existing caches stay valid
        h.update(f"estimate={estimate}".encode())
    for name, w in weights.items():
        _weight_fingerprint(h, name, distributed.local(w))  # the key names the rank
    _hash_value(h, list(batches))
    if dist.is_available() and dist.is_initialized():
        h.update(f"world={dist.get_world_size()} rank={dist.get_rank()}".encode())
    return h.hexdigest()


def _cache_file(cache_dir: str | os.PathLike, key: str, kind: str = "grad") -> Path:
    return Path(cache_dir) / f"lora_ga_{kind}-{key[:24]}.safetensors"


def _read_cache(path: Path, names: Iterable[str]) -> dict[str, Tensor] | None:
    if not path.is_file():
        return None
    grads = load_file(str(path))
    return grads if set(grads) == set(names) else None


def _write_cache(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write atomically (a crash leaves the old file or none, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def _agree_on_hit(hit: bool) -> bool:
    # Every rank must take the same path, or the estimating ranks would wait in all-reduce forever.
    if not (dist.is_available() and dist.is_initialized()):
        return hit
    flag = torch.tensor([int(hit)], device="cpu" if dist.get_backend() == "gloo" else torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# ---------------------------------------------------------------------------
# Entry point


def lora_ga_targets(model: nn.Module) -> dict[str, tuple[AdaptedLinear, LoraGAAdapter]]:
    """Adapted layers that carry a LoRA-GA part: name → (host layer, LoRA-GA adapter)."""
    found = {}
    for name, layer in adapted_layers(model):
        part = getattr(layer.adapter, "lora_ga_adapter", None)
        if isinstance(part, LoraGAAdapter):
            found[name] = (layer, part)
    return found


def choose_estimator(estimator: str, adapted_params: int) -> str:
    """``"exact"`` or ``"sketch"``: ``"auto"`` picks exact while its float32 host accumulators
    (``4 × adapted_params`` bytes) stay within ``AUTO_EXACT_MAX_BYTES``."""
    if estimator != "auto":
        return estimator
    return "exact" if 4 * adapted_params <= AUTO_EXACT_MAX_BYTES else "sketch"


def describe_estimate(model: nn.Module) -> str:
    """How ``lora_ga_init`` will keep the estimate of ``model``'s LoRA-GA layers, in words: the
    estimator ``auto`` resolves to, with the exact estimate's host bytes or the sketch's passes."""
    ga = config_of(model).lora_ga_config()
    adapted = sum(d_in * d_out for d_in, d_out in (layer_shape(layer.base_layer) for layer, _ in lora_ga_targets(model).values()))
    if choose_estimator(ga.estimator, adapted) == "exact":
        return f"exact, {4 * adapted / 2**30:.2f} GiB of host accumulators"
    return f"sketch, {ga.sketch_passes} pass{'es' if ga.sketch_passes > 1 else ''}"


def _resolve_estimator(estimator: str | None, gradient_source: str, config_estimator: str) -> tuple[str, str]:
    """(estimator, gradient source) from ``lora_ga_init``'s arguments; ``estimator="activations"``
    is the older spelling of ``gradient_source="activations"``."""
    if estimator == "activations":
        estimator, gradient_source = None, "activations"
    if estimator is not None and estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is invalid: expected one of {list(ESTIMATORS)} "
                         "(or 'activations', the older spelling of gradient_source='activations')")
    if gradient_source not in GRADIENT_SOURCES:
        raise ValueError(f"gradient_source={gradient_source!r} is invalid: expected one of {list(GRADIENT_SOURCES)}")
    return (config_estimator if estimator is None else estimator), gradient_source


def lora_ga_init(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    loss_fn: LossFn = default_loss,
    estimator: str | None = None,
    gradient_source: str = "auto",
) -> dict[str, Tensor | LowRankGradient]:
    """Estimate the gradients of every adapted weight and start its LoRA-GA factors on them.

    Args:
        model: injected with ``LoraGAConfig`` or ``HybridConfig``.
        batches: the data for the estimate (list or DataLoader of dicts for ``default_loss``).
        num_batches: batches to average; default the config's ``num_batches``.
        cache_dir: if given, the estimate (dense gradients, or the sketches) is read from /
            written to a safetensors file there, keyed by ``cache_key``; a hit skips the
            forward/backward passes.
        loss_fn: ``(model, batch) -> loss``; ``default_loss`` calls ``model(**batch).loss``.
        estimator: ``"exact"``, ``"sketch"`` or ``"auto"`` (see ``LoraGAConfig.estimator``);
            ``None`` (default) takes the config's. ``choose_estimator`` resolves ``"auto"``
            from the total adapted parameters, the same on every rank.
        gradient_source: ``"auto"`` (per-parameter gradient hooks on float weights, activations
            ``gᵀ x`` on 4-bit ones) or ``"activations"`` (``gᵀ x`` for every layer, e.g. under
            FSDP where frozen sharded weights produce no full gradient); see ``run_backward_passes``.
            Both give the same ``G`` up to float rounding.

    Returns:
        name → the estimate, for inspection: with the exact estimator the gradient ``G``
        (d_out, d_in), CPU float32; with the sketch its leading ``rank_needed()`` singular
        triplets (``LowRankGradient``, on the weight's device), never a dense matrix.

    Raises:
        ValueError: the model has no LoRA-GA adapters, ``num_batches`` is not positive,
            ``estimator`` or ``gradient_source`` is unknown, or ``offset="subtract"`` meets a
            4-bit base (it cannot be written into packed codes).
    """
    targets = lora_ga_targets(model)
    if not targets:
        raise ValueError(f"model carries method={config_of(model).method!r}; lora_ga_init needs LoraGAConfig or HybridConfig adapters")
    ga_config = config_of(model).lora_ga_config()
    n = ga_config.num_batches if num_batches is None else num_batches
    check(is_int(n) and n > 0, "num_batches", n, "a positive integer")
    estimator, gradient_source = _resolve_estimator(estimator, gradient_source, ga_config.estimator)
    for name, (layer, part) in targets.items():
        if layer.quantized and part.ga_config.offset == "subtract":
            raise ValueError(f"offset='subtract' cannot shift the 4-bit base weight of {name!r}; "
                             "use offset='adapter' (the default), which leaves W untouched")
    _restore_base(targets)  # a second init must estimate on the original W
    shapes = {name: layer_shape(layer.base_layer) for name, (layer, _) in targets.items()}  # (d_in, d_out)
    estimator = choose_estimator(estimator, sum(d_in * d_out for d_in, d_out in shapes.values()))
    weights = {name: layer.base_layer.weight for name, (layer, _) in targets.items()}  # packed codes if 4-bit
    # 4-bit and sharded (FSDP) weights cannot take per-parameter gradient hooks: estimate those from activations
    hosts = {name: layer for name, (layer, _) in targets.items()
             if layer.quantized or gradient_source == "activations" or distributed.is_sharded(layer.base_layer.weight)}
    params = {name: w for name, w in weights.items() if name not in hosts}
    chosen = list(islice(batches, n))
    if estimator == "sketch":
        estimates = _sketch_estimate(model, targets, shapes, weights, params, hosts, chosen, n, loss_fn, cache_dir)
    else:
        estimates = _exact_estimate(model, targets, weights, params, hosts, chosen, n, loss_fn, cache_dir)
    for name, (layer, part) in targets.items():
        # the SVD runs where the weight lives (one layer's gradient there at a time)
        estimate = estimates[name]
        if isinstance(estimate, Tensor):
            estimate = estimate.to(layer.base_layer.weight.device)
        # a 4-bit W is dequantized here, a sharded one gathered (every rank takes this branch alike)
        weight = distributed.full(layer.weight) if part.ga_config.scale == "weight_svd" else None
        a0, b0 = start_factors(estimate, part.ga_config, scaling=part.scaling, weight=weight)
        distributed.broadcast_from_rank0(a0, b0)  # the SVD's random draws may differ between ranks
        part.set_start(a0.to(part.lora_A.device), b0.to(part.lora_B.device))
        if part.ga_config.offset == "subtract":
            _shift_base(layer, part, sign=-1.0)
    return estimates


def _exact_estimate(model, targets, weights, params, hosts, chosen, n, loss_fn, cache_dir) -> dict[str, Tensor]:
    """Dense mean gradients (CPU float32), from the cache or by ``estimate_gradients`` + an all-reduce."""
    grads = None
    path = None
    if cache_dir is not None:
        path = _cache_file(cache_dir, cache_key(model, weights, chosen, n, loss_fn))
        grads = _read_cache(path, weights)
        if not _agree_on_hit(grads is not None):
            grads = None
    if grads is None:
        grads = estimate_gradients(model, params, chosen, num_batches=n, loss_fn=loss_fn, hosts=hosts)
        for name in params:
            if not isinstance(targets[name][0].base_layer, nn.Linear):  # Conv1D stores (d_in, d_out)
                grads[name] = grads[name].t().contiguous()
        all_reduce_mean(grads, {name: w.device for name, w in weights.items()})
        if path is not None:  # per rank: the key includes the rank under torch.distributed
            _write_cache(path, grads)
    return grads


def _sketch_estimate(model, targets, shapes, weights, params, hosts, chosen, n, loss_fn,
                     cache_dir) -> dict[str, LowRankGradient]:
    """Each layer's leading singular triplets, recovered from a ``SketchBank`` filled by
    ``sketch_gradients`` (or read from the cache) and summed over ranks in one all-reduce."""
    configs = {name: part.ga_config for name, (_, part) in targets.items()}
    sizes = {name: configs[name].sketch_size_for(d_in, d_out) for name, (d_in, d_out) in shapes.items()}
    first = next(iter(configs.values()))
    seed, passes = first.sketch_seed, first.sketch_passes
    bank = SketchBank({name: (d_out, d_in, weights[name].device) for name, (d_in, d_out) in shapes.items()},
                      sizes, seed=seed, passes=passes)
    path = None
    hit = False
    if cache_dir is not None:
        spec = f"sketch seed={seed} passes={passes} k=" + ",".join(f"{name}:{k}" for name, k in sizes.items())
        path = _cache_file(cache_dir, cache_key(model, weights, chosen, n, loss_fn, estimate=spec), kind="sketch")
        cached = _read_cache(path, bank.expected_keys())
        hit = _agree_on_hit(cached is not None)
        if hit:
            bank.load_state_dict(cached)
    if not hit:
        transposed = [name for name in params if not isinstance(targets[name][0].base_layer, nn.Linear)]
        for _ in range(passes):  # linear sketches: each pass sums over ranks in one all-reduce
            sketch_gradients(model, params, chosen, bank, num_batches=n, loss_fn=loss_fn, hosts=hosts,
                             transposed=transposed)
        if path is not None:
            _write_cache(path, bank.state_dict())
    return {name: bank[name].low_rank(configs[name].rank_needed()) for name in bank}


@torch.no_grad()
def _shift_base(layer: AdaptedLinear, part: LoraGAAdapter, *, sign: float) -> None:
    """``W ← W + sign · s B0 A0`` in the host's storage; flips ``part.offset_in_base``."""
    if layer.merged:
        raise RuntimeError("unmerge the model before lora_ga_init")
    w = layer.weight  # (d_out, d_in) view of the stored weight
    math_dtype = torch.promote_types(w.dtype, torch.float32)
    w.copy_((w.to(math_dtype) + sign * part.start_delta().to(w.device, math_dtype)).to(w.dtype))
    part.offset_in_base = sign < 0


def _restore_base(targets: Mapping[str, tuple[AdaptedLinear, LoraGAAdapter]]) -> None:
    for layer, part in targets.values():
        if part.offset_in_base:
            _shift_base(layer, part, sign=+1.0)
