"""The adapter interface and the layer that hosts an adapter.

An ``Adapter`` is a strategy for changing one frozen linear map ``h = W x``.
It never owns or rewrites ``W``: its ``forward`` receives the activations and a
callable that computes ``W x``, so each method decides whether it needs the
base output (BOFT, unitary, Hybrid), a transformed input (input-side BOFT) or
only an additive branch (LoRA). Dense ``d × d`` forms appear only in
``merged_weight`` / ``unmerged_weight``.

``AdaptedLinear`` wraps an ``nn.Linear``, a GPT-2 ``Conv1D`` or a bitsandbytes
4-bit ``Linear4bit`` (NF4/FP4, the QLoRA setting) and adds one adapter; it handles
the bias, merging, disabling and weight layout. bitsandbytes is optional: a 4-bit
layer is recognised by duck typing and bitsandbytes is imported only once such a
layer is actually run or dequantized.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

BaseMatmul = Callable[[Tensor], Tensor]  # x (..., d_in) -> W x (..., d_out), no bias
BaseHook = Callable[[Tensor, Tensor], None]  # (x (..., d_in), h = W x (..., d_out)) -> None


class Adapter(nn.Module):
    """Base class of every method's per-layer strategy.

    Subclasses set ``method`` and implement ``forward``, ``merged_weight`` and
    ``unmerged_weight``. Hooks with defaults: ``manifold_parameters`` (tensors
    that a Riemannian optimizer must update instead of AdamW) and
    ``after_optimizer_step`` (called once per optimizer step, e.g. to update a
    mixing coefficient or enforce a norm bound).
    """

    method: str = "base"

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.d_in = d_in
        self.d_out = d_out

    def forward(self, x: Tensor, base: BaseMatmul) -> Tensor:  # pragma: no cover - interface
        """Return the adapted ``W' x`` (no bias) for activations ``x`` of shape (..., d_in)."""
        raise NotImplementedError

    def merged_weight(self, weight: Tensor) -> Tensor:  # pragma: no cover - interface
        """Return ``W'`` for the original ``W`` (d_out, d_in)."""
        raise NotImplementedError

    def unmerged_weight(self, merged: Tensor) -> Tensor:  # pragma: no cover - interface
        """Invert ``merged_weight``: return ``W`` given ``W'``."""
        raise NotImplementedError

    def bind(self, weight: Tensor) -> None:
        """Called once by the host layer with the frozen ``W`` (d_out, d_in), detached."""
        return None

    def manifold_parameters(self) -> list[nn.Parameter]:
        return []

    def branch_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of named branches that may take their own learning rate (the Hybrid's
        ``"lora"`` and ``"boft"``: the paper's η_LoRA and η_BOFT); empty for single-branch methods."""
        return {}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        return None


def weight_of(layer: nn.Module) -> Tensor:
    """The layer's weight as (d_out, d_in), whatever its storage layout.

    For a 4-bit layer this is a dequantized copy (see ``dequantize_4bit_weight``);
    writing into it does not change the layer.
    """
    if is_4bit_layer(layer):
        return dequantize_4bit_weight(layer)
    if isinstance(layer, nn.Linear):
        return layer.weight
    if _is_conv1d(layer):  # GPT-2 Conv1D stores (d_in, d_out)
        return layer.weight.t()
    raise TypeError(f"unsupported layer type {type(layer).__name__}")


def _is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and layer.weight.dim() == 2


def is_4bit_layer(layer: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (or subclass: ``LinearNF4``, ``LinearFP4``), without importing bitsandbytes.

    bitsandbytes keeps the packed codes in a ``Params4bit`` whose quantization
    state (block scales, shape, dtype) travels beside it as ``quant_state``.
    """
    if not isinstance(layer, nn.Linear):  # Linear4bit subclasses nn.Linear
        return False
    weight = layer.weight
    return type(weight).__name__ == "Params4bit" or hasattr(weight, "quant_state")


def quant_state_of(layer: nn.Module):
    """The ``bitsandbytes.functional.QuantState`` of a 4-bit layer.

    Raises:
        ValueError: the layer has not been quantized yet (bitsandbytes quantizes
            when the layer is moved to a device with ``.to(device)``).
    """
    # FSDP-style conversions may drop the attribute from the parameter; the module keeps a copy.
    state = getattr(layer.weight, "quant_state", None)
    if state is None:
        state = getattr(layer, "quant_state", None)
    if state is None:
        raise ValueError(
            f"{type(layer).__name__}(in_features={layer.in_features}, out_features={layer.out_features}) is not "
            "quantized yet: bitsandbytes quantizes a Linear4bit when it is moved with .to(device); do that before "
            "adapting it"
        )
    return state


def dequantize_4bit_weight(layer: nn.Module) -> Tensor:
    """``W`` (d_out, d_in) of a 4-bit layer, dequantized, in the dtype bitsandbytes recorded for it.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s codes into
    another layout the first time it runs in eval mode without gradients; that
    layout is converted back here, in place, as bitsandbytes' own ``state_dict``
    does (the forward reads either layout). That layout keeps the block scales in
    bfloat16, so such a ``W`` is the original rounded to ~2⁻⁸ relative.
    """
    import bitsandbytes.functional as bnbf  # a 4-bit layer exists, so bitsandbytes is installed

    state = quant_state_of(layer)
    weight = layer.weight
    if getattr(state, "packing_format_for_cpu", False):
        inverse = getattr(bnbf, "_convert_weight_packed_for_cpu_inverse", None)
        if inverse is None:
            raise RuntimeError("this bitsandbytes repacked the 4-bit weight for CPU inference and cannot undo it; "
                               "adapt the layer before running it in eval mode")
        weight.data, weight.quant_state = inverse(weight.data, state)
        state = weight.quant_state
    return bnbf.dequantize_4bit(weight.data, state)  # (d_out, d_in)


def matmul_4bit(layer: nn.Module, x: Tensor) -> Tensor:
    """``W x`` (no bias) for a 4-bit layer straight from the packed codes: no dense ``W`` is kept.

    ``x`` is cast to the layer's ``compute_dtype`` (as ``Linear4bit.forward`` does)
    and the result back to ``x``'s dtype. x: (..., d_in) -> (..., d_out).
    """
    import bitsandbytes as bnb

    compute = getattr(layer, "compute_dtype", None) or x.dtype
    h = bnb.matmul_4bit(x.to(compute), layer.weight.t(), quant_state=quant_state_of(layer))
    return h.to(x.dtype)


def is_supported_layer(layer: nn.Module) -> bool:
    if is_4bit_layer(layer):
        return True
    if isinstance(layer, nn.Linear):
        return layer.weight.is_floating_point()  # not e.g. bitsandbytes' int8 Linear8bitLt
    return _is_conv1d(layer)


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported layer (a 4-bit layer's packed weight has neither shape)."""
    if is_4bit_layer(layer):
        return layer.in_features, layer.out_features
    d_out, d_in = weight_of(layer).shape
    return d_in, d_out


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus one adapter: ``y = adapter(x, W·) + b``.

    On a 4-bit base (``quantized``) the base matmul runs on the packed codes
    (``bnb.matmul_4bit``), ``bind`` receives the dequantized ``W``, and ``merge``
    is refused (see there); ``to_float_linear`` gives the merged layer in float.

    Args:
        base_layer: the original ``nn.Linear``, ``Conv1D`` or bitsandbytes ``Linear4bit``;
            its parameters are frozen.
        adapter: the strategy that adapts ``W x``.
    """

    def __init__(self, base_layer: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.merged = False
        self.disabled = False
        self.quantized = is_4bit_layer(base_layer)
        self._base_hooks: OrderedDict[int, BaseHook] = OrderedDict()
        for p in base_layer.parameters():
            p.requires_grad_(False)
        adapter.bind(self.weight.detach())

    @property
    def weight(self) -> Tensor:
        """``W`` (d_out, d_in); for a 4-bit base a dequantized copy made on every access."""
        return weight_of(self.base_layer)

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def register_base_hook(self, hook: BaseHook) -> RemovableHandle:
        """Call ``hook(x, h)`` after every base matmul ``h = W x`` (x: (..., d_in), h: (..., d_out)).

        For observers of the frozen map, e.g. LoRA-GA's gradient estimate on a base
        whose weight cannot require grad (``∇_W L = Σ_tokens (∂L/∂h)ᵀ x``). The hook may
        register tensor hooks on ``h``; its return value is ignored.
        """
        handle = RemovableHandle(self._base_hooks)
        self._base_hooks[handle.id] = hook
        return handle

    def _base_matmul(self, x: Tensor) -> Tensor:
        h = matmul_4bit(self.base_layer, x) if self.quantized else F.linear(x, self.weight)  # (..., d_out)
        for hook in self._base_hooks.values():
            hook(x, h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        y = self.adapter(x, self._base_matmul)  # (..., d_out)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the adaptation into ``W``; a second call is refused.

        Raises:
            RuntimeError: already merged, or the base is 4-bit: re-quantizing ``W'``
                would round away most of the (small) adaptation and ``unmerge`` could
                not recover ``W``. ``to_float_linear`` (``hybridpeft.merge_and_unload``)
                gives the merged layer in float instead.
        """
        if self.quantized:
            raise RuntimeError(
                "cannot merge into a 4-bit (bitsandbytes) base weight: re-quantizing W' would round away most "
                "of the adaptation and unmerge() could not restore W. Keep the adapter unmerged, call "
                "hybridpeft.merge_and_unload(model) for a float model with the merged weights, or load the "
                "saved adapter onto the unquantized base model and merge there"
            )
        if self.merged:
            raise RuntimeError("layer is already merged; unmerge() it first")
        self._write_weight(self.adapter.merged_weight(self._weight_for_math()))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("layer is not merged")
        self._write_weight(self.adapter.unmerged_weight(self._weight_for_math()))
        self.merged = False

    @torch.no_grad()
    def to_float_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W' = adapter.merged_weight(W)`` for a 4-bit base.

        ``W`` is dequantized and ``W'`` computed in float32 at least, then stored in
        the dtype bitsandbytes recorded for ``W`` before quantization (the model's
        float dtype), on the layer's device; the bias is copied. Its parameters are
        frozen, like the base layer's.

        Raises:
            ValueError: the base is not 4-bit (merge it in place instead).
        """
        if not self.quantized:
            raise ValueError("to_float_linear is for 4-bit bases; merge() a float base in place")
        merged = self.adapter.merged_weight(self._weight_for_math())  # (d_out, d_in)
        dtype = quant_state_of(self.base_layer).dtype
        d_in, d_out = layer_shape(self.base_layer)
        out = nn.Linear(d_in, d_out, bias=self.bias is not None, device=merged.device, dtype=dtype)
        out.weight.copy_(merged)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        out.requires_grad_(False)
        return out

    def _weight_for_math(self) -> Tensor:
        # Merging in float32 at least: a bf16 product of two bf16 matrices loses bits we can keep.
        w = self.weight.detach()
        return w.to(torch.promote_types(w.dtype, torch.float32))

    def _write_weight(self, new_weight: Tensor) -> None:
        target = self.base_layer.weight
        value = new_weight if isinstance(self.base_layer, nn.Linear) else new_weight.t()
        target.copy_(value.to(target.dtype))

    def extra_repr(self) -> str:
        return f"merged={self.merged}, disabled={self.disabled}" + (", quantized=True" if self.quantized else "")
