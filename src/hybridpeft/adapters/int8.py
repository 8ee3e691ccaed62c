"""bitsandbytes' int8 (LLM.int8()) base layers: recognise, multiply, dequantize.

A ``Linear8bitLt`` keeps ``W`` as int8 codes ``C`` (d_out, d_in) with one float32 scale
per output row ``s`` (``SCB``): ``W ≈ C · s[:, None] / 127``. Its forward is
``bnb.matmul``, which casts the activations to float16 for the int8 product (so an int8
base computes in float16 precision). As for 4-bit layers (``base.py``), bitsandbytes is
only imported once such a layer is run or dequantized; the layer is recognised by
duck typing.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def is_8bit_layer(layer: nn.Module) -> bool:
    """A bitsandbytes ``Linear8bitLt`` (int8 codes in an ``Int8Params`` weight)."""
    return isinstance(layer, nn.Linear) and type(layer.weight).__name__ == "Int8Params"


def _row_scales(layer: nn.Module) -> Tensor:
    """``SCB`` (d_out,): on the weight until the first forward, then on the layer's matmul state."""
    scales = getattr(layer.weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    if scales is None:
        raise ValueError(f"{type(layer).__name__}(in_features={layer.in_features}, out_features="
                         f"{layer.out_features}) is not quantized yet: move it to a device first")
    return scales


def dequantize_8bit_weight(layer: nn.Module) -> Tensor:
    """``W`` (d_out, d_in) in float32: ``C · s / 127`` (a copy; writing into it changes nothing)."""
    codes = layer.weight.data  # (d_out, d_in) int8
    return codes.float() * (_row_scales(layer).float()[:, None] / 127.0)


def matmul_8bit(layer: nn.Module, x: Tensor) -> Tensor:
    """``W x`` (no bias) as the layer's own forward computes it; x: (..., d_in) -> (..., d_out), x's dtype.

    Mirrors ``Linear8bitLt.forward`` without the bias: the row scales move to the
    layer's matmul state on first use, and the codes stay the weight's data.
    """
    import bitsandbytes as bnb

    layer.state.is_training = layer.training
    if getattr(layer.weight, "CB", None) is not None:
        layer.init_8bit_state()
    h = bnb.matmul(x, layer.weight, bias=None, state=layer.state)
    if not layer.state.has_fp16_weights and layer.state.CB is not None:
        layer.weight.data = layer.state.CB
    return h.to(x.dtype)


def float_dtype_8bit(layer: nn.Module) -> torch.dtype:
    """The float dtype a merged int8 layer is written in: its bias's, else float32
    (bitsandbytes does not record the weight's dtype before quantization)."""
    return layer.bias.dtype if getattr(layer, "bias", None) is not None else torch.float32
