"""Bytes autograd saves for backward in one forward of a transformers causal LM: the base model.

These formulas count what ``benchmarks/recompute_memory.py`` counts — the distinct storages
``saved_tensors_hooks`` sees, parameters aside — for the code paths of transformers 5 on
PyTorch 2.x: Llama-family blocks with fused scaled-dot-product attention (the kernel saves
q, k, v, its output and a float32 log-sum-exp; grouped KV heads are not repeated), and
BLOOM blocks with eager attention (the float32 softmax and, below float32, its cast). An op
saves its inputs only when some input needs a gradient: before the first adapted module
in forward order nothing needs one (the embeddings are frozen), so that part of the first
block saves nothing. Notation: ``N = batch × seq`` tokens, ``a`` the activation itemsize,
``H`` hidden, ``I`` MLP width, ``h_q``/``h_kv`` query/KV heads of width ``d_h``, ``V`` vocabulary.

Per Llama block, once the residual stream needs a gradient:

* each RMSNorm: the float32 input and its ``rsqrt``: ``4NH + 4N`` (full FT: ``+ aNH``, the
  normalized input for the weight's gradient);
* attention: ``a N d_h (2 h_q + 2 h_kv) + 4 N h_q`` (q, k, v, output, log-sum-exp), plus RoPE's
  cos and sin once per forward (``2 a S d_h``);
* MLP: ``3 a N I`` (the gate output for SiLU, both factors of the product);
* full FT adds every linear's input: ``a N H`` (shared by q/k/v), ``a N H`` (gate/up),
  ``a N I`` (down); ``o_proj``'s input is the attention output, already saved.

Per BLOOM block: each LayerNorm ``a (NH + 2N)``; attention ``3 a N H`` (query, key, value)
``+ 4 B h S²`` (float32 softmax) ``+ a B h S²`` (its cast, below float32); MLP ``a N I``
(GELU's input, ``I = 4H``). After the blocks: the final norm, and the loss's float32
log-softmax ``4 N V`` with the int64 labels ``8N`` (and a float32 scalar).

The adapted modules add their own saved tensors (``hybridpeft.plan.methods``); whether a
module's input or output is already saved by the base model is in ``INPUT_SAVED`` /
``OUTPUT_SAVED`` (e.g. ``o_proj``'s input is the attention kernel's saved output).
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from .shapes import Dims

F32 = 4
I64 = 8

# Inputs and outputs of linear layers that the base model saves anyway (same storage).
INPUT_SAVED = {"llama": {"o_proj"}, "bloom": set()}
# (Outputs only of bias-free layers: the host adds the bias after the adapter, into a new tensor.)
OUTPUT_SAVED = {"llama": {"v_proj", "gate_proj", "up_proj"}, "bloom": {"dense_h_to_4h"}}
# Linear layers reading the same tensor: an adapter that keeps its input keeps it once per group.
INPUT_GROUP = {
    "llama": {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"},
    "bloom": {"query_key_value": "attn_in", "dense": "attn_out", "dense_h_to_4h": "mlp_in", "dense_4h_to_h": "mlp_mid"},
}
ATTENTION = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj"), "bloom": ("query_key_value", "dense")}


@dataclass(frozen=True)
class Batch:
    """Tokens per device: ``batch`` sequences of ``seq`` tokens."""

    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass
class BaseSaved:
    """The base model's saved bytes, and which linear inputs need a gradient in that forward.

    ``input_grad[(layer, group)]`` is True when the tensor read by that input group
    (``INPUT_GROUP``) needs a gradient — an adapter keeps tensors for its input's gradient
    only then (e.g. nothing before the first adapted module of the first block does).
    """

    bytes: int
    input_grad: dict[tuple[int, str], bool]
    per_layer: list[int]  # the part of ``bytes`` saved inside each decoder layer


def base_saved(dims: Dims, batch: Batch, act: int, *, full: bool, adapted: dict[int, Collection[str]]) -> BaseSaved:
    """Bytes the base model saves in one forward (see the module docstring).

    Args:
        dims: the model's dimensions.
        batch: tokens per device.
        act: itemsize of the activations (model dtype: 4, or 2 for bf16/fp16).
        full: every parameter trains (full fine-tuning).
        adapted: decoder layer index → short names of its adapted linear layers.
    """
    walk = _llama if dims.family == "llama" else _bloom
    return walk(dims, batch, act, full, adapted)


def base_saved_bytes(dims: Dims, batch: Batch, act: int, *, full: bool, adapted: dict[int, Collection[str]]) -> int:
    return base_saved(dims, batch, act, full=full, adapted=adapted).bytes


def _loss(dims: Dims, n: int) -> int:
    return F32 * n * dims.vocab + I64 * n + F32  # log-softmax output, shifted labels, total weight


def _llama(d: Dims, b: Batch, a: int, full: bool, adapted: dict[int, Collection[str]]) -> BaseSaved:
    n = b.tokens
    norm = F32 * n * d.hidden + F32 * n + (a * n * d.hidden if full else 0)
    total = 0
    grads: dict[tuple[int, str], bool] = {}
    stream = full  # does the residual stream need a gradient here?
    rope_saved = False
    per_layer = []
    for layer in range(d.layers):
        start = total
        mods = adapted.get(layer, ())
        grads[(layer, "attn_in")] = stream
        if stream:
            total += norm  # input RMSNorm
        q, k, v = (full or stream or name in mods for name in ("q_proj", "k_proj", "v_proj"))
        if q or k:
            if not rope_saved:
                total += 2 * a * b.seq * d.head_dim  # cos, sin: (1, 1, S, d_h), shared by every block
                rope_saved = True
        if q or k or v:
            total += a * n * d.head_dim * (2 * d.heads + 2 * d.kv_heads) + F32 * n * d.heads
        if full:
            total += a * n * d.hidden  # q/k/v's shared input
        grads[(layer, "attn_out")] = q or k or v
        stream = stream or q or k or v or "o_proj" in mods
        grads[(layer, "mlp_in")] = stream
        if stream:
            total += norm  # post-attention RMSNorm
        gate, up = (full or stream or name in mods for name in ("gate_proj", "up_proj"))
        total += a * n * d.intermediate * (int(gate) + int(gate) + int(up))  # SiLU input; mul saves up if gate, act if up
        if full:
            total += a * n * d.hidden + a * n * d.intermediate  # gate/up input, down input
        grads[(layer, "mlp_mid")] = gate or up
        stream = stream or gate or up or "down_proj" in mods
        per_layer.append(total - start)
    if stream:
        total += norm  # final norm
    if full:
        total += a * n * d.hidden + I64 * n  # the head's input; the embedding's indices
    return BaseSaved(total + _loss(d, n), grads, per_layer)


def _bloom(d: Dims, b: Batch, a: int, full: bool, adapted: dict[int, Collection[str]]) -> BaseSaved:
    n = b.tokens
    norm = a * (n * d.hidden + 2 * n)  # input, mean, rstd
    probs = F32 * b.batch * d.heads * b.seq ** 2 + (a * b.batch * d.heads * b.seq ** 2 if a != F32 else 0)
    total = norm if full else 0  # the embeddings' LayerNorm
    grads: dict[tuple[int, str], bool] = {}
    stream = full
    per_layer = []
    for layer in range(d.layers):
        start = total
        mods = adapted.get(layer, ())
        grads[(layer, "attn_in")] = stream
        if stream:
            total += norm
        qkv = full or stream or "query_key_value" in mods
        if qkv:
            total += 3 * a * n * d.hidden + probs  # query, key, value, softmax (and its cast)
        if full:
            total += 2 * a * n * d.hidden  # qkv's and dense's inputs
        grads[(layer, "attn_out")] = qkv
        stream = stream or qkv or "dense" in mods
        grads[(layer, "mlp_in")] = stream
        if stream:
            total += norm
        up = full or stream or "dense_h_to_4h" in mods
        if up:
            total += a * n * d.intermediate  # GELU's input
        if full:
            total += a * n * d.hidden + a * n * d.intermediate  # the two MLP inputs
        grads[(layer, "mlp_mid")] = up
        stream = stream or up or "dense_4h_to_h" in mods
        per_layer.append(total - start)
    if stream:
        total += norm  # ln_f
    if full:
        total += a * n * d.hidden + I64 * n
    return BaseSaved(total + _loss(d, n), grads, per_layer)


def checkpointed_saved(dims: Dims, batch: Batch, act: int, walked: BaseSaved, module_per_layer: list[int]) -> tuple[int, int]:
    """With activation checkpointing of every decoder layer (transformers' ``gradient_checkpointing``,
    non-reentrant): (kept through the forward, recomputed at most at once in the backward).

    Each layer keeps only its input hidden states (``a N H``); what the layers would save is
    recomputed one layer at a time in the backward, so the largest layer's saved bytes (base
    and adapters) are alive on top. Outside the layers (final norm, loss) nothing changes.
    """
    outside = walked.bytes - sum(walked.per_layer)
    kept = dims.layers * act * batch.tokens * dims.hidden + outside
    largest = max((b + m for b, m in zip(walked.per_layer, module_per_layer)), default=0)
    return kept, largest


def loss_backward_transient(dims: Dims, batch: Batch, act: int) -> int:
    """Bytes alive on top of the saved activations while the loss backpropagates: the float32
    gradients of the log-softmax's output and input (``8 N V``) and, below float32, the input
    gradient cast back to the logits' dtype (``a N V``)."""
    n = batch.tokens
    return 2 * F32 * n * dims.vocab + (act * n * dims.vocab if act != F32 else 0)
