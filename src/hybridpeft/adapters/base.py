"""The adapter interface and the layer that hosts an adapter.

An ``Adapter`` is a strategy for changing one frozen linear map ``h = W x``.
It never owns or rewrites ``W``: its ``forward`` receives the activations and a
callable that computes ``W x``, so each method decides whether it needs the
base output (BOFT, unitary, Hybrid), a transformed input (input-side BOFT) or
only an additive branch (LoRA). Dense ``d × d`` forms appear only in
``merged_weight`` / ``unmerged_weight``.

``AdaptedLinear`` wraps an ``nn.Linear``, a GPT-2 ``Conv1D``, a bitsandbytes
4-bit ``Linear4bit`` (NF4/FP4, the QLoRA setting) or int8 ``Linear8bitLt``
(``int8.py``) and adds one adapter; it handles the bias, merging, disabling and
weight layout. bitsandbytes is optional: a quantized layer is recognised by duck
typing and bitsandbytes is imported only once such a layer is actually run or
dequantized.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .. import distributed
from .int8 import dequantize_8bit_weight, float_dtype_8bit, is_8bit_layer, matmul_8bit

BaseMatmul = Callable[[Tensor], Tensor]  # x (..., d_in) -> W x (..., d_out), no bias
BaseHook = Callable[[Tensor, Tensor], None]  # (x (..., d_in), h = W x (..., d_out)) -> None


class OwnedBaseMatmul:
    """A ``BaseMatmul`` whose every call returns a new tensor that nothing else refers to.

    An adapter may then add its branch into that tensor in place (``LoraAdapter``: one
    pass over ``N × d_out`` less than ``torch.addmm``, which first copies ``h``).
    ``AdaptedLinear`` passes one unless a base hook observes ``h``.
    """

    __slots__ = ("matmul",)

    def __init__(self, matmul: BaseMatmul) -> None:
        self.matmul = matmul

    def __call__(self, x: Tensor) -> Tensor:
        return self.matmul(x)


class Adapter(nn.Module):
    """Base class of every method's per-layer strategy.

    Subclasses set ``method`` and implement ``forward``, ``merged_weight`` and
    ``unmerged_weight``. Hooks with defaults: ``manifold_parameters`` (tensors
    that a Riemannian optimizer must update instead of AdamW),
    ``after_optimizer_step`` (once per optimizer step, e.g. to update a mixing
    coefficient or enforce a norm bound) and its class-level form
    ``after_optimizer_step_all``, which receives every adapter of the class in a
    model at once so a method can batch the work across layers; ``merged_bias`` /
    ``unmerged_bias`` (for a method that also changes the bias, e.g. IA³ scaling
    a layer's whole output) and ``for_layer`` (for a method whose form depends on
    which module it adapts).
    """

    method: str = "base"

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.d_in = d_in
        self.d_out = d_out

    @classmethod
    def for_layer(cls, name: str, d_in: int, d_out: int, config) -> "Adapter":
        """The adapter for the module called ``name`` (its qualified name in the model).

        Most methods treat every target alike; IA³ scales the input of its
        ``feedforward_modules`` and the output of the others.
        """
        return cls(d_in, d_out, config)

    def forward(self, x: Tensor, base: BaseMatmul) -> Tensor:  # pragma: no cover - interface
        """Return the adapted ``W' x`` (no bias) for activations ``x`` of shape (..., d_in)."""
        raise NotImplementedError

    def merged_weight(self, weight: Tensor) -> Tensor:  # pragma: no cover - interface
        """Return ``W'`` for the original ``W`` (d_out, d_in)."""
        raise NotImplementedError

    def unmerged_weight(self, merged: Tensor) -> Tensor:  # pragma: no cover - interface
        """Invert ``merged_weight``: return ``W`` given ``W'``."""
        raise NotImplementedError

    def merged_bias(self, bias: Tensor) -> Tensor:
        """The bias ``b'`` of the adapted layer for the original ``b`` (d_out,): the host
        adds it to ``forward``'s output and ``merge`` writes it. Default: ``b`` itself."""
        return bias

    def unmerged_bias(self, merged: Tensor) -> Tensor:
        """Invert ``merged_bias``."""
        return merged

    def bind(self, weight: Tensor) -> None:
        """Called once by the host layer with the frozen ``W`` (d_out, d_in), detached."""
        return None

    def manifold_parameters(self) -> list[nn.Parameter]:
        return []

    def branch_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of named branches that may take their own learning rate (the Hybrid's
        ``"lora"`` and ``"boft"``: the paper's η_LoRA and η_BOFT); empty for single-branch methods."""
        return {}

    @classmethod
    def prepare_all(cls, adapters: Sequence["Adapter"]) -> None:
        """Work for the coming forward of every active adapter of this class in a model, at once.

        Called by the model's forward pre-hook (``hybridpeft.inject.prepare_adapters``) with the
        adapters of unmerged, enabled layers. Default: nothing. BOFT and the Hybrid compute
        every layer's rotation blocks in one batched pass and hand each layer its slice
        (``hybridpeft.adapters.prepared``); a layer run outside a model forward computes its own.
        """
        return None

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        return None

    @classmethod
    @torch.no_grad()
    def after_optimizer_step_all(cls, adapters: Sequence["Adapter"]) -> None:
        """The per-step work of every adapter of this class in a model, in one call.

        ``hybridpeft.after_optimizer_step(model)`` calls it once per adapter class.
        Default: each adapter's ``after_optimizer_step``. Override to batch across
        layers (one fused kernel, one host read or one collective for all of them).
        """
        for adapter in adapters:
            adapter.after_optimizer_step()


def weight_of(layer: nn.Module) -> Tensor:
    """The layer's weight as (d_out, d_in), whatever its storage layout.

    For a 4-bit or int8 layer this is a dequantized copy (see ``dequantize_4bit_weight``,
    ``int8.dequantize_8bit_weight``); writing into it does not change the layer.
    """
    if is_4bit_layer(layer):
        return dequantize_4bit_weight(layer)
    if is_8bit_layer(layer):
        return dequantize_8bit_weight(layer)
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

    unpack_cpu_layout(layer)
    return bnbf.dequantize_4bit(layer.weight.data, quant_state_of(layer))  # (d_out, d_in)


def unpack_cpu_layout(layer: nn.Module) -> None:
    """Undo bitsandbytes' CPU repack of a 4-bit layer's codes (see ``dequantize_4bit_weight``), in place."""
    state = quant_state_of(layer)
    if not getattr(state, "packing_format_for_cpu", False):
        return
    import bitsandbytes.functional as bnbf

    inverse = getattr(bnbf, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise RuntimeError("this bitsandbytes repacked the 4-bit weight for CPU inference and cannot undo it; "
                           "adapt the layer before running it in eval mode")
    layer.weight.data, layer.weight.quant_state = inverse(layer.weight.data, state)


def keep_trainable_layout(model: nn.Module) -> None:
    """Keep every 4-bit layer of ``model`` in the layout that has a backward.

    On AVX512-BF16 CPUs bitsandbytes repacks a ``Linear4bit`` for its inference kernel the
    first time the layer runs in eval mode without gradients, and from then on multiplies
    with that kernel, which has *no backward*: gradients stop at every such layer (torch
    only warns). An evaluation before training (or between steps) is exactly such a run.
    Here every 4-bit layer is told not to repack (slower 4-bit inference on those CPUs,
    correct training), and one already repacked is converted back — with its block scales
    rounded to bfloat16 by the repack, a loss nothing can undo; loading through
    ``hybridpeft.models`` prevents the repack from the start. ``inject`` calls this.
    """
    for layer in model.modules():
        if is_4bit_layer(layer):
            layer.support_avx512bf16_for_cpu = False
            if getattr(layer.weight, "quant_state", None) is not None or getattr(layer, "quant_state", None) is not None:
                unpack_cpu_layout(layer)


def matmul_4bit(layer: nn.Module, x: Tensor) -> Tensor:
    """``W x`` (no bias) for a 4-bit layer straight from the packed codes: no dense ``W`` is kept.

    ``x`` is cast to the layer's ``compute_dtype`` (as ``Linear4bit.forward`` does)
    and the result back to ``x``'s dtype. x: (..., d_in) -> (..., d_out).
    """
    import bitsandbytes as bnb

    compute = getattr(layer, "compute_dtype", None) or x.dtype
    h = bnb.matmul_4bit(x.to(compute), layer.weight.t(), quant_state=quant_state_of(layer))
    return h.to(x.dtype)


def is_quantized_layer(layer: nn.Module) -> bool:
    """A bitsandbytes 4-bit (``Linear4bit``) or int8 (``Linear8bitLt``) layer."""
    return is_4bit_layer(layer) or is_8bit_layer(layer)


def is_supported_layer(layer: nn.Module) -> bool:
    if is_quantized_layer(layer):
        return True
    if isinstance(layer, nn.Linear):
        return layer.weight.is_floating_point()  # not some other integer-weight layer
    return _is_conv1d(layer)


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported layer (a 4-bit layer's packed weight has neither shape)."""
    if is_quantized_layer(layer):
        return layer.in_features, layer.out_features
    d_out, d_in = weight_of(layer).shape
    return d_in, d_out


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus one adapter: ``y = adapter(x, W·) + b``.

    On a quantized base (``quantized``: bitsandbytes 4-bit or int8) the base matmul
    runs on the codes (``bnb.matmul_4bit`` / ``bnb.matmul``), ``bind`` receives the
    dequantized ``W``, and ``merge`` is refused (see there); ``to_float_linear`` gives
    the merged layer in float.

    Args:
        base_layer: the original ``nn.Linear``, ``Conv1D``, bitsandbytes ``Linear4bit`` or
            ``Linear8bitLt``; its parameters are frozen.
        adapter: the strategy that adapts ``W x``.
    """

    def __init__(self, base_layer: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.merged = False
        self.disabled = False
        self.quantized = is_quantized_layer(base_layer)
        self._base_hooks: OrderedDict[int, BaseHook] = OrderedDict()
        for p in base_layer.parameters():
            p.requires_grad_(False)
        adapter.bind(self.weight.detach())

    @property
    def weight(self) -> Tensor:
        """``W`` (d_out, d_in); for a quantized base a dequantized copy made on every access."""
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
        if not self.quantized:
            h = F.linear(x, self.weight)  # (..., d_out)
        else:
            h = matmul_4bit(self.base_layer, x) if is_4bit_layer(self.base_layer) else matmul_8bit(self.base_layer, x)
        for hook in self._base_hooks.values():
            hook(x, h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        base = OwnedBaseMatmul(self._base_matmul) if not self._base_hooks else self._base_matmul  # hooks may hold h
        y = self.adapter(x, base)  # (..., d_out)
        return y if self.bias is None else y + self.adapter.merged_bias(self.bias).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the adaptation into ``W``; a second call is refused.

        Raises:
            RuntimeError: already merged, or the base is quantized: re-quantizing ``W'``
                would round away most of the (small) adaptation and ``unmerge`` could
                not recover ``W``. ``to_float_linear`` (``hybridpeft.merge_and_unload``)
                gives the merged layer in float instead.
        """
        if self.quantized:
            raise RuntimeError(
                f"cannot merge into a {self.quant_kind} (bitsandbytes) base weight: re-quantizing W' would round away most "
                "of the adaptation and unmerge() could not restore W. Keep the adapter unmerged, call "
                "hybridpeft.merge_and_unload(model) for a float model with the merged weights, or load the "
                "saved adapter onto the unquantized base model and merge there"
            )
        if self.merged:
            raise RuntimeError("layer is already merged; unmerge() it first")
        self._refuse_sharded("merge")
        self._write_weight(self.adapter.merged_weight(self._weight_for_math()))
        self._write_bias(self.adapter.merged_bias)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("layer is not merged")
        self._refuse_sharded("unmerge")
        self._write_weight(self.adapter.unmerged_weight(self._weight_for_math()))
        self._write_bias(self.adapter.unmerged_bias)
        self.merged = False

    @torch.no_grad()
    def to_float_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W' = adapter.merged_weight(W)`` for a quantized base.

        ``W`` is dequantized and ``W'`` computed in float32 at least, then stored in
        the dtype bitsandbytes recorded for a 4-bit ``W`` before quantization (the model's
        float dtype; for int8, which records none, the bias's dtype or float32), on the
        layer's device; the bias is copied. Its parameters are frozen, like the base layer's.

        Raises:
            ValueError: the base is not quantized (merge it in place instead).
        """
        if not self.quantized:
            raise ValueError("to_float_linear is for quantized bases; merge() a float base in place")
        merged = self.adapter.merged_weight(self._weight_for_math())  # (d_out, d_in)
        is_4bit = is_4bit_layer(self.base_layer)
        dtype = quant_state_of(self.base_layer).dtype if is_4bit else float_dtype_8bit(self.base_layer)
        d_in, d_out = layer_shape(self.base_layer)
        out = nn.Linear(d_in, d_out, bias=self.bias is not None, device=merged.device, dtype=dtype)
        out.weight.copy_(merged)
        if self.bias is not None:
            out.bias.copy_(self.adapter.merged_bias(self.bias))
        out.requires_grad_(False)
        return out

    @property
    def quant_kind(self) -> str:
        """``"4-bit"``, ``"int8"`` or ``"float"``: how the base weight is stored."""
        if not self.quantized:
            return "float"
        return "4-bit" if is_4bit_layer(self.base_layer) else "int8"

    def _refuse_sharded(self, what: str) -> None:
        if distributed.is_sharded(self.base_layer.weight):
            raise RuntimeError(f"cannot {what} a sharded (FSDP) layer in place: this rank holds only a piece of W; "
                               "hybridpeft.merge_and_unload(model) gathers the model and merges it on rank 0")

    def _weight_for_math(self) -> Tensor:
        # Merging in float32 at least: a bf16 product of two bf16 matrices loses bits we can keep.
        w = self.weight.detach()
        return w.to(torch.promote_types(w.dtype, torch.float32))

    def _write_weight(self, new_weight: Tensor) -> None:
        target = self.base_layer.weight
        value = new_weight if isinstance(self.base_layer, nn.Linear) else new_weight.t()
        target.copy_(value.to(target.dtype))

    def _write_bias(self, transform: Callable[[Tensor], Tensor]) -> None:
        bias = self.bias
        if bias is None:
            return
        value = transform(bias.detach())
        if value is not bias and value.data_ptr() != bias.data_ptr():  # most methods leave b alone: no copy
            bias.copy_(value.to(bias.dtype))

    def extra_repr(self) -> str:
        return f"merged={self.merged}, disabled={self.disabled}" + (f", quantized=True ({self.quant_kind})" if self.quantized else "")
