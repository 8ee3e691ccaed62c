"""How the loop spreads a run over processes: replicated (DDP, through accelerate) or sharded (FSDP2).

The loop talks to one of two strategies and never branches on which:

- ``Replicated``: accelerate's ``prepare`` (DDP with several processes), ``no_sync`` for
  gradient accumulation, accelerate's gradient clipping. The default.
- ``Sharded``: ``hybridpeft.fsdp.shard_model`` (``torch.distributed.fsdp.fully_shard`` per
  block, then the root) after the adapters are injected and before LoRA-GA's start, the
  optimizer built on the sharded parameters, ``set_requires_gradient_sync`` for
  accumulation, ``clip_grad_norm_`` on the sharded gradients. Optionally RAM-efficient
  loading: only rank 0 reads the checkpoint (``hybridpeft.fsdp.materialize_from_rank0``).

Sharding is on when the job says ``fsdp.enabled: true`` (e.g. under ``torchrun``) or the
run was started by ``accelerate launch`` with an FSDP config
(``examples/accelerate/fsdp.yaml``): accelerate passes its ``fsdp_*`` fields as
``FSDP_*`` environment variables, and those then replace the job's ``fsdp`` section.
Settings hybridpeft cannot honour are refused before any model is loaded, each in one
line naming the setting (``sharding_problems``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator

import torch
from torch import nn

from .. import distributed
from ..fsdp import detach_for_sharding, materialize_from_rank0, shard_model
from ..models import is_quantized_model
from .job_config import ConfigError, FsdpSection, JobConfig, sharding_problems

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def accelerate_fsdp_settings(environ: dict[str, str] | None = None) -> tuple[FsdpSection, bool, list[str]] | None:
    """``(fsdp section, activation checkpointing, problems)`` that an FSDP ``accelerate launch``
    asks for; ``None`` when the run was not launched that way (``ACCELERATE_USE_FSDP`` unset).

    Problems name the accelerate field (``fsdp_offload_params=true ...``), since that is
    what the user wrote in the accelerate config.
    """
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() not in _TRUE:
        return None
    problems: list[str] = []

    def flag(name: str, default: bool) -> bool:
        raw = env.get(f"FSDP_{name.upper()}")
        if raw is None:
            return default
        if raw.lower() in _TRUE or raw.lower() in _FALSE:
            return raw.lower() in _TRUE
        problems.append(f"fsdp_{name}={raw!r} (accelerate config) is invalid: expected true or false")
        return default

    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        problems.append(f"fsdp_version={version} (accelerate config) is not supported: hybridpeft shards with FSDP2 "
                        "(fully_shard); set fsdp_version: 2")
    if flag("offload_params", False):
        problems.append("fsdp_offload_params=true (accelerate config) is not supported: CPU offload of parameters "
                        "is untested with hybridpeft's adapter updates; set it to false")
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP":
        problems.append(f"fsdp_auto_wrap_policy={policy} (accelerate config) is not supported: hybridpeft shards one "
                        "unit per transformer block; use TRANSFORMER_BASED_WRAP")
    state_dict = env.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    if state_dict != "FULL_STATE_DICT":
        problems.append(f"fsdp_state_dict_type={state_dict} (accelerate config) is not supported: hybridpeft gathers "
                        "adapters and optimizer state into one checkpoint (they are small); use FULL_STATE_DICT")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true")
    if reshard.lower() not in _TRUE + _FALSE:
        problems.append(f"fsdp_reshard_after_forward={reshard} (accelerate config) is not supported with FSDP2: "
                        "expected true or false")
    layers = [c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
    section = FsdpSection(enabled=True, layer_classes=layers or None, reshard_after_forward=reshard.lower() in _TRUE,
                          ram_efficient_loading=flag("cpu_ram_efficient_loading", True))
    return section, flag("activation_checkpointing", False), problems


def for_job(job: JobConfig, accelerator: Any) -> "Replicated":
    """The strategy for this run (see the module docstring).

    Raises:
        ConfigError: settings that cannot run sharded, or an FSDP launch/config without a process group.
    """
    settings, checkpointing, problems = job.fsdp, False, []
    launched = accelerate_fsdp_settings()
    if launched is not None:
        settings, checkpointing, problems = launched
    if not settings.enabled:
        return Replicated(accelerator)
    source = "an FSDP accelerate launch" if launched is not None else "fsdp.enabled=true"
    problems += sharding_problems(job, source)
    if not distributed.initialized():
        problems.append(f"{source} needs several processes: launch with `accelerate launch --config_file "
                        "examples/accelerate/fsdp.yaml -m hybridpeft.cli train ...` or `torchrun --nproc_per_node N "
                        "-m hybridpeft.cli train --set fsdp.enabled=true ...`")
    if problems:
        raise ConfigError(problems)
    return Sharded(accelerator, settings, activation_checkpointing=checkpointing)


class Replicated:
    """Every process holds the whole model; accelerate prepares it (DDP with several processes)."""

    sharded = False

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def describe(self) -> str:
        return "replicated (DDP)" if self.accelerator.num_processes > 1 else "one process"

    @property
    def loads_empty(self) -> bool:
        """This rank builds the model on the meta device instead of reading the checkpoint."""
        return False

    @property
    def activation_checkpointing(self) -> bool:
        return False

    def place(self, model: nn.Module) -> nn.Module:
        """Move the model to this rank's device (a quantized model was loaded there and cannot move)."""
        return model if is_quantized_model(model) else model.to(self.accelerator.device)

    def shard(self, model: nn.Module) -> nn.Module:
        """Called once adapters are injected, before their data-dependent start."""
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        return self.accelerator.prepare(model, optimizer)

    @contextlib.contextmanager
    def gradient_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Reduce gradients across ranks in this backward only if ``sync`` (the last micro-batch)."""
        with contextlib.nullcontext() if sync else self.accelerator.no_sync(model):
            yield

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip the global gradient norm (after the gradient reduction) and return it."""
        return float(self.accelerator.clip_grad_norm_(params, max_norm))


class Sharded(Replicated):
    """FSDP2: each rank holds ``1/world`` of every block (base weights and adapters)."""

    sharded = True

    def __init__(self, accelerator: Any, settings: FsdpSection, activation_checkpointing: bool = False) -> None:
        super().__init__(accelerator)
        self.settings = settings
        self._checkpointing = activation_checkpointing  # fsdp_activation_checkpointing of an accelerate config

    def describe(self) -> str:
        s = self.settings
        return (f"sharded (FSDP2 over {self.accelerator.num_processes} processes, units: "
                f"{', '.join(s.layer_classes) if s.layer_classes else 'the model blocks'}"
                f"{', RAM-efficient loading' if s.ram_efficient_loading else ''})")

    @property
    def loads_empty(self) -> bool:
        return self.settings.ram_efficient_loading and self.accelerator.process_index != 0

    @property
    def activation_checkpointing(self) -> bool:
        return self._checkpointing

    def place(self, model: nn.Module) -> nn.Module:
        return model  # fully_shard moves each rank's pieces to the mesh device; a meta model stays meta

    def shard(self, model: nn.Module) -> nn.Module:
        ram_efficient = self.settings.ram_efficient_loading
        source = detach_for_sharding(model) if ram_efficient and self.accelerator.process_index == 0 else None
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.accelerator.device.type, (self.accelerator.num_processes,))
        shard_model(model, mesh=mesh, layer_classes=self.settings.layer_classes,
                    reshard_after_forward=self.settings.reshard_after_forward)
        if ram_efficient:
            materialize_from_rank0(model, source)
            del source
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        return model, optimizer  # already sharded; accelerate would wrap it again (DDP on CPU)

    @contextlib.contextmanager
    def gradient_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        if sync:
            yield
            return
        model.set_requires_gradient_sync(False)  # accumulate unsharded gradients locally
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)  # a DTensor for sharded gradients
        return float(distributed.full(total))


def settings_dict(strategy: Replicated) -> dict[str, Any]:
    """What ``run.json`` records about the strategy."""
    if isinstance(strategy, Sharded):
        return {"strategy": "fsdp2", **dataclasses.asdict(strategy.settings)}
    return {"strategy": "ddp" if strategy.accelerator.num_processes > 1 else "single"}
