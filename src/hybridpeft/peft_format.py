"""HF PEFT's adapter format, out and in: what vLLM, TGI, SGLang and the Hub load.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` (r, d_in),
``….lora_B.weight`` (d_out, r), for DoRA ``….lora_magnitude_vector`` (d_out,), for
IA³ ``….ia3_l`` ((d_out, 1), or (1, d_in) on a feedforward module), and for
``modules_to_save`` the module's own tensors ``base_model.model.<module>.<name>``.
PEFT's LoRA is ``W x + s B A x`` with ``s = lora_alpha / r`` (``/ √r`` with
``use_rslora``) — ours exactly, so a LoRA is a renaming.

``export_peft`` writes that format from a model injected with:

- ``lora`` — r, alpha, rsLoRA, dropout, targets and ``trainable_modules``
  (as ``modules_to_save``) carried over;
- ``lora_ga`` — ``ΔW = s (B A − B0 A0) = s [B, −B0] · [A; A0]`` is a LoRA of rank
  ``2r`` with the frozen start inside it, so no base weight is rewritten; ``lora_alpha``
  is set so that the scaling stays ``s`` (``2α`` without rsLoRA, ``√2 α`` with it);
- ``dora`` (``use_dora``) and ``ia3`` (``peft_type: IA3``) — same tensors as PEFT's.

BOFT, the unitary adapter and the Hybrid are refused (``NotRepresentable``): PEFT's
BOFT rotates the input side with its own parameterization and PEFT has no unitary or
Hybrid method; ``hybridpeft merge`` writes a plain model, their portable form.
Writing never imports ``peft``.

``load_peft`` reads a PEFT LoRA (any r, alpha, rsLoRA, target names), DoRA or IA³
adapter onto a base model as our ``lora`` / ``dora`` / ``ia3``, to evaluate it or
train on. PEFT features we do not implement are refused in one line that names them.

Which config fields the serving engines read (checked by ``serving_problems``):

- vLLM (``PEFTHelper``): requires ``r``, ``lora_alpha``, ``target_modules``; reads
  ``use_rslora`` for the scaling; refuses ``use_dora``, ``bias`` other than
  ``"none"``, ``lora_bias``, ``modules_to_save`` other than a classification head
  (``classifier`` / ``score``), weight-rewriting inits (PiSSA, OLoRA, CorDA, LoftQ),
  aLoRA, ``layer_replication``, QALoRA; and any rank above its ``--max-lora-rank``
  (default 16). It maps tensors by the module names in the keys.
- TGI and SGLang: ``r``, ``lora_alpha``, ``target_modules``, ``fan_in_fan_out``,
  ``base_model_name_or_path`` (TGI checks the adapter was made for the served model).
- The Hub / ``AutoPeftModel``: ``peft_type``, ``task_type`` and
  ``base_model_name_or_path`` pick the model class and the base to download.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapters.base import is_supported_layer, layer_shape
from .adapters.config import AdapterConfig
from .inject import CONFIG_ATTR, _trainable_module_names, adapted_layers, config_of, find_targets, inject
from .patterns import select

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."
EXPORTABLE = ("lora", "lora_ga", "dora", "ia3")
VLLM_DEFAULT_MAX_RANK = 16
VLLM_HEADS = ("classifier", "score")


class NotRepresentable(ValueError):
    """The model's method has no PEFT equivalent (BOFT, unitary, Hybrid, full fine-tuning)."""


_WHY_NOT = {
    "boft": "PEFT's BOFT rotates the input side (W R) with its own butterfly layout; ours rotates the output (R W)",
    "unitary": "PEFT has no unitary adapter",
    "hybrid": "PEFT has no Hybrid (λ-mixed LoRA-GA and BOFT) method",
    "full": "full fine-tuning changes every weight; there is no adapter to export",
}


# ---------------------------------------------------------------- export

def check_exportable(method: str) -> None:
    """Raise ``NotRepresentable`` (one line: why, and what to do instead) unless ``method`` exports."""
    if method not in EXPORTABLE:
        why = _WHY_NOT.get(method, "PEFT has no equivalent method")
        raise NotRepresentable(f"method={method!r} cannot be exported in PEFT format ({why}); "
                               "merge it instead (hybridpeft merge ADAPTER OUT, or hp.merge_and_unload): "
                               "a merged model is its portable form")


def export_peft(model: nn.Module, path: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapter in HF PEFT's format into directory ``path``.

    Args:
        model: injected with ``lora``, ``lora_ga``, ``dora`` or ``ia3``.
        path: output directory (created; existing adapter files there are replaced).
        base_model_name_or_path: recorded for the Hub / TGI; default the model's
            ``config._name_or_path``.

    Returns:
        ``path``. Both files are written to a temporary directory first and moved in
        together, so a failure leaves nothing behind.

    Raises:
        NotRepresentable: the method has no PEFT form (the message says why and
            points to ``merge``).
        ValueError: the model carries no adapters.
    """
    config = config_of(model)
    check_exportable(config.method)
    layers = adapted_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        tensors.update(_peft_tensors(name, layer.adapter, config.method))
    saved_modules = _trainable_module_names(model, config)
    _refuse_tied(model, saved_modules, "trainable_modules")
    for name in saved_modules:
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = value
    names = [name for name, _ in layers]
    meta = _peft_config(model, config, names, saved_modules, base_model_name_or_path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}  # no shared storage
    return _write_atomically(Path(path), meta, tensors)


def _refuse_tied(model: nn.Module, module_names: list[str], field: str) -> None:
    """A module trained in full whose weight is tied to another module (GPT-2's ``lm_head`` and
    ``wte``) means different things: PEFT's ``modules_to_save`` trains an untied copy, ours the
    shared tensor. Refused rather than silently changed."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for module in module_names:
        for local, p in model.get_submodule(module).named_parameters():
            others = [n for n in owners[id(p)] if not n.startswith(module + ".")]
            if others:
                raise ValueError(f"{field} entry {module!r} shares {module}.{local} with {others[0]!r} (tied weights): "
                                 "PEFT's modules_to_save trains an untied copy, hybridpeft the shared tensor; "
                                 "this is not converted")


def _peft_tensors(name: str, adapter: nn.Module, method: str) -> dict[str, torch.Tensor]:
    key = PREFIX + name
    if method == "ia3":
        l = adapter.ia3_l  # (d_in,) or (d_out,)
        return {f"{key}.ia3_l": l.view(1, -1) if adapter.feedforward else l.view(-1, 1)}
    a, b = adapter.lora_A, adapter.lora_B  # (r, d_in), (d_out, r)
    if method == "lora_ga":  # s (B A − B0 A0) = s [B, −B0] [A; A0], whatever offset mode this process uses
        a = torch.cat([a, adapter.lora_A0.to(a.dtype)])  # (2r, d_in)
        b = torch.cat([b, -adapter.lora_B0.to(b.dtype)], dim=1)  # (d_out, 2r)
    out = {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
    if method == "dora":
        out[f"{key}.lora_magnitude_vector"] = adapter.magnitude
    return out


def _peft_config(model: nn.Module, config: AdapterConfig, names: list[str], saved_modules: list[str],
                 base_model_name_or_path: str | None) -> dict[str, Any]:
    host_types = {type(layer.base_layer).__name__ for _, layer in adapted_layers(model)}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    common = {
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": _task_type(model),
        "inference_mode": True,
        "target_modules": _peft_targets(model, config, names),
        "exclude_modules": None,
        "modules_to_save": saved_modules or None,
        "fan_in_fan_out": "Conv1D" in host_types,  # GPT-2 stores W as (d_in, d_out)
        "revision": None,
    }
    if config.method == "ia3":
        feedforward = [n for n, layer in adapted_layers(model) if layer.adapter.feedforward]
        return {"peft_type": "IA3", **common, "feedforward_modules": _peft_feedforward(config, names, feedforward),
                "init_ia3_weights": True}
    r = config.r
    alpha = config.alpha
    if config.method == "lora_ga":  # rank 2r at the same scaling s
        r, alpha = 2 * config.r, config.scaling() * (math.sqrt(2 * config.r) if config.rslora else 2 * config.r)
    return {"peft_type": "LORA", **common, "r": r, "lora_alpha": alpha, "lora_dropout": config.dropout,
            "use_rslora": config.rslora, "use_dora": config.method == "dora", "bias": "none", "lora_bias": False,
            "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
            "layers_pattern": None}


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS")):
        if cls.endswith(suffix):
            return task
    return None


def _base_module_names(model: nn.Module) -> list[str]:
    """Module names of the model as it was before injection (nothing inside an adapted layer)."""
    adapted = [name + "." for name, _ in adapted_layers(model)]
    return [n for n, _ in model.named_modules() if n and not any(n.startswith(a) for a in adapted)]


def _peft_target_rule(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)  # PEFT's list form of target_modules


def _peft_feedforward_rule(name: str, pattern: str) -> bool:
    return name.endswith(pattern)  # PEFT's list form of feedforward_modules (no "." boundary)


def _our_rule(name: str, pattern: str) -> bool:
    return bool(select([name], pattern, "target_modules"))  # ours: equal, ".name" suffix, or "re:" full match


def _selects(patterns: list[str] | str, names: list[str], rule) -> set[str]:
    """The names that ``patterns`` select: a string is a full-match regex (PEFT's string form,
    our ``"re:"``; time-bounded, see ``hybridpeft.patterns``), a list selects by ``rule(name, entry)``."""
    if isinstance(patterns, str):
        return set(select(names, "re:" + patterns, "target_modules"))
    if rule is _our_rule:
        return {n for p in patterns for n in select(names, p, "target_modules")}
    return {n for n in names if any(rule(n, p) for p in patterns)}


def _shortest_patterns(ours: list[str], chosen: list[str], universe: list[str], rule) -> list[str] | str:
    """PEFT patterns selecting exactly ``chosen`` among ``universe`` under PEFT's ``rule``: ours if
    they mean the same there, else the modules' last name parts (``q_proj``), else the full names."""
    want = set(chosen)
    if all(not p.startswith("re:") and p != "all-linear" for p in ours) and _selects(ours, universe, rule) == want:
        return list(ours)
    if len(ours) == 1 and ours[0].startswith("re:") and _selects(ours[0][3:], universe, rule) == want:
        return ours[0][3:]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    if _selects(leaves, universe, rule) == want:
        return leaves
    return list(chosen)


def _peft_targets(model: nn.Module, config: AdapterConfig, names: list[str]) -> list[str] | str:
    return _shortest_patterns(config.target_modules, names, _base_module_names(model), _peft_target_rule)


def _peft_feedforward(config: AdapterConfig, names: list[str], feedforward: list[str]) -> list[str] | str:
    if not feedforward:
        return []
    return _shortest_patterns(config.feedforward_modules, feedforward, names, _peft_feedforward_rule)


def _write_atomically(out: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.peft-{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_file(tensors, str(staging / PEFT_WEIGHTS), metadata={"format": "pt"})
        (staging / PEFT_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if not out.exists():
            staging.replace(out)
            return out
        for name in (PEFT_WEIGHTS, PEFT_CONFIG):
            (staging / name).replace(out / name)
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- serving check

def serving_problems(path: str | os.PathLike, max_lora_rank: int = VLLM_DEFAULT_MAX_RANK) -> list[str]:
    """What would stop vLLM, TGI or SGLang from serving the PEFT adapter in ``path``,
    checked from the files alone (no engine, no ``peft`` import). Empty: nothing found.

    Checks: both files present (safetensors, not a pickle); a LoRA (``peft_type``), not
    DoRA, no bias, no ``rank_pattern``/``alpha_pattern``, ``modules_to_save`` at most a
    classification head; the fields the engines require; every key of the form
    ``base_model.model.<module>.lora_{A,B}.weight`` with both halves present and of rank
    ``r``; every module's last name part listed in ``target_modules``; ``r`` within
    ``max_lora_rank`` (vLLM's ``--max-lora-rank``, default 16).
    """
    path = Path(path)
    problems: list[str] = []
    meta = _read_config(path)
    if not (path / PEFT_WEIGHTS).is_file():
        return [f"no {PEFT_WEIGHTS} in {path}"]
    if meta.get("peft_type") != "LORA":
        return [f"peft_type={meta.get('peft_type')!r}: vLLM, TGI and SGLang serve LoRA adapters only"]
    for field in ("r", "lora_alpha", "target_modules"):
        if meta.get(field) in (None, [], ""):
            problems.append(f"{field} is missing (vLLM, TGI and SGLang require it)")
    if meta.get("use_dora"):
        problems.append("use_dora=true: vLLM does not serve DoRA (merge the adapter instead)")
    if meta.get("bias", "none") != "none" or meta.get("lora_bias"):
        problems.append(f"bias={meta.get('bias')!r} / lora_bias={meta.get('lora_bias')!r}: vLLM serves no adapter bias")
    extra = [m for m in meta.get("modules_to_save") or [] if m not in VLLM_HEADS]
    if extra:
        problems.append(f"modules_to_save={extra}: vLLM accepts only a classification head {list(VLLM_HEADS)}")
    if meta.get("rank_pattern") or meta.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern set: not every engine reads per-module ranks")
    r = meta.get("r")
    if isinstance(r, int) and r > max_lora_rank:
        problems.append(f"r={r} is above vLLM's max_lora_rank {max_lora_rank}: start vLLM with --max-lora-rank {_vllm_rank(r)}")
    with safe_open(str(path / PEFT_WEIGHTS), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    halves: dict[str, set[str]] = {}
    for key, shape in shapes.items():
        if not key.startswith(PREFIX):
            problems.append(f"tensor {key!r} lacks the {PREFIX!r} prefix")
            continue
        module, sep, part = key[len(PREFIX):].rpartition(".lora_")
        if part == "magnitude_vector":
            continue  # DoRA, reported above
        if not sep or part not in ("A.weight", "B.weight"):
            if not any(key[len(PREFIX):].startswith(m + ".") for m in meta.get("modules_to_save") or []):
                problems.append(f"tensor {key!r} is not a LoRA factor")
            continue
        halves.setdefault(module, set()).add(part[0])
        rank = shape[0] if part[0] == "A" else shape[-1]
        if isinstance(r, int) and rank != r:
            problems.append(f"tensor {key!r} has rank {rank}, config r={r}")
    for module, got in sorted(halves.items()):
        if got != {"A", "B"}:
            problems.append(f"module {module!r} has lora_{''.join(sorted(got))} only")
    targets = meta.get("target_modules") or []
    if isinstance(targets, list):
        unlisted = sorted({m for m in halves if not any(m == t or m.endswith("." + t) for t in targets)})
        if unlisted:
            problems.append(f"modules {unlisted[:3]}{'…' if len(unlisted) > 3 else ''} carry LoRA tensors but "
                            f"target_modules={targets} does not select them")
    return problems


def _vllm_rank(r: int) -> int:
    return next((c for c in (8, 16, 32, 64, 128, 256, 320, 512) if c >= r), r)


# ---------------------------------------------------------------- import

# Fields whose meaning we carry over or that do not change the adapted function.
_UNDERSTOOD = {
    "LORA": {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
             "auto_mapping", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
             "layers_to_transform", "layers_pattern", "fan_in_fan_out", "use_rslora", "use_dora", "modules_to_save",
             "init_lora_weights", "megatron_core", "qalora_group_size", "ensure_weight_tying",
             "loftq_config", "eva_config", "corda_config", "lora_ga_config"},
    "IA3": {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
            "auto_mapping", "target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
            "modules_to_save", "init_ia3_weights"},
}
# Inits that rewrite the base weights PEFT trained against: the adapter alone does not describe the model.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
_NAMED = {"bias": "none", "lora_bias": False, "use_qalora": False}


@dataclass
class _Parsed:
    method: str
    config: dict[str, Any]
    factors: dict[str, dict[str, torch.Tensor]]  # module -> part ("A", "B", "m", "l") -> tensor
    saved: dict[str, torch.Tensor]  # "<module path>.<tensor>" of modules_to_save -> tensor
    saved_modules: list[str]  # the modules_to_save modules those tensors belong to


def load_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Read a HF PEFT adapter directory onto ``model`` (a base model without adapters), in place.

    A LoRA becomes our ``lora`` (``use_dora`` our ``dora``), an IA³ adapter our ``ia3``,
    with PEFT's ``r``, ``lora_alpha``, ``use_rslora``, ``lora_dropout`` and its target
    modules (the modules named in the tensor keys; PEFT's ``target_modules`` are kept
    when they select exactly those); ``modules_to_save`` become ``trainable_modules``.
    Everything is checked before the model is touched, so on any error it is unchanged.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` / ``adapter_model.safetensors``.
        ValueError: a pickled ``adapter_model.bin`` only (never unpickled); a PEFT type
            or feature we do not implement (all named in one line); a tensor for a module
            the model lacks, or whose shape differs (the tensor and both shapes named);
            the model already carries adapters.
    """
    path = Path(path)
    if hasattr(model, CONFIG_ATTR):
        raise ValueError("model already has hybridpeft adapters; load the PEFT adapter into a fresh base model")
    parsed = _parse(path)
    config = _our_config(model, parsed, path)
    inject(model, config)
    layers = dict(adapted_layers(model))
    with torch.no_grad():
        for name, parts in parsed.factors.items():
            adapter = layers[name].adapter
            for part, value in parts.items():
                target = {"A": "lora_A", "B": "lora_B", "m": "magnitude", "l": "ia3_l"}[part]
                param = getattr(adapter, target)
                param.copy_(value.reshape(param.shape).to(param.dtype))
        for key, value in parsed.saved.items():
            module, _, local = key.rpartition(".")
            owner = model.get_submodule(module)
            getattr(owner, local).copy_(value.to(getattr(owner, local).dtype))
    return model


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / PEFT_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"no {PEFT_CONFIG} in {path}")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{config_path} holds {type(meta).__name__}, expected a JSON object")
    return meta


def _parse(path: Path) -> _Parsed:
    meta = _read_config(path)
    weights = path / PEFT_WEIGHTS
    if not weights.is_file():
        if (path / PEFT_PICKLE).is_file():
            raise ValueError(f"{path / PEFT_PICKLE} is a pickle, which hybridpeft never loads (it can run code); "
                             f"convert it to {PEFT_WEIGHTS} with a tool you trust")
        raise FileNotFoundError(f"no {PEFT_WEIGHTS} in {path}")
    peft_type = meta.get("peft_type")
    if peft_type not in _UNDERSTOOD:
        raise ValueError(f"peft_type={peft_type!r} in {path / PEFT_CONFIG} is not supported: "
                         "hybridpeft reads PEFT's LORA (with or without use_dora) and IA3 adapters")
    unsupported = _unsupported_features(meta, peft_type)
    if unsupported:
        raise ValueError(f"the PEFT adapter in {path} uses features hybridpeft does not implement: "
                         + "; ".join(unsupported))
    method = "ia3" if peft_type == "IA3" else ("dora" if meta.get("use_dora") else "lora")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    saved_modules: set[str] = set()
    unknown: list[str] = []
    suffixes = {"ia3": {".ia3_l": "l"},
                "lora": {".lora_A.weight": "A", ".lora_B.weight": "B"},
                "dora": {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m",
                         ".lora_magnitude_vector.weight": "m"}}[method]
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            local = key[len(PREFIX):] if key.startswith(PREFIX) else key
            for suffix, part in suffixes.items():
                if local.endswith(suffix):
                    factors.setdefault(local[: -len(suffix)], {})[part] = f.get_tensor(key)
                    break
            else:
                owner = _saved_module(local, meta.get("modules_to_save") or [])
                if owner is None:
                    unknown.append(key)
                else:
                    saved[local] = f.get_tensor(key)
                    saved_modules.add(owner)
    if unknown:
        raise ValueError(f"{weights} holds tensors that are not {method} factors nor modules_to_save: "
                         f"{unknown[:5]}{' …' if len(unknown) > 5 else ''}")
    if not factors:
        raise ValueError(f"{weights} holds no {method} tensors")
    need = {"ia3": {"l"}, "lora": {"A", "B"}, "dora": {"A", "B", "m"}}[method]
    for module, parts in sorted(factors.items()):
        missing = need - set(parts)
        if missing:
            names = {"A": "lora_A", "B": "lora_B", "m": "lora_magnitude_vector", "l": "ia3_l"}
            raise ValueError(f"{weights}: module {module!r} lacks {sorted(names[m] for m in missing)}")
    return _Parsed(method, meta, factors, saved, sorted(saved_modules))


def _saved_module(key: str, modules_to_save: list[str]) -> str | None:
    """The ``modules_to_save`` module that tensor ``key`` (``<module path>.<tensor>``) belongs to,
    by PEFT's rule (a module whose name ends with an entry), or ``None``."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if any(prefix.endswith(m) for m in modules_to_save if isinstance(m, str) and m):
            return prefix
    return None


def _unsupported_features(meta: dict[str, Any], peft_type: str) -> list[str]:
    found = []
    for field, default in _NAMED.items():
        if field in meta and meta[field] not in (default, None):
            found.append(f"{field}={meta[field]!r}")
    init = meta.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        found.append(f"init_lora_weights={init!r} (it rewrote the base weights PEFT trained against; convert "
                     "the adapter with PEFT's path_initial_model_for_weight_conversion first)")
    for field, value in meta.items():
        if field in _UNDERSTOOD[peft_type] or field in _NAMED:
            continue
        if value not in (None, False, {}, [], "", 0):
            found.append(f"{field}={value!r}")
    return found


def _our_config(model: nn.Module, parsed: _Parsed, path: Path) -> AdapterConfig:
    """Our config for the parsed adapter, after checking every tensor against ``model``."""
    from .adapters.config import config_class

    meta = parsed.config
    modules = dict(model.named_modules())
    universe = [n for n in modules if n]
    r = None
    for name, parts in sorted(parsed.factors.items()):
        module = modules.get(name)
        first = next(iter(parts))
        tensor_key = PREFIX + name + {"A": ".lora_A.weight", "B": ".lora_B.weight", "m": ".lora_magnitude_vector",
                                      "l": ".ia3_l"}[first]
        if module is None:
            raise ValueError(f"tensor {tensor_key!r} is for module {name!r}, which {type(model).__name__} does not have")
        if not is_supported_layer(module):
            raise ValueError(f"tensor {tensor_key!r} is for {name!r} of type {type(module).__name__}; "
                             "hybridpeft adapts float nn.Linear, transformers Conv1D and bitsandbytes Linear4bit")
        d_in, d_out = layer_shape(module)
        if parsed.method == "ia3":
            got = tuple(parts["l"].shape)
            if got not in ((d_out, 1), (1, d_in)):
                raise ValueError(f"tensor {PREFIX + name + '.ia3_l'!r} has shape {got}, but {name!r} needs "
                                 f"({d_out}, 1) (or (1, {d_in}) as a feedforward module)")
            continue
        rank = parts["A"].shape[0]
        expected = {"A": (rank, d_in), "B": (d_out, rank), "m": (d_out,)}
        for part, tensor in parts.items():
            if tuple(tensor.shape) != expected[part]:
                suffix = {"A": ".lora_A.weight", "B": ".lora_B.weight", "m": ".lora_magnitude_vector"}[part]
                raise ValueError(f"tensor {PREFIX + name + suffix!r} has shape {tuple(tensor.shape)}, but {name!r} "
                                 f"(d_in={d_in}, d_out={d_out}) needs {expected[part]}")
        if r is None:
            r = rank
        elif rank != r:
            raise ValueError(f"tensor {PREFIX + name + '.lora_A.weight'!r} has rank {rank}, other modules {r}: "
                             "per-module ranks are not supported")
        if rank > min(d_in, d_out):
            raise ValueError(f"tensor {PREFIX + name + '.lora_A.weight'!r} has rank {rank} > min(d_in, d_out) = "
                             f"{min(d_in, d_out)} of {name!r}; hybridpeft's LoRA needs r ≤ {min(d_in, d_out)}")
    if parsed.method != "ia3" and meta.get("r") not in (None, r):
        raise ValueError(f"{path / PEFT_CONFIG} says r={meta.get('r')!r} but the tensors have rank {r}")
    saved_modules = parsed.saved_modules
    for key, tensor in parsed.saved.items():
        module, _, local = key.rpartition(".")
        owner = modules.get(module)
        target = None if owner is None else getattr(owner, local, None)
        if not isinstance(target, torch.Tensor):
            raise ValueError(f"tensor {PREFIX + key!r} (modules_to_save) has no counterpart in {type(model).__name__}")
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"tensor {PREFIX + key!r} has shape {tuple(tensor.shape)}, but the model's {key!r} "
                             f"has {tuple(target.shape)}")
    _refuse_tied(model, saved_modules, "modules_to_save")
    names = sorted(parsed.factors)
    targets = _our_patterns(meta.get("target_modules"), names, universe)
    fields: dict[str, Any] = {"target_modules": targets, "trainable_modules": saved_modules}
    if parsed.method == "ia3":
        feedforward = sorted(n for n, parts in parsed.factors.items()
                             if _is_feedforward(n, tuple(parts["l"].shape), layer_shape(modules[n]), meta))
        fields["feedforward_modules"] = _our_patterns(meta.get("feedforward_modules"), feedforward, names) if feedforward else []
    else:
        alpha = meta.get("lora_alpha", 8)
        fields.update(r=int(r), alpha=float(alpha), dropout=float(meta.get("lora_dropout") or 0.0),
                      rslora=bool(meta.get("use_rslora", False)))
    try:
        config = config_class(parsed.method)(**fields)
        find_targets(model, config.target_modules)
    except ValueError as err:
        raise ValueError(f"the PEFT adapter in {path} does not fit {type(model).__name__}: {err}") from None
    return config


def _is_feedforward(name: str, shape: tuple[int, ...], dims: tuple[int, int], meta: dict[str, Any]) -> bool:
    """PEFT stores a feedforward module's ``ia3_l`` as (1, d_in), any other as (d_out, 1); only a
    1 × 1 layer needs the config's ``feedforward_modules`` to tell."""
    d_in, d_out = dims
    if (1, d_in) != (d_out, 1):
        return shape == (1, d_in)
    patterns = meta.get("feedforward_modules") or []
    return bool(_selects(patterns, [name], _peft_feedforward_rule))


def _our_patterns(peft_patterns: list[str] | str | None, chosen: list[str], universe: list[str]) -> list[str]:
    """Our patterns selecting exactly ``chosen`` among ``universe`` (by our rule,
    ``hybridpeft.patterns.select``): PEFT's own when they do (a string regex becomes ``"re:…"``), else
    the full module names."""
    want = set(chosen)
    candidate: list[str] | None = None
    if isinstance(peft_patterns, str) and peft_patterns != "all-linear":
        candidate = ["re:" + peft_patterns]
    elif isinstance(peft_patterns, list) and peft_patterns and all(isinstance(p, str) and p for p in peft_patterns):
        candidate = list(peft_patterns)
    if candidate is not None and _selects(candidate, universe, _our_rule) == want:
        return candidate
    return list(chosen)
