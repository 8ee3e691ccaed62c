"""Per-method byte formulas: what one adapted module keeps, as tensors and as saved activations.

Parameters and buffers are counted on a real adapter of each distinct layer shape (built on
the CPU: adapters are small), so the counts are the library's own and a setting that does
not fit a layer fails exactly as ``inject`` would. Saved activations are closed-form in the
layer's shape ``d_in × d_out``, the tokens ``N`` and the itemsizes ``a`` (activations) and
``p`` (adapter tensors), as ``benchmarks/recompute_memory.py`` counts them:

================  ====================================================================
method            saved for backward, per module
================  ====================================================================
lora              ``x`` (``N d_in a``; with dropout the dropped-out ``x`` and its mask, ``a`` per
                  element on a CPU, 1 on CUDA), ``u = A x`` (``N r a``), the factors cast to
                  ``a`` if ``p ≠ a`` (``r (d_in + d_out) a``)
lora_ga           as LoRA with ``2r``: ``u`` is ``N 2r a`` and the stacked factors
                  ``[A; A0]``, ``[B, −B0]`` are always new tensors (``2r (d_in + d_out) a``)
boft              ``h = W x`` or, composed, its output and its input (``N d a``; ``x`` alone with
                  ``recompute_base`` or on the input side), the float32 Cayley blocks
                  (``4 m d b``) and, composed, R's blocks (``d c a``, ``c = b 2^(m−1)``)
                  or, factored below float32, the Cayley blocks cast (``m d b a``); ``d`` the rotated side
unitary           structured: the output in float32 (the reversible backward rebuilds the rest;
                  ``recompute``: ``h`` in ``a``); full: its output (``N d_out a``, shared where the
                  base keeps it) plus the blocks cast to ``a`` if ``p ≠ a``; ``recompute_base``: only ``x``
hybrid            the LoRA-GA branch, the BOFT branch (``h`` or the output; with ``recompute_base``
                  only the ``x`` the LoRA branch keeps anyway) and a scalar in ``a`` (composed, or factored below float32);
                  composed and prepared model-wide (CUDA), also λ per block of R (``d_out / c`` values,
                  float32 or wider) for the batched ``M = λ I + (1 − λ) R`` of ``hybridpeft.adapters.prepared``
full              nothing here: every linear's input is in the base formula
================  ====================================================================

``x`` is the module's input: modules reading the same tensor (q/k/v) keep it once, and
not at all where the base model saves it already. Tensors kept only for ``x``'s gradient
— ``A`` (stacked or cast) and the dropout mask — are not kept where ``x`` needs none (the
first block's input before any adapted module). A structured unitary's float32 output is
the tensor the base saves after some bias-free modules (Llama's ``v_proj``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..adapters.boft import butterfly_form, composed_size
from ..adapters.config import AdapterConfig

F32 = 4


@dataclass(frozen=True)
class ModuleSaved:
    """Saved activations of one adapted module.

    Attributes:
        keeps_input: it keeps its input ``x`` as is (shared with other readers of ``x``).
        keeps_output: it keeps its own output (shared with the base model where the base keeps it).
        other: bytes of everything else it keeps.
    """

    keeps_input: bool
    keeps_output: bool
    other: int


PLANNED_METHODS = ("lora", "lora_ga", "boft", "unitary", "hybrid", "full")  # module_saved has a formula for each


def _lora_part(r2: int, d_in: int, d_out: int, n: int, a: int, p: int, dropout: float, stacked: bool,
               x_grad: bool, mask: int) -> tuple[bool, int]:
    """(keeps x as is, other bytes) of a LoRA-style branch with ``r2`` columns."""
    other = n * r2 * a  # u = A x, for B's gradient
    if stacked or p != a:  # the factors as new tensors in the activations' dtype
        other += r2 * d_out * a + (r2 * d_in * a if x_grad else 0)  # A's only for x's gradient
    if dropout > 0:  # the dropped-out x (for A's gradient) and, for x's gradient, the mask
        return False, other + n * d_in * a + (n * d_in * mask if x_grad else 0)
    return True, other


def _butterfly(d: int, b: int, m: int, a: int) -> tuple[int, bool]:
    """(bytes, composed) a butterfly rotation of side ``d`` keeps besides its kept activation: the
    float32 Cayley blocks ``(m, d/b, b, b)``; composed (``c = b·2^(m−1) ≤ 64``), R's blocks
    ``(d/c, c, c)`` in the activations' dtype (at ``m = 1`` in float32 a view of the Cayley
    blocks); factored, the Cayley blocks cast to the activations' dtype below float32. (The
    skew index and the gather plans it also keeps are the adapter's buffers, counted there.)"""
    composed = butterfly_form(b, m) == "composed"
    total = F32 * m * d * b
    if composed:
        total += 0 if (m == 1 and a == F32) else d * composed_size(b, m) * a
    elif a != F32:
        total += m * d * b * a
    return total, composed


def module_saved(config: AdapterConfig, d_in: int, d_out: int, n: int, act: int, adapter: int, *,
                 x_grad: bool = True, mask: int | None = None, prepared: bool = False) -> ModuleSaved:
    """Saved activations of one module of ``config.method`` (see the module docstring).

    Args:
        config: the adapter config.
        d_in, d_out: the layer's shape.
        n: tokens per device.
        act: activation itemsize. adapter: adapter tensor itemsize.
        x_grad: the module's input needs a gradient (``activations.BaseSaved.input_grad``).
        mask: itemsize of a dropout mask (``act`` on CPU, 1 on CUDA); default ``act``.
        prepared: the layers' blocks come from the model-wide preparation
            (``hybridpeft.adapters.prepared``: CUDA, unsharded).
    """
    method = config.method
    mask = act if mask is None else mask
    if method == "lora":
        keeps, other = _lora_part(config.r, d_in, d_out, n, act, adapter, config.dropout, False, x_grad, mask)
        return ModuleSaved(keeps, False, other)
    if method == "lora_ga":
        stacked = config.offset != "subtract"
        keeps, other = _lora_part((2 if stacked else 1) * config.r, d_in, d_out, n, act, adapter, config.dropout, stacked,
                                  x_grad, mask)
        return ModuleSaved(keeps, False, other)
    if method == "boft":
        d = d_out if config.side == "output" else d_in
        other, composed = _butterfly(d, config.block_size, config.n_factors, act)
        if config.side == "output" and not config.recompute_base:
            # composed: its output (h is rebuilt from it); factored: h
            return ModuleSaved(False, True, other) if composed else ModuleSaved(False, False, other + n * d_out * act)
        return ModuleSaved(True, False, other)
    if method == "unitary":
        if config.recompute_base:
            return ModuleSaved(True, False, 0)
        if config.parameterization == "full":  # its output, and the blocks cast if p ≠ a
            return ModuleSaved(False, True, d_out * config.block_size * act if adapter != act else 0)
        if config.recompute:
            return ModuleSaved(False, False, n * d_out * act)
        if act == F32:
            return ModuleSaved(False, True, 0)
        return ModuleSaved(False, False, n * d_out * F32)
    if method == "hybrid":
        keeps, other = _lora_part(2 * config.lora_r, d_in, d_out, n, act, adapter, config.lora_dropout, True, x_grad, mask)
        rotation, composed = _butterfly(d_out, config.boft_block_size, config.boft_n_factors, act)
        other += rotation
        keeps_output = False
        if config.recompute_base:
            keeps = True  # the BOFT branch recomputes h from x
        elif composed:
            keeps_output = True  # and rebuilds h from it
        else:
            other += n * d_out * act
        if composed or act != F32:
            other += act  # a λ-scaled scalar (composed) or λ cast to the activations' dtype (factored)
        if composed and prepared:  # the model-wide preparation's λ per block, for M's gradient (at least float32)
            other += max(adapter, F32) * (d_out // composed_size(config.boft_block_size, config.boft_n_factors))
        return ModuleSaved(keeps, keeps_output, other)
    if method == "full":
        return ModuleSaved(False, False, 0)
    raise ValueError(f"method={method!r} is invalid: the planner has no formula for it")


@dataclass(frozen=True)
class AdapterTensors:
    """Counts of one module's adapter tensors."""

    trainable: int  # parameters (elements)
    manifold: int  # of which a Riemannian optimizer updates (elements)
    buffer_bytes: int  # buffers, in the dtypes inject gives them


@lru_cache(maxsize=256)
def _tensors(config_json: str, d_in: int, d_out: int, itemsize: int) -> AdapterTensors:
    import json

    from ..adapters import adapter_class

    config = AdapterConfig.from_dict(json.loads(config_json))
    adapter = adapter_class(config.method)(d_in, d_out, config)
    trainable = sum(p.numel() for p in adapter.parameters())
    manifold = sum(p.numel() for p in adapter.manifold_parameters())
    keep32 = set(getattr(adapter, "_FLOAT32_BUFFERS", ())) | {"mix_lambda", "grad_norm_lora", "grad_norm_boft"}
    buffers = 0
    for name, buf in adapter.named_buffers():
        if not buf.is_floating_point():
            buffers += buf.numel() * buf.element_size()
        elif name.rsplit(".", 1)[-1] in keep32:
            buffers += buf.numel() * max(itemsize, F32)
        else:
            buffers += buf.numel() * itemsize
    return AdapterTensors(trainable, manifold, buffers)


def adapter_tensors(config: AdapterConfig, d_in: int, d_out: int, itemsize: int) -> AdapterTensors:
    """Parameters and buffers of ``config``'s adapter on a ``d_in × d_out`` layer (built once per shape).

    Raises:
        ValueError: the setting does not fit the layer (as ``inject`` raises it).
    """
    import json

    with torch.device("cpu"):
        return _tensors(json.dumps(config.to_dict(), sort_keys=True), d_in, d_out, itemsize)
