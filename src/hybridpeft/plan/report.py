"""The planner's output: a plain-text breakdown per device, or a JSON object."""
from __future__ import annotations

from typing import Any

from .estimate import GiB, Plan

ROWS = [  # (part, label) in the order printed
    ("weights", "weights (frozen base{quant})"),
    ("adapter_params", "trainable parameters"),
    ("adapter_buffers", "adapter buffers (frozen starts, indices)"),
    ("optimizer_states", "optimizer states (AdamW: 2 per trainable)"),
    ("gradients", "gradients"),
    ("ddp_buckets", "DDP gradient buckets"),
    ("activations", "saved activations"),
    ("loss_transient", "loss backward (logit gradients)"),
    ("optimizer_temporaries", "optimizer step temporaries"),
]


def _gib(value: float) -> str:
    return f"{value / GiB:10.2f}"


def format_plan(p: Plan) -> str:
    r = p.request
    cfg = p.config
    settings = ", ".join(f"{k}={v}" for k, v in sorted(r.adapter.items())) or "defaults"
    lines = [
        f"hybridpeft plan: {r.model}, method {r.method} ({settings}), {p.modules} adapted modules, "
        f"{p.trainable_params:,} trainable parameters",
        f"  per device: batch {r.batch} × seq {r.seq} tokens, {r.dtype}"
        + (", nf4 base" if r.quantization == "nf4" else "")
        + f", world size {r.world_size}, sharding {r.sharding}, optimizer on {r.device_kind}",
        "",
        f"  {'training step, per device':<48}{'GiB':>10}",
    ]
    quant = ", nf4" if r.quantization == "nf4" else ""
    for key, label in ROWS:
        if key == "ddp_buckets" and not p.parts[key]:
            continue
        lines.append(f"  {label.format(quant=quant):<48}{_gib(p.parts[key])}")
        if key == "activations":
            lines.append(f"  {'   base model':<48}{_gib(p.activations['base'])}")
            lines.append(f"  {'   adapted modules':<48}{_gib(p.activations['adapted_modules'])}")
    lines.append(f"  {'peak: backward (static + activations + loss)':<48}{_gib(p.phases['backward'])}")
    lines.append(f"  {'      optimizer step (static + grads + temps)':<48}{_gib(p.phases['step'])}")
    lines.append(f"  {'PEAK':<48}{_gib(p.peak)}")
    if p.estimate:
        lines += ["", f"  {'LoRA-GA gradient estimate (before training)':<48}{'device GiB':>12}{'host GiB':>10}"]
        for e in p.estimate:
            extra = ""
            if e.estimator == "sketch":
                passes = e.detail["passes"]
                extra = f" (k = {e.detail['k']}, {passes} pass{'es' if passes > 1 else ''})"
            lines.append(f"  {(e.estimator + extra):<48}{e.device / GiB:12.2f}{e.host / GiB:10.2f}")
        lines.append(f"  estimator={cfg.lora_ga_config().estimator!r} picks: {p.auto_estimator}")
    fits = p.fits()
    if fits is not None:
        worst = p.worst()
        verdict = "FITS" if fits else "DOES NOT FIT"
        lines += ["", f"  {verdict} in {r.device_memory_gib:g} GiB per device "
                      f"(largest predicted peak {worst / GiB:.2f} GiB, {100 * worst / (r.device_memory_gib * GiB):.0f}%)"]
    for note in p.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines) + "\n"


def plan_json(p: Plan) -> dict[str, Any]:
    import dataclasses

    return {
        "request": dataclasses.asdict(p.request),
        "modules": p.modules,
        "trainable_params": p.trainable_params,
        "parts": p.parts,
        "activations": p.activations,
        "phases": p.phases,
        "peak": p.peak,
        "estimate": [dataclasses.asdict(e) for e in p.estimate],
        "auto_estimator": p.auto_estimator,
        "fits": p.fits(),
        "notes": p.notes,
    }
