"""The methods a step-time run compares: ours, HF PEFT's, and two references.

Each ``Method`` turns a fresh base model into something trainable: the model
to call, the optimizer (``None`` for the frozen floor), an optional per-step
hook and ``info`` (effective settings, notes). A method of ours is listed only
when its config class is registered in ``hybridpeft.adapters.config.known_methods()``,
so the benchmark picks up adapters as they land.

``match`` in ``info`` is what pairs a method of ours with PEFT's at equal
settings for the ours/PEFT ratio, e.g. ``"boft b8 m3"``: it is computed from
the *effective* settings, because PEFT's BOFT silently drops to one butterfly
factor when its CUDA extension cannot be built (always on CPU).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from perf_models import TARGETS


@dataclass
class Settings:
    """Hyper-parameters shared by a method of ours and its PEFT counterpart.

    Args:
        r, alpha: LoRA rank and scale numerator (LoRA, LoRA-GA, Hybrid, PEFT LoRA).
        boft_block, boft_factors: BOFT block size b and butterfly factors m.
        oft_block: block size of the full-capacity unitary and of PEFT's OFT.
        lr: AdamW learning rate (irrelevant to timing, kept small so bf16 stays finite).
        peft_boft_ext: ``"auto"`` lets PEFT build its CUDA block-diagonal
            extension (without it PEFT's BOFT runs with m = 1); ``"off"`` skips the build.
        ga_batches: batches the LoRA-GA / Hybrid gradient estimate averages.
        ga_init: run that estimate; ``False`` keeps the zero start, which costs the
            same per step (the rank-2r branch runs either way) and saves the
            estimate's minutes at 8B.
    """

    r: int = 16
    alpha: float = 32.0
    boft_block: int = 8
    boft_factors: int = 3
    oft_block: int = 32
    lr: float = 1e-4
    peft_boft_ext: str = "auto"
    ga_batches: int = 2
    ga_init: bool = True


@dataclass
class Prepared:
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    after_step: Callable[[], None] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One row of the table.

    Args:
        name: CLI and table name.
        family: ``"ours"``, ``"peft"`` or ``"reference"`` (floor, full FT).
        summary: settings in words, for the table.
        prepare: ``(model, settings, batch) -> Prepared``; ``batch`` (B, T) is
            there for methods whose initialization reads gradients.
        missing: ``() -> reason`` it cannot run here, or ``None``.
    """

    name: str
    family: str
    summary: str
    prepare: Callable[[nn.Module, Settings, Tensor], Prepared]
    missing: Callable[[], str | None]


# ---------------------------------------------------------------- references

def _prepare_floor(model: nn.Module, settings: Settings, batch: Tensor) -> Prepared:
    # Nothing trains, yet backward must traverse every layer: make the embedding
    # output require grad so autograd computes activation gradients only.
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()
    return Prepared(model, None, info={"match": "floor"})


def _prepare_full(model: nn.Module, settings: Settings, batch: Tensor) -> Prepared:
    for p in model.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    return Prepared(model, torch.optim.AdamW(params, lr=settings.lr), info={"match": "full"})


def _prepare_full_backward(model: nn.Module, settings: Settings, batch: Tensor) -> Prepared:
    # The yardstick for LoRA-GA's gradient estimate: every weight gradient held at once, no optimizer.
    for p in model.parameters():
        p.requires_grad_(True)
    return Prepared(model, None, info={"match": "full-bwd"})


def _always() -> str | None:
    return None


# ---------------------------------------------------------------- ours

def _our_config(method: str, **fields: Any):
    """Build our config for ``method``; a field the class lacks is an error, not a silent drop."""
    from hybridpeft.adapters.config import config_class

    cls = config_class(method)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}; update benchmarks/perf_methods.py")
    return cls(target_modules=list(TARGETS), **fields)


def _registered(method: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        from hybridpeft.adapters.config import known_methods

        return None if method in known_methods() else f"hybridpeft has no method {method!r} yet"

    return missing


def _optimizer_for(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW on the adapter tensors, or ``hybridpeft.build_optimizer`` when some are manifold tensors."""
    import hybridpeft
    from hybridpeft.inject import adapted_layers

    manifold = [p for _, layer in adapted_layers(model) for p in layer.adapter.manifold_parameters()]
    if manifold:
        return _call_with_known_kwargs(hybridpeft.build_optimizer, model, lr=lr)
    return torch.optim.AdamW(list(hybridpeft.trainable_parameters(model).values()), lr=lr)


def _call_with_known_kwargs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    accepted = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    return fn(*args, **kwargs)


def _ours(method: str, fields: Callable[[Settings], dict[str, Any]], match: Callable[[Settings], str],
          init: Callable[[nn.Module, Settings, Tensor], dict[str, Any]] | None = None, butterfly: str | None = None,
          prepare_devices: frozenset[str] | None = None):
    """``butterfly``: force BOFT's form (``"composed"`` / ``"factored"``) in every BOFT or Hybrid layer.
    ``prepare_devices``: set as every BOFT branch's ``prepare_devices`` (overriding
    ``hybridpeft.adapters.prepared.PREPARE_DEVICES`` for this model only): where the model-wide
    preparation of BOFT/Hybrid blocks runs."""

    def prepare(model: nn.Module, settings: Settings, batch: Tensor) -> Prepared:
        import hybridpeft


        config = _our_config(method, **fields(settings))
        hybridpeft.inject(model, config)
        info: dict[str, Any] = {"match": match(settings), "config": config.to_dict()}
        if butterfly is not None:
            info["butterfly_form"] = _force_butterfly_form(model, butterfly)
        if prepare_devices is not None:
            info["prepare_devices"] = sorted(_set_prepare_devices(model, prepare_devices))
        if init is not None:
            info.update(init(model, settings, batch))
        optimizer = _optimizer_for(model, settings.lr)
        return Prepared(model, optimizer, lambda: hybridpeft.after_optimizer_step(model), info)

    return prepare


def _force_butterfly_form(model: nn.Module, form: str) -> str:
    from hybridpeft.inject import adapted_layers

    layers = [layer.adapter for _, layer in adapted_layers(model)]
    bofts = [getattr(a, "boft", a) for a in layers if hasattr(a, "boft") or hasattr(a, "form")]
    if not bofts:
        raise ValueError("no BOFT layer to set the butterfly form of")
    for boft in bofts:
        boft.form = form
    return form


def _set_prepare_devices(model: nn.Module, devices: frozenset[str]) -> frozenset[str]:
    from hybridpeft.inject import adapted_layers

    for _, layer in adapted_layers(model):
        boft = getattr(layer.adapter, "boft", layer.adapter)
        if hasattr(boft, "boft_Q"):
            boft.prepare_devices = devices
    return devices


def _gradient_init(model: nn.Module, settings: Settings, batch: Tensor) -> dict[str, Any]:
    """LoRA-GA / Hybrid start: estimate the weight gradients and initialize from their SVD.

    Returns the seconds and the peak memory the estimate took (measured by the caller's meter).
    """
    import hybridpeft

    if not settings.ga_init:
        return {"init": "skipped (--no-ga-init): zero start, same per-step cost"}
    init_fn = getattr(hybridpeft, "lora_ga_init", None) or getattr(hybridpeft, "initialize_from_gradients", None)
    if init_fn is None:
        return {"init": "no gradient initializer exported by hybridpeft; adapters keep their default start"}
    batches = [{"input_ids": batch, "labels": batch} for _ in range(settings.ga_batches)]
    _call_with_known_kwargs(init_fn, model, batches, num_batches=settings.ga_batches)
    return {"init": f"{init_fn.__name__} over {settings.ga_batches} batches"}


def _lora_fields(s: Settings) -> dict[str, Any]:
    return {"r": s.r, "alpha": s.alpha}


OURS: tuple[Method, ...] = (
    Method("lora", "ours", "r16 α32", _ours("lora", _lora_fields, lambda s: f"lora r{s.r}"), _registered("lora")),
    Method(
        "boft", "ours", "b8 m3, output side",
        _ours("boft", lambda s: {"block_size": s.boft_block, "n_factors": s.boft_factors, "side": "output"},
              lambda s: f"boft b{s.boft_block} m{s.boft_factors}"),
        _registered("boft"),
    ),
    Method(
        "boft-prepared", "ours", "b8 m3, output side, blocks of every layer prepared at once on the CPU too",
        _ours("boft", lambda s: {"block_size": s.boft_block, "n_factors": s.boft_factors, "side": "output"},
              lambda s: f"boft b{s.boft_block} m{s.boft_factors}", prepare_devices=frozenset({"cpu", "cuda"})),
        _registered("boft"),
    ),
    Method(
        "boft-layerwise", "ours", "b8 m3, output side, every layer computes its own blocks (also on CUDA)",
        _ours("boft", lambda s: {"block_size": s.boft_block, "n_factors": s.boft_factors, "side": "output"},
              lambda s: f"boft b{s.boft_block} m{s.boft_factors}", prepare_devices=frozenset()),
        _registered("boft"),
    ),
    Method(
        "boft-recompute", "ours", "b8 m3, output side, recompute_base (keeps x, not h = W x)",
        _ours("boft", lambda s: {"block_size": s.boft_block, "n_factors": s.boft_factors, "side": "output",
                                 "recompute_base": True},
              lambda s: f"boft b{s.boft_block} m{s.boft_factors}"),
        _registered("boft"),
    ),
    Method(
        "boft-factored", "ours", "b8 m3, output side, factored butterfly (m gathers + b×b matmuls; before the composed form)",
        _ours("boft", lambda s: {"block_size": s.boft_block, "n_factors": s.boft_factors, "side": "output"},
              lambda s: f"boft b{s.boft_block} m{s.boft_factors}", butterfly="factored"),
        _registered("boft"),
    ),
    Method(
        "boft-m1", "ours", "b8 m1 (= PEFT BOFT without its CUDA extension)",
        _ours("boft", lambda s: {"block_size": s.boft_block, "n_factors": 1, "side": "output"},
              lambda s: f"boft b{s.boft_block} m1"),
        _registered("boft"),
    ),
    Method(
        "unitary", "ours", "structured (FFT, reflections)",
        _ours("unitary", lambda s: {"parameterization": "structured"}, lambda s: "unitary structured"),
        _registered("unitary"),
    ),
    Method(
        "unitary-recompute", "ours", "structured, recompute (keeps h = W x, redoes the branch in backward)",
        _ours("unitary", lambda s: {"parameterization": "structured", "recompute": True},
              lambda s: "unitary structured"),
        _registered("unitary"),
    ),
    Method(
        "unitary-recompute-base", "ours", "structured, recompute_base (keeps x, redoes W x and the branch)",
        _ours("unitary", lambda s: {"parameterization": "structured", "recompute_base": True},
              lambda s: "unitary structured"),
        _registered("unitary"),
    ),
    Method(
        "unitary-full", "ours", "full capacity, b32 blocks, Riemannian",
        _ours("unitary", lambda s: {"parameterization": "full", "block_size": s.oft_block},
              lambda s: f"oft b{s.oft_block}"),
        _registered("unitary"),
    ),
    Method(
        "unitary-full-recompute", "ours", "full capacity, b32, Riemannian, recompute_base (keeps x, not h = W x)",
        _ours("unitary", lambda s: {"parameterization": "full", "block_size": s.oft_block, "recompute_base": True},
              lambda s: f"oft b{s.oft_block}"),
        _registered("unitary"),
    ),
    Method(
        "unitary-full-f32", "ours", "full capacity, b32, float32 blocks (its docstring's advice for bf16 models)",
        _ours("unitary", lambda s: {"parameterization": "full", "block_size": s.oft_block, "adapter_dtype": "float32"},
              lambda s: f"oft b{s.oft_block} f32"),
        _registered("unitary"),
    ),
    Method("dora", "ours", "r16 α32, row norm from ‖W_i‖ + r-sized terms",
           _ours("dora", _lora_fields, lambda s: f"dora r{s.r}"), _registered("dora")),
    Method("ia3", "ours", "q/k/v/o/gate/up: output scale; down_proj: input scale",
           _ours("ia3", lambda s: {"feedforward_modules": ["down_proj"]}, lambda s: "ia3"), _registered("ia3")),
    Method(
        "lora_ga", "ours", "r16 α32, gradient-SVD start",
        _ours("lora_ga", _lora_fields, lambda s: f"lora_ga r{s.r}", init=_gradient_init),
        _registered("lora_ga"),
    ),
    Method(
        "hybrid", "ours", "LoRA-GA r16 + BOFT b8 m3, adaptive λ",
        _ours("hybrid", lambda s: {"lora_r": s.r, "lora_alpha": s.alpha, "boft_block_size": s.boft_block,
                                   "boft_n_factors": s.boft_factors},
              lambda s: f"hybrid r{s.r} b{s.boft_block} m{s.boft_factors}", init=_gradient_init),
        _registered("hybrid"),
    ),
    Method(
        "hybrid-prepared", "ours", "LoRA-GA r16 + BOFT b8 m3, adaptive λ, every layer's M prepared at once on the CPU too",
        _ours("hybrid", lambda s: {"lora_r": s.r, "lora_alpha": s.alpha, "boft_block_size": s.boft_block,
                                   "boft_n_factors": s.boft_factors},
              lambda s: f"hybrid r{s.r} b{s.boft_block} m{s.boft_factors}", init=_gradient_init,
              prepare_devices=frozenset({"cpu", "cuda"})),
        _registered("hybrid"),
    ),
    Method(
        "hybrid-layerwise", "ours", "LoRA-GA r16 + BOFT b8 m3, adaptive λ, every layer computes its own M (also on CUDA)",
        _ours("hybrid", lambda s: {"lora_r": s.r, "lora_alpha": s.alpha, "boft_block_size": s.boft_block,
                                   "boft_n_factors": s.boft_factors},
              lambda s: f"hybrid r{s.r} b{s.boft_block} m{s.boft_factors}", init=_gradient_init, prepare_devices=frozenset()),
        _registered("hybrid"),
    ),
    Method(
        "hybrid-factored", "ours", "LoRA-GA r16 + BOFT b8 m3, adaptive λ, factored butterfly and lerp (before the composed form)",
        _ours("hybrid", lambda s: {"lora_r": s.r, "lora_alpha": s.alpha, "boft_block_size": s.boft_block,
                                   "boft_n_factors": s.boft_factors},
              lambda s: f"hybrid r{s.r} b{s.boft_block} m{s.boft_factors}", init=_gradient_init, butterfly="factored"),
        _registered("hybrid"),
    ),
    Method(
        "hybrid-recompute", "ours", "LoRA-GA r16 + BOFT b8 m3, adaptive λ, recompute_base (keeps x, not h = W x)",
        _ours("hybrid", lambda s: {"lora_r": s.r, "lora_alpha": s.alpha, "boft_block_size": s.boft_block,
                                   "boft_n_factors": s.boft_factors, "recompute_base": True},
              lambda s: f"hybrid r{s.r} b{s.boft_block} m{s.boft_factors}", init=_gradient_init),
        _registered("hybrid"),
    ),
)


# ---------------------------------------------------------------- HF PEFT

def _peft_missing() -> str | None:
    try:
        import peft  # noqa: F401
    except ImportError:
        return "peft is not installed (pip install peft)"
    return None


def _peft(make_config: Callable[[Settings], Any], match: Callable[[nn.Module, Settings], dict[str, Any]]):
    """``match`` returns info entries: at least ``match``, the effective settings."""

    def prepare(model: nn.Module, settings: Settings, batch: Tensor) -> Prepared:
        import peft

        peft_model = peft.get_peft_model(model, make_config(settings))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        info = {"peft_version": peft.__version__, **match(peft_model, settings)}
        return Prepared(peft_model, torch.optim.AdamW(params, lr=settings.lr), None, info)

    return prepare


def _peft_lora_config(s: Settings):
    import peft

    return peft.LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=0.0, target_modules=list(TARGETS))


def _peft_boft_config(s: Settings):
    import peft

    if s.peft_boft_ext == "off":
        import peft.tuners.boft.layer as boft_layer

        boft_layer._FBD_CUDA = False  # PEFT caches the extension here; False = "tried, unavailable"
    return peft.BOFTConfig(boft_block_size=s.boft_block, boft_n_butterfly_factor=s.boft_factors,
                           boft_dropout=0.0, target_modules=list(TARGETS))


def _peft_boft_match(model: nn.Module, s: Settings) -> dict[str, Any]:
    # boft_R has shape (m, blocks, b, b); PEFT lowers m to 1 without its CUDA extension.
    factors = {mod.boft_R["default"].shape[0] for mod in model.modules() if hasattr(mod, "boft_R") and "default" in mod.boft_R}
    m = factors.pop() if len(factors) == 1 else "mixed"
    info: dict[str, Any] = {"match": f"boft b{s.boft_block} m{m}"}
    if m != s.boft_factors:
        info["note_effective"] = (f"PEFT ran BOFT with m={m}, not the m={s.boft_factors} asked for: its CUDA "
                                  "block-diagonal extension was not built (always so on CPU)")
    return info


def _peft_dora_config(s: Settings):
    import peft

    return peft.LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=0.0, target_modules=list(TARGETS), use_dora=True)


def _peft_ia3_config(s: Settings):
    import peft

    return peft.IA3Config(target_modules=list(TARGETS), feedforward_modules=["down_proj"])


def _peft_oft_config(s: Settings):
    import peft

    return peft.OFTConfig(r=0, oft_block_size=s.oft_block, module_dropout=0.0, target_modules=list(TARGETS))


PEFT: tuple[Method, ...] = (
    Method("peft-lora", "peft", "r16 α32", _peft(_peft_lora_config, lambda m, s: {"match": f"lora r{s.r}"}), _peft_missing),
    Method("peft-dora", "peft", "r16 α32, use_dora",
           _peft(_peft_dora_config, lambda m, s: {"match": f"dora r{s.r}"}), _peft_missing),
    Method("peft-ia3", "peft", "same targets, down_proj feedforward",
           _peft(_peft_ia3_config, lambda m, s: {"match": "ia3"}), _peft_missing),
    Method("peft-boft", "peft", "b8 m3 (input side)", _peft(_peft_boft_config, _peft_boft_match), _peft_missing),
    Method("peft-oft", "peft", "b32, Cayley-Neumann (input side)",
           _peft(_peft_oft_config, lambda m, s: {"match": f"oft b{s.oft_block}"}), _peft_missing),
)

REFERENCES: tuple[Method, ...] = (
    Method("floor", "reference", "frozen fwd+bwd, no optimizer", _prepare_floor, _always),
    Method("full", "reference", "full fine-tuning, AdamW", _prepare_full, _always),
    Method("full-bwd", "reference", "full fwd+bwd, all weight grads, no optimizer", _prepare_full_backward, _always),
)

ALL: dict[str, Method] = {m.name: m for m in REFERENCES + OURS + PEFT}
