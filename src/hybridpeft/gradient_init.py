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
2. ``U, Σ, V = svd_lowrank(G_ℓ, q = min(4r, d_out, d_in))`` and the adapter's
   ``direction`` / ``scale`` / ``init_form`` give ``(A0, B0)``; see ``start_factors``.
3. ``A = A0``, ``B = B0`` (trainable) and frozen copies, so the output is unchanged.

A gradient cache (safetensors) keyed by a hash of the adapted weights, the batches'
content and ``num_batches`` lets a rerun skip step 1.
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
from .adapters.lora_ga import LoraGAAdapter, LoraGAConfig
from .checks import check, is_int
from .inject import adapted_layers, config_of

LossFn = Callable[[nn.Module, Any], Tensor]
CACHE_VERSION = "1"
ESTIMATORS = ("auto", "activations")


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


def estimate_gradients(
    model: nn.Module,
    weights: Mapping[str, nn.Parameter],
    batches: Iterable[Any],
    *,
    num_batches: int,
    loss_fn: LossFn = default_loss,
    hosts: Mapping[str, AdaptedLinear] | None = None,
) -> dict[str, Tensor]:
    """``mean_n ∇_w L(batch_n)`` for each ``w`` in ``weights`` (CPU float32, in ``w``'s layout)
    and for each host layer's frozen ``W`` (CPU float32, (d_out, d_in)).

    Only ``weights`` require grad while this runs (everything else is frozen, the
    previous flags and any existing ``.grad`` are restored afterwards). A
    post-accumulate hook on each weight adds its gradient into a CPU accumulator
    and drops it, so at most the gradients autograd is producing at one moment
    live on the device. The model's train/eval mode is left as it is.

    A host's ``W`` never requires grad (a 4-bit ``W`` cannot): a base hook keeps the
    base matmul's input ``x`` (..., d_in) and a tensor hook on its output ``h = W x``
    adds ``gᵀ x`` (``g = ∂L/∂h``, tokens flattened, float32 at least) into the CPU
    accumulator when backward reaches it. That equals ``∇_W L`` whatever the adapter
    does with ``h``. It holds each host's ``x`` until backward (what autograd keeps
    for a trainable ``W`` anyway). If nothing upstream of ``h`` needs a gradient,
    ``h`` is made a leaf that does, so the loss still reaches it.

    Args:
        model: any module whose forward reaches ``weights`` and ``hosts``.
        weights: name → parameter (e.g. the adapted layers' frozen weights).
        batches: an iterable (list, DataLoader); the first ``num_batches`` are used.
        num_batches: how many batches to average.
        loss_fn: ``(model, batch) -> scalar loss``.
        hosts: name → adapted layer whose ``W`` is estimated from activations (names
            distinct from ``weights``').

    Raises:
        ValueError: ``batches`` yields fewer than one batch, a weight or host got no
            gradient, or a name is in both ``weights`` and ``hosts``.
    """
    hosts = dict(hosts or {})
    both = sorted(set(weights) & set(hosts))
    if both:
        raise ValueError(f"{both} are in both weights and hosts; estimate each once")
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    stashed = {name: w.grad for name, w in weights.items()}
    sums = {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}  # CPU
    for name, host in hosts.items():
        d_in, d_out = layer_shape(host.base_layer)
        sums[name] = torch.zeros(d_out, d_in, dtype=torch.float32)  # CPU
    seen = {name: 0 for name in sums}

    def offload(name: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            sums[name].add_(param.grad.detach().to("cpu").float())
            seen[name] += 1
            param.grad = None  # free the device copy now, not at the end of backward
        return hook

    def observe(name: str) -> Callable[[Tensor, Tensor], None]:
        def hook(x: Tensor, h: Tensor) -> None:
            if not torch.is_grad_enabled():
                return
            x = x.detach()

            def add(g: Tensor) -> None:
                math_dtype = torch.promote_types(g.dtype, torch.float32)
                gx = g.reshape(-1, g.shape[-1]).to(math_dtype).t() @ x.reshape(-1, x.shape[-1]).to(math_dtype)
                sums[name].add_(gx.to("cpu", torch.float32))  # (d_out, d_in)
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
    try:
        for p in params:
            p.requires_grad_(False)
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(offload(name)))
        for name, host in hosts.items():
            handles.append(host.register_base_hook(observe(name)))
        count = 0
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
    return {name: s.div_(count) for name, s in sums.items()}


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
    grad: Tensor,
    config: LoraGAConfig,
    *,
    scaling: float,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(A0, B0)`` of shapes ``(r, d_in)``, ``(d_out, r)`` from a gradient ``G`` (d_out, d_in).

    ``U, Σ, V = svd_lowrank(G, q = min(4r, d_out, d_in), niter = config.svd_niter)``;
    then the ``direction`` picks columns of ``V`` for ``A0`` and of ``U`` for ``B0``
    (or ``init_form="paper_eq8"`` takes ``B0 = U_r Σ_r^{1/2}``, ``A0 = Σ_r^{1/2} V_rᵀ``),
    and both are multiplied by the ``scale`` factor (see ``LoraGAConfig``).

    Args:
        grad: the estimated gradient, (d_out, d_in).
        config: direction, scale, stable_gamma, init_form, r, svd_niter.
        scaling: the adapter's ``s`` (used by ``"gd"`` and ``"weight_svd"``).
        weight: the frozen ``W`` (d_out, d_in); required by ``scale="weight_svd"``.

    Raises:
        ValueError: ``scale="weight_svd"`` without ``weight``.
    """
    r = config.r
    g = grad.float()
    d_out, d_in = g.shape
    q = min(4 * r, d_out, d_in)
    u, s, v = torch.svd_lowrank(g, q=q, niter=config.svd_niter)  # (d_out, q), (q,), (d_in, q)
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


def cache_key(model: nn.Module, weights: Mapping[str, Tensor], batches: Sequence[Any], num_batches: int, loss_fn: LossFn) -> str:
    """A hex digest of the model class, the adapted weights, the batches and the loss function's name."""
    h = hashlib.sha256(f"lora-ga-grad v{CACHE_VERSION} {type(model).__qualname__} n={num_batches}".encode())
    h.update(getattr(loss_fn, "__qualname__", repr(loss_fn)).encode())
    for name, w in weights.items():
        _weight_fingerprint(h, name, distributed.local(w))  # the key names the rank
    _hash_value(h, list(batches))
    if dist.is_available() and dist.is_initialized():
        h.update(f"world={dist.get_world_size()} rank={dist.get_rank()}".encode())
    return h.hexdigest()


def _cache_file(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"lora_ga_grad-{key[:24]}.safetensors"


def _read_cache(path: Path, names: Iterable[str]) -> dict[str, Tensor] | None:
    if not path.is_file():
        return None
    grads = load_file(str(path))
    return grads if set(grads) == set(names) else None


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


def lora_ga_init(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    loss_fn: LossFn = default_loss,
    estimator: str = "auto",
) -> dict[str, Tensor]:
    """Estimate the gradients of every adapted weight and start its LoRA-GA factors on them.

    Args:
        model: injected with ``LoraGAConfig`` or ``HybridConfig``.
        batches: the data for the estimate (list or DataLoader of dicts for ``default_loss``).
        num_batches: batches to average; default the config's ``num_batches``.
        cache_dir: if given, the estimate is read from / written to a safetensors file
            there, keyed by ``cache_key``; a hit skips the forward/backward passes.
        loss_fn: ``(model, batch) -> loss``; ``default_loss`` calls ``model(**batch).loss``.
        estimator: ``"auto"`` (per-parameter gradient hooks on float weights, activations
            ``gᵀ x`` on 4-bit ones) or ``"activations"`` (``gᵀ x`` for every layer); see
            ``estimate_gradients``. Both give the same ``G`` up to float rounding.

    Returns:
        name → the estimated gradient ``G`` (d_out, d_in), CPU float32 (for inspection).

    Raises:
        ValueError: the model has no LoRA-GA adapters, ``num_batches`` is not positive,
            ``estimator`` is unknown, or ``offset="subtract"`` meets a 4-bit base (it
            cannot be written into packed codes).
    """
    targets = lora_ga_targets(model)
    if not targets:
        raise ValueError(f"model carries method={config_of(model).method!r}; lora_ga_init needs LoraGAConfig or HybridConfig adapters")
    ga_config = config_of(model).lora_ga_config()
    n = ga_config.num_batches if num_batches is None else num_batches
    check(is_int(n) and n > 0, "num_batches", n, "a positive integer")
    check(estimator in ESTIMATORS, "estimator", estimator, f"one of {list(ESTIMATORS)}")
    for name, (layer, part) in targets.items():
        if layer.quantized and part.ga_config.offset == "subtract":
            raise ValueError(f"offset='subtract' cannot shift the 4-bit base weight of {name!r}; "
                             "use offset='adapter' (the default), which leaves W untouched")
    _restore_base(targets)  # a second init must estimate on the original W
    weights = {name: layer.base_layer.weight for name, (layer, _) in targets.items()}  # packed codes if 4-bit
    # 4-bit and sharded (FSDP) weights cannot take per-parameter gradient hooks: estimate those from activations
    hosts = {name: layer for name, (layer, _) in targets.items()
             if layer.quantized or estimator == "activations" or distributed.is_sharded(layer.base_layer.weight)}
    chosen = list(islice(batches, n))
    grads = None
    path = None
    if cache_dir is not None:
        path = _cache_file(cache_dir, cache_key(model, weights, chosen, n, loss_fn))
        grads = _read_cache(path, weights)
        if not _agree_on_hit(grads is not None):
            grads = None
    if grads is None:
        params = {name: w for name, w in weights.items() if name not in hosts}
        grads = estimate_gradients(model, params, chosen, num_batches=n, loss_fn=loss_fn, hosts=hosts)
        for name in params:
            if not isinstance(targets[name][0].base_layer, nn.Linear):  # Conv1D stores (d_in, d_out)
                grads[name] = grads[name].t().contiguous()
        all_reduce_mean(grads, {name: w.device for name, w in weights.items()})
        if path is not None:  # per rank: the key includes the rank under torch.distributed
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            save_file(grads, str(tmp))
            tmp.replace(path)
    for name, (layer, part) in targets.items():
        # the SVD runs where the weight lives (one layer's gradient there at a time)
        grad = grads[name].to(layer.base_layer.weight.device)
        # a 4-bit W is dequantized here, a sharded one gathered (every rank takes this branch alike)
        weight = distributed.full(layer.weight) if part.ga_config.scale == "weight_svd" else None
        a0, b0 = start_factors(grad, part.ga_config, scaling=part.scaling, weight=weight)
        distributed.broadcast_from_rank0(a0, b0)  # the SVD's random draws may differ between ranks
        part.set_start(a0.to(part.lora_A.device), b0.to(part.lora_B.device))
        if part.ga_config.offset == "subtract":
            _shift_base(layer, part, sign=-1.0)
    return grads


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
