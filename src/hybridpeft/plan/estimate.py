"""Predicted peak memory per device of one training step, and of LoRA-GA's gradient estimate.

A step's memory, per device (``ModelBytes`` and ``ActivationBytes`` give the parts):

    static    = weights + adapter parameters and buffers + optimizer states (+ DDP's gradient buckets)
    backward  = static + saved activations + the loss's backward transient
    step      = static + gradients + the optimizer's temporaries
    peak      = max(backward, step)

Gradients of adapter parameters are small and appear during backward; full fine-tuning's
appear as the activations are freed, so ``step`` covers them. Sharding: ``ddp`` replicates
everything and adds a bucket copy of the gradients; ``fsdp`` (FSDP2 ``fully_shard`` per
decoder layer) divides weights, trainable parameters, gradients and optimizer states by
the world size and adds two layers' gathered weights (the running one and the prefetched
one). Activations are per device (``batch × seq`` is the per-device micro-batch).

AdamW keeps two states per trainable element in the parameter's dtype; the Riemannian Adam
of full-capacity unitary blocks keeps one. Its temporaries: on a GPU (foreach kernels)
one more copy of all trainable tensors, on a CPU (one tensor at a time) two copies of the
largest one.

The LoRA-GA estimate (``lora_ga``, ``hybrid``) runs before training with every adapted
weight requiring a gradient: each adapted module keeps its input, and gradients leave as
autograd produces them. ``exact`` keeps float32 accumulators on the host (``4 × adapted
parameters``) and has one layer's gradient in flight on the device; ``sketch`` keeps the
layers' sketches on the device (``hybridpeft.gradient_sketch.sketch_bytes``) and nothing on
the host. On the activation path (4-bit or FSDP bases) the exact ``gᵀ x`` is one layer's
float32 d_out × d_in matrix on the device; the sketch never forms it.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..adapters.config import AdapterConfig, config_class
from ..gradient_sketch import sketch_bytes
from .activations import (INPUT_GROUP, INPUT_SAVED, OUTPUT_SAVED, Batch, base_saved, checkpointed_saved,
                          loss_backward_transient)
from .methods import PLANNED_METHODS, adapter_tensors, module_saved
from .shapes import Inventory, PlanInputError, default_targets, dims_of, family_of, inventory, resolve_config

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZATIONS = ("none", "nf4")
SHARDINGS = ("none", "ddp", "fsdp")
DEVICE_KINDS = ("cuda", "cpu")
# bitsandbytes NF4 with nested statistics (Linear4bit's default): 4-bit codes, an 8-bit absmax per
# 64-weight block, a float32 absmax per 256 of those.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
GiB = 2 ** 30


@dataclass
class PlanRequest:
    """What to plan. ``adapter`` holds the method's config fields (e.g. ``{"r": 16}``)."""

    model: str
    method: str
    adapter: dict[str, Any] = field(default_factory=dict)
    targets: list[str] | None = None
    batch: int = 1
    seq: int = 2048
    dtype: str = "bfloat16"
    quantization: str = "none"
    world_size: int = 1
    sharding: str = "none"
    device_kind: str = "cuda"
    device_memory_gib: float | None = None
    gradient_checkpointing: bool = False


@dataclass
class EstimatePeak:
    """LoRA-GA's gradient estimate: peak bytes on each device and in its host process."""

    estimator: str
    device: int
    host: int
    detail: dict[str, int]


@dataclass
class Plan:
    """The prediction; every number is bytes per device."""

    request: PlanRequest
    config: AdapterConfig | None
    modules: int
    trainable_params: int
    parts: dict[str, int]  # the breakdown of the training step
    activations: dict[str, int]  # saved activations: base model, adapted modules
    phases: dict[str, int]  # backward, step
    peak: int
    estimate: list[EstimatePeak]
    notes: list[str]
    auto_estimator: str | None = None

    def worst(self) -> int:
        """The larger of the training peak and the peak of the estimate ``auto_estimator`` runs."""
        return max([self.peak] + [e.device for e in self.estimate if e.estimator == self.auto_estimator])

    def fits(self) -> bool | None:
        if self.request.device_memory_gib is None:
            return None
        return self.worst() <= self.request.device_memory_gib * GiB


def _check(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise PlanInputError(f"{name}={value!r} is invalid: expected {expected}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate(req: PlanRequest) -> None:
    """Raise ``PlanInputError`` (one line naming the field and the value) for a bad or impossible request."""
    from ..adapters.config import known_methods

    planned = [m for m in known_methods() if m in PLANNED_METHODS]
    _check(req.method in known_methods(), "method", req.method, f"one of {planned}")
    _check(req.method in PLANNED_METHODS, "method", req.method,
           f"one of {planned}: the planner has no byte formula for {req.method!r} yet")
    _check(_is_count(req.batch), "batch", req.batch, "a positive integer")
    _check(_is_count(req.seq), "seq", req.seq, "a positive integer")
    _check(req.dtype in DTYPES, "dtype", req.dtype, f"one of {list(DTYPES)}")
    _check(req.quantization in QUANTIZATIONS, "quantization", req.quantization, f"one of {list(QUANTIZATIONS)}")
    _check(_is_count(req.world_size), "world_size", req.world_size, "a positive integer")
    _check(req.sharding in SHARDINGS, "sharding", req.sharding, f"one of {list(SHARDINGS)}")
    _check(req.device_kind in DEVICE_KINDS, "device_kind", req.device_kind, f"one of {list(DEVICE_KINDS)}")
    _check(req.sharding != "none" or req.world_size == 1, "sharding", req.sharding,
           f"'ddp' or 'fsdp' with world_size={req.world_size} (one device has nothing to shard or replicate)")
    _check(not (req.quantization == "nf4" and req.method == "full"), "quantization", req.quantization,
           "'none' for method='full': 4-bit weights cannot be trained")
    _check(isinstance(req.gradient_checkpointing, bool), "gradient_checkpointing", req.gradient_checkpointing, "true or false")
    _check(req.device_memory_gib is None or (isinstance(req.device_memory_gib, (int, float)) and req.device_memory_gib > 0),
           "device_memory", req.device_memory_gib, "a positive number of GiB")


def build_config(req: PlanRequest, inv: Inventory) -> AdapterConfig:
    """The adapter config the request describes, validated by its own class (errors name the field)."""
    fields = dict(req.adapter)
    targets = req.targets or default_targets(inv.dims.family)
    cls = config_class(req.method)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    _check(not unknown, "adapter", unknown[0] if unknown else None, f"a field of method {req.method!r} ({sorted(names)})")
    try:
        config = cls(target_modules=targets, **fields)
    except (ValueError, TypeError) as err:
        raise PlanInputError(str(err)) from None
    if req.quantization == "nf4" and req.method == "lora_ga":
        _check(config.offset != "subtract", "offset", config.offset, "'adapter' on a 4-bit base (it cannot shift packed codes)")
    return config


def plan(req: PlanRequest) -> Plan:
    """Predict the peak memory per device of ``req`` (see the module docstring). Loads no weights.

    Raises:
        PlanInputError: a bad or impossible request (the message names the field and the value).
    """
    validate(req)
    hf_config = resolve_config(req.model)
    family_of(hf_config)  # an unsupported architecture fails before the meta model is built
    inv = inventory(hf_config, req.targets or default_targets(dims_of(hf_config).family))
    config = build_config(req, inv)
    act = DTYPES[req.dtype]
    adapter_size = DTYPES[config.adapter_dtype] if config.adapter_dtype else (4 if req.quantization == "nf4" else act)
    batch = Batch(req.batch, req.seq)
    world = req.world_size
    shard = world if req.sharding == "fsdp" else 1
    full = config.method == "full"
    notes: list[str] = []

    # weights
    quantized = {inv.linears[n].name + ".weight" for n in inv.linears
                 if req.quantization == "nf4" and n != inv.head and inv.linears[n].layer is not None}
    weight_bytes = sum(numel * (NF4_BYTES_PER_PARAM if name in quantized else act)
                       for name, numel in inv.param_numel.items())
    layer_bytes: dict[int | None, float] = defaultdict(float)
    for name, numel in inv.param_numel.items():
        layer_bytes[inv.param_layer[name]] += numel * (NF4_BYTES_PER_PARAM if name in quantized else act)

    # adapters: trainable tensors, buffers, optimizer states
    targets = [inv.linears[n] for n in inv.targets]
    if full:
        trainable = sum(inv.param_numel.values())
        manifold = 0
        adapter_param_bytes, buffer_bytes = 0, 0
        trainable_bytes = trainable * act
        largest_trainable = max(inv.param_numel.values()) * act
    else:
        trainable = manifold = buffer_bytes = 0
        largest_trainable = 0
        for lin in targets:
            try:
                t = adapter_tensors(config, lin.d_in, lin.d_out, adapter_size)
            except ValueError as err:
                raise PlanInputError(f"cannot adapt {lin.name!r} (d_in={lin.d_in}, d_out={lin.d_out}): {err}") from None
            trainable += t.trainable
            manifold += t.manifold
            buffer_bytes += t.buffer_bytes
            largest_trainable = max(largest_trainable, t.trainable * adapter_size)
        trainable_bytes = trainable * adapter_size
        adapter_param_bytes = trainable_bytes
    states = 2 * (trainable_bytes - manifold * adapter_size) + manifold * adapter_size
    grads = trainable_bytes
    if req.device_kind == "cuda":
        step_temp = trainable_bytes  # foreach: one more copy of every trainable tensor
    else:
        step_temp = 2 * largest_trainable  # one tensor at a time: sqrt, then the division

    # saved activations
    adapted: dict[int, set[str]] = defaultdict(set)
    for lin in targets:
        if lin.layer is not None:
            adapted[lin.layer].add(lin.short)
    dims = inv.dims
    walked = base_saved(dims, batch, act, full=full, adapted={} if full else adapted)
    base = walked.bytes
    mask = 1 if req.device_kind == "cuda" else act  # dropout masks: bool on CUDA, the input's dtype on a CPU
    module_bytes, module_layers = (0, {}) if full else _modules_saved(
        config, targets, dims.family, batch.tokens, act, adapter_size, walked.input_grad, mask,
        prepared=_prepared(req))
    transient = loss_backward_transient(dims, batch, act)
    if full and not dims.tied and inv.head is not None:
        head = inv.linears[inv.head]
        transient = max(transient, act * batch.tokens * dims.vocab + act * head.d_in * head.d_out)
    if req.gradient_checkpointing:
        per_layer_modules = [module_layers.get(i, 0) for i in range(dims.layers)]
        kept, recomputed = checkpointed_saved(dims, batch, act, walked, per_layer_modules)
        base, module_bytes = kept, module_bytes - sum(per_layer_modules)
        transient = max(transient, recomputed)  # one layer's activations at a time, after the loss's backward
        notes.append("gradient checkpointing: each decoder layer keeps its input; the largest layer's activations "
                     "are recomputed at a time in the backward (under 'loss backward')")

    gathered = 0
    if req.sharding == "fsdp":
        gathered = 2 * max(v for k, v in layer_bytes.items() if k is not None)  # running + prefetched layer
        notes.append("fsdp: weights, trainable tensors, gradients and optimizer states are divided by the world "
                     "size; two decoder layers' weights are gathered at a time")
    buckets = grads if req.sharding == "ddp" else 0
    parts = {
        "weights": int(weight_bytes / shard + gathered),
        "adapter_params": int(adapter_param_bytes / shard),
        "adapter_buffers": int(buffer_bytes),
        "optimizer_states": int(states / shard),
        "gradients": int(grads / shard),
        "ddp_buckets": int(buckets),
        "activations": int(base + module_bytes),
        "loss_transient": int(transient),
        "optimizer_temporaries": int(step_temp / shard),
    }
    static = (parts["weights"] + parts["adapter_params"] + parts["adapter_buffers"] + parts["optimizer_states"]
              + parts["ddp_buckets"])
    phases = {
        "backward": static + parts["activations"] + parts["loss_transient"] + (0 if full else parts["gradients"]),
        "step": static + parts["gradients"] + parts["optimizer_temporaries"],
    }
    estimate: list[EstimatePeak] = []
    auto = None
    if hasattr(config, "lora_ga_config"):
        ga = config.lora_ga_config()
        from ..gradient_init import choose_estimator

        adapted_params = inv.linear_weight_numel(inv.targets)
        auto = choose_estimator(ga.estimator, adapted_params)
        estimate = _estimate_peaks(req, config, ga, inv, targets, batch, act, adapter_size, parts, walked, mask)
    if req.quantization == "nf4":
        notes.append(f"nf4: {len(quantized)} decoder linear weights at {NF4_BYTES_PER_PARAM:.4f} bytes per parameter "
                     "(bitsandbytes, nested statistics); adapters in float32")
    return Plan(req, config, len(targets), trainable, parts, {"base": int(base), "adapted_modules": int(module_bytes)},
                phases, max(phases.values()), estimate, notes, auto)


def _modules_saved(config: AdapterConfig, targets, family: str, n: int, act: int, adapter_size: int,
                   input_grad: dict[tuple[int, str], bool], mask: int,
                   force_input: bool = False, prepared: bool = False) -> tuple[int, dict[int | None, int]]:
    """Saved bytes of the adapted modules (total, per decoder layer), each shared input kept once
    and what the base keeps not again."""
    per_layer: dict[int | None, int] = defaultdict(int)
    inputs: dict[tuple[int | None, str], int] = {}
    for lin in targets:
        group = INPUT_GROUP.get(family, {}).get(lin.short, lin.name)
        x_grad = input_grad.get((lin.layer, group), True)
        cost = module_saved(config, lin.d_in, lin.d_out, n, act, adapter_size, x_grad=x_grad, mask=mask,
                            prepared=prepared)
        per_layer[lin.layer] += cost.other
        if (cost.keeps_input or force_input) and lin.short not in INPUT_SAVED.get(family, ()):
            inputs[(lin.layer, group)] = n * lin.d_in * act
        if cost.keeps_output and (lin.bias or lin.short not in OUTPUT_SAVED.get(family, ())):
            per_layer[lin.layer] += n * lin.d_out * act
    for (layer, _), nbytes in inputs.items():
        per_layer[layer] += nbytes
    return sum(per_layer.values()), dict(per_layer)


def _prepared(req: PlanRequest) -> bool:
    """Whether the adapters' blocks come from the model-wide preparation (``hybridpeft.adapters.prepared``)."""
    from ..adapters.prepared import PREPARE_DEVICES

    return req.device_kind in PREPARE_DEVICES and req.sharding != "fsdp"


def _estimate_peaks(req: PlanRequest, config, ga, inv: Inventory, targets, batch: Batch, act: int, adapter_size: int,
                    parts: dict[str, int], walked, mask: int) -> list[EstimatePeak]:
    """Device and host peaks of LoRA-GA's estimate, exact and sketch."""
    n = batch.tokens
    activation_path = req.quantization == "nf4" or req.sharding == "fsdp"
    # every adapted weight requires a gradient: each adapted module keeps its input as well
    module_bytes, module_layers = _modules_saved(config, targets, inv.dims.family, n, act, adapter_size,
                                                 walked.input_grad, mask, force_input=True, prepared=_prepared(req))
    saved, transient = walked.bytes + module_bytes, parts["loss_transient"]
    if req.gradient_checkpointing:
        per_layer = [module_layers.get(i, 0) for i in range(inv.dims.layers)]
        kept, recomputed = checkpointed_saved(inv.dims, batch, act, walked, per_layer)
        saved, transient = kept + module_bytes - sum(per_layer), max(transient, recomputed)
    device_static = parts["weights"] + parts["adapter_params"] + parts["adapter_buffers"]
    common = device_static + saved + transient
    largest = max(lin.d_in * lin.d_out for lin in targets)
    adapted = inv.linear_weight_numel(inv.targets)
    widest = max(lin.d_in + lin.d_out for lin in targets)
    out = []
    if activation_path:
        exact_flight = 4 * largest + 4 * n * widest  # gᵀx in float32, g and x upcast
    else:
        exact_flight = act * largest  # one weight's gradient, then copied to the host
    out.append(EstimatePeak("exact", common + exact_flight, 4 * adapted + (act + 4) * largest,
                            {"accumulators_host": 4 * adapted, "in_flight": exact_flight}))
    bank = sum(sketch_bytes(lin.d_out, lin.d_in, ga.sketch_size_for(lin.d_in, lin.d_out), ga.sketch_passes)
               for lin in targets)
    k = max(ga.sketch_size_for(lin.d_in, lin.d_out) for lin in targets)
    if activation_path:
        sketch_flight = 4 * n * widest + 4 * n * 3 * k  # g and x upcast; xΩ, Ψgᵀ
    else:
        sketch_flight = act * largest + (4 * largest if act != 4 else 0) + 4 * 3 * k * widest
    out.append(EstimatePeak("sketch", common + bank + sketch_flight, 0,
                            {"sketches": bank, "in_flight": sketch_flight, "k": k, "passes": ga.sketch_passes}))
    return out


def plan_many(requests: list[PlanRequest]) -> list[Plan]:
    return [plan(r) for r in requests]
