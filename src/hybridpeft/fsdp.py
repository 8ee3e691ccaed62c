"""Sharded data parallelism for adapted models with FSDP2 (``torch.distributed.fsdp.fully_shard``).

``shard_model(model)`` applies ``fully_shard`` to every block of the model (by default
the classes transformers lists in ``model._no_split_modules``, e.g. ``LlamaDecoderLayer``)
and then to the root, which takes what is left (embeddings, final norm, head). The
adapters sit inside the blocks, so each block's unit holds its frozen base weights and
its adapter tensors; both are sharded along dim 0 (``DTensor``, ``Shard(0)``).

Frozen weights get no gradient memory. FSDP2 shards *per parameter* (no flat parameter
mixing frozen and trainable tensors, the FSDP1 ``use_orig_params`` trap): a weight with
``requires_grad=False`` is all-gathered for compute but never gets a ``.grad`` and is
never reduce-scattered. Per rank that leaves ``base / world`` parameter bytes plus
``adapters / world`` for parameters, gradients and optimizer state (measured in
``tests/test_fsdp.py`` and ``docs/distributed.md``).

What the adapters need between steps (λ from whole gradient norms, Riemannian steps on
whole blocks, norm bounds, LoRA-GA's start, saving) is in ``hybridpeft.distributed``.

Also here:

- ``materialize_from_rank0``: RAM-efficient loading. Only rank 0 holds the checkpoint;
  the other ranks build the model on the ``meta`` device, shard it, and receive their
  pieces tensor by tensor, so no rank but 0 ever holds the whole model.
- ``gather_model``: a plain (unsharded) copy on rank 0, adapters included — what
  ``merge_and_unload`` and evaluation after training use.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import distributed


def is_sharded_model(model: nn.Module) -> bool:
    """Some parameter of ``model`` is a ``DTensor`` (the model went through ``fully_shard``)."""
    return distributed.any_sharded(model.parameters())


def block_classes(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """The class names sharded one by one: ``names``, else transformers' ``model._no_split_modules``.

    Raises:
        ValueError: none given and the model names none, or a name matches no module
            (the message lists the model's module classes).
    """
    chosen = list(names) if names else list(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    if not chosen:
        raise ValueError(f"fsdp.layer_classes=null is invalid for {type(model).__name__}: it names no blocks to "
                         f"shard (no _no_split_modules); set the block class, one of {sorted(present)}")
    missing = [name for name in chosen if name not in present]
    if missing:
        raise ValueError(f"fsdp.layer_classes={chosen!r} is invalid: {missing} match no module of "
                         f"{type(model).__name__} (its classes: {sorted(present)})")
    return chosen


def shard_model(model: nn.Module, *, mesh: Any = None, layer_classes: Iterable[str] | None = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every block of ``model`` (bottom-up), then the root; in place, returns ``model``.

    Args:
        model: an (adapted) model; inject adapters *before* sharding, so they join their block's unit.
        mesh: a 1-D ``DeviceMesh``; default: all ranks of the default process group on the
            device type of the model's parameters (``"cpu"`` → gloo, ``"cuda"`` → nccl).
        layer_classes: class names to shard one by one (see ``block_classes``).
        reshard_after_forward: free the gathered block after its forward (and gather it again
            for backward): less memory, one more all-gather per block and step.

    Raises:
        ValueError: no process group, or ``layer_classes`` does not fit the model.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not distributed.initialized():
        raise ValueError("sharding needs torch.distributed: launch with accelerate launch or torchrun")
    classes = set(block_classes(model, layer_classes))
    if mesh is None:
        device = next((p.device.type for p in model.parameters() if p.device.type != "meta"), "cpu")
        mesh = init_device_mesh(device, (distributed.world_size(),))
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    for block in reversed(blocks):  # innermost first, should blocks nest
        if not isinstance(block, FSDPModule):
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # Untied embeddings and head get units of their own (often the largest matrices): the input
    # embedding is freed after its forward; the head, used last in forward and first in backward,
    # stays gathered in between. Tied ones stay in the root (one parameter, one unit).
    inputs = _get(model, "get_input_embeddings")
    outputs = _get(model, "get_output_embeddings")
    tied = inputs is not None and outputs is not None and inputs.weight is outputs.weight
    if inputs is not None and not tied and not isinstance(inputs, FSDPModule):
        fully_shard(inputs, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if outputs is not None and not tied and not isinstance(outputs, FSDPModule):
        fully_shard(outputs, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)  # the root: what is left (final norm; tied embeddings)
    return model


def _get(model: nn.Module, getter: str) -> nn.Module | None:
    try:
        module = getattr(model, getter)() if hasattr(model, getter) else None
    except (NotImplementedError, AttributeError):
        return None
    return module if isinstance(module, nn.Module) and isinstance(getattr(module, "weight", None), Tensor) else None


def local_parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds: ``{"frozen", "trainable", "grad"}`` (sharded tensors count their local piece)."""
    out = {"frozen": 0, "trainable": 0, "grad": 0}
    for p in model.parameters():
        out["trainable" if p.requires_grad else "frozen"] += distributed.local(p).nbytes
        if p.grad is not None:
            out["grad"] += distributed.local(p.grad).nbytes
    return out


# ---------------------------------------------------------------- RAM-efficient loading


def named_state(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Every parameter and buffer (persistent or not) by qualified name, in a fixed order."""
    return list(model.named_parameters()) + list(model.named_buffers())


@torch.no_grad()
def materialize_from_rank0(model: nn.Module, source: dict[str, Tensor] | None) -> None:
    """Fill a sharded ``model`` with rank 0's values, one tensor at a time.

    Rank 0 passes ``source`` = ``dict(named_state(model))`` taken *before* ``shard_model``
    (the whole tensors; see ``detach_for_sharding``); the other ranks built the same model on
    the ``meta`` device and pass ``None``. Each tensor is broadcast from rank 0, every rank
    keeps its piece, and rank 0 drops its whole copy (``source`` is emptied as it goes), so a
    rank other than 0 holds at most one whole tensor at a time and rank 0 never more than the
    whole model. Buffers, including non-persistent ones (rotary frequencies, BOFT's
    permutation plans), and the adapters' initial values come from rank 0 too, so every
    rank starts identical.

    Raises:
        ValueError: rank 0 has no ``source``, or ``source`` lacks a tensor of the model.
    """
    is_root = distributed.rank() == 0
    if is_root and source is None:
        raise ValueError("rank 0 must pass the unsharded tensors (named_state before shard_model)")
    _check_same_tensors(model)
    if any(t.is_meta for _, t in named_state(model)):
        device = _mesh_device(model)
        model.to_empty(device=device)  # uninitialized storage for this rank's pieces; filled below
    for name, target in named_state(model):
        shape, dtype, device = tuple(target.shape), target.dtype, distributed.local(target).device
        if is_root:
            if name not in source:
                raise ValueError(f"rank 0 has no value for {name!r}")
            value = source.pop(name).detach().to(device)
        else:
            value = torch.empty(shape, dtype=dtype, device=device)
        if dist.get_backend() == "gloo" and value.device.type != "cpu":  # pragma: no cover - gloo on GPU tensors
            value = value.cpu()
        dist.broadcast(value, src=0)
        distributed.assign(target, value)


def _check_same_tensors(model: nn.Module) -> None:
    """Every rank must list the same tensors (names, shapes, dtypes) in the same order, or the
    broadcasts below would pair different tensors; compared by a digest, in one all-reduce."""
    import hashlib

    listing = "\n".join(f"{n} {tuple(t.shape)} {t.dtype}" for n, t in named_state(model)).encode()
    digest = int.from_bytes(hashlib.sha256(listing).digest()[:7], "big")  # fits an int64
    device = _mesh_device(model) if dist.get_backend() != "gloo" else torch.device("cpu")
    both = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MIN)
    if int(both[0]) != digest or int(-both[1]) != digest:
        raise ValueError(f"the ranks built different models ({len(named_state(model))} tensors on rank "
                         f"{distributed.rank()}): every rank must load the same architecture and adapters")


def detach_for_sharding(model: nn.Module) -> dict[str, Tensor]:
    """Rank 0 of a RAM-efficient load: take the whole tensors out of ``model`` (returned by name,
    for ``materialize_from_rank0``) and leave the model on the ``meta`` device, like the other
    ranks' — so sharding allocates only this rank's pieces and the whole copy is freed tensor
    by tensor as it is broadcast, instead of living beside the pieces."""
    source = {name: t.detach() for name, t in named_state(model)}
    _to_meta(model)
    return source


def _to_meta(model: nn.Module) -> None:
    """Every parameter and buffer replaced by a ``meta`` tensor of its shape and dtype, tensors
    shared between modules (tied embeddings) kept shared — ``model.to("meta")`` would untie them."""
    memo: dict[int, Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None:
                    continue
                if id(tensor) not in memo:
                    empty = torch.empty_like(tensor, device="meta")
                    memo[id(tensor)] = nn.Parameter(empty, requires_grad=tensor.requires_grad) \
                        if isinstance(tensor, nn.Parameter) else empty
                table[name] = memo[id(tensor)]


def _mesh_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if distributed.is_sharded(p):
            return torch.device(p.device_mesh.device_type)
    return torch.device("cpu")


# ---------------------------------------------------------------- gathering


def gather_state(model: nn.Module, rank0_only: bool = True) -> dict[str, Tensor]:
    """``model.state_dict()`` with sharded tensors all-gathered, on the CPU.

    Collective: every rank must call it. With ``rank0_only`` the other ranks drop each
    tensor as soon as it is gathered and get ``{}``.
    """
    return distributed.gather_tensors(model.state_dict(), rank0_only=rank0_only)


def _plain_class(model: nn.Module) -> type:
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def gather_model(model: nn.Module, rank0_only: bool = True) -> nn.Module | None:
    """A plain copy of a sharded transformers model on the CPU, adapters included (not merged).

    Collective. The copy is rebuilt from ``model.config`` on the ``meta`` device, given the
    same adapters (``hybridpeft_config``), then the gathered parameters and every buffer.
    Returns it on rank 0 (every rank without ``rank0_only``), ``None`` elsewhere.

    Raises:
        ValueError: the model has no ``config`` to rebuild it from (not a transformers model).
    """
    from .inject import CONFIG_ATTR, inject

    if not hasattr(model, "config"):
        raise ValueError(f"cannot rebuild a plain {type(model).__name__}: gather_model needs a transformers "
                         "model (it rebuilds the class from model.config)")
    state = gather_state(model, rank0_only=rank0_only)
    buffers = {name: distributed.full(b).detach().cpu() for name, b in model.named_buffers()}  # replicated
    if rank0_only and distributed.rank() != 0:
        return None
    with torch.device("meta"):
        replica = _plain_class(model)(copy.deepcopy(model.config))
    if hasattr(model, CONFIG_ATTR):
        inject(replica, copy.deepcopy(getattr(model, CONFIG_ATTR)))
    replica.load_state_dict(state, strict=True, assign=True)
    for name, value in buffers.items():  # non-persistent buffers are not in the state dict
        owner, _, leaf = name.rpartition(".")
        module = replica.get_submodule(owner) if owner else replica
        module._buffers[leaf] = value
    if getattr(replica.config, "tie_word_embeddings", False) and hasattr(replica, "tie_weights"):
        replica.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        replica.generation_config = copy.deepcopy(model.generation_config)
    trains = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in replica.named_parameters():
        p.requires_grad_(trains.get(name, False))
    return replica.train(model.training)
