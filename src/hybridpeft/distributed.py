"""Adapter state on sharded parameters (FSDP2's ``DTensor``) and across ranks.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter of a wrapped
module is, outside forward and backward, a ``DTensor`` placed ``Shard(0)`` on a 1-D
mesh: rank ``k`` holds the ``k``-th ``torch.chunk`` piece of dim 0 (the last ranks'
pieces may be shorter or empty). Its gradient is sharded the same way. During
forward/backward FSDP swaps in the whole (all-gathered) tensors, so ``forward`` code
never sees a ``DTensor``; code that reads or writes adapter state *between* steps
(the Hybrid's λ rule, norm bounds, Riemannian steps, LoRA-GA's start, saving and
loading) goes through the helpers here, which are identities on plain tensors:

- ``local(t)``: the piece this rank holds — a view, so in-place writes reach ``t``;
- ``full(t)``: the whole tensor (an all-gather: every rank must call it);
- ``assign(param, value)``: write a whole value into a (possibly sharded) tensor;
- ``square_share(t)``: the factor that makes ``Σ_ranks share · ‖local(t)‖²`` equal
  ``‖t‖²`` — 1 for a sharded tensor (each piece held once), ``1 / world`` for a plain
  tensor under data parallelism (every rank holds all of it);
- ``all_reduce_sum`` / ``all_reduce_max``: identities without a process group.

Only dim-0 sharding on a mesh spanning the default process group is supported (what
``fully_shard`` produces on a 1-D mesh); anything else is refused by name.
"""
from __future__ import annotations

import ctypes
import os
import signal
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch.distributed.tensor is missing from builds without distributed support
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - such builds cannot shard anything
    DTensor = None  # type: ignore[assignment,misc]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_launcher(environ: dict[str, str] | None = None) -> bool:
    """Under ``torchrun`` / ``accelerate launch``, have the kernel SIGKILL this rank when
    its launcher dies; returns whether that was arranged.

    torch's elastic agent starts every rank in a new session, so a launcher that is
    killed (OOM killer, ``kill -9``, a lost job allocation) leaves its ranks running:
    they keep the run dir's lock and keep writing checkpoints, and a resume is refused
    until they finish. SIGKILL, not SIGTERM, because a rank without its launcher has
    nothing to report to; checkpoints are written atomically, so the newest intact one
    is what a resume continues from. Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere,
    or outside a torchrun launch (``TORCHELASTIC_RUN_ID`` unset), nothing changes.
    """
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in env or not os.uname().sysname == "Linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def initialized() -> bool:
    """A default process group is up (``torch.distributed`` is in use)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def is_sharded(t: Any) -> bool:
    """``t`` is a ``DTensor`` (a sharded parameter, gradient or optimizer state)."""
    return DTensor is not None and isinstance(t, DTensor)


def _check_placement(t: Tensor) -> None:
    mesh, placements = t.device_mesh, t.placements
    if mesh.ndim != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"a DTensor placed {tuple(placements)} on a {mesh.ndim}-D mesh is not supported: "
                         "hybridpeft handles FSDP's dim-0 sharding on a 1-D mesh (fully_shard with a 1-D mesh)")
    if mesh.size() != world_size():
        raise ValueError(f"a DTensor on a mesh of {mesh.size()} ranks inside a process group of {world_size()} is "
                         "not supported: shard over every rank (a 1-D mesh of the whole world)")


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds: ``t.to_local()`` for a ``DTensor`` (a view), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor: all-gathered for a ``DTensor`` (collective: every rank must call), else ``t``."""
    return t.full_tensor() if is_sharded(t) else t


@torch.no_grad()
def assign(target: Tensor, value: Tensor) -> None:
    """``target.copy_(value)`` for a whole ``value`` of ``target``'s shape, sharded or not.

    For a ``DTensor`` this rank keeps its own piece of ``value`` (no communication:
    every rank is expected to hold the same ``value``).

    Raises:
        ValueError: the shapes differ.
    """
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"cannot assign a value of shape {tuple(value.shape)} to a tensor of shape {tuple(target.shape)}")
    if is_sharded(target):
        _check_placement(target)
        piece = distribute_tensor(value.detach().to(target.device), target.device_mesh, target.placements,
                                  src_data_rank=None).to_local()
        target.to_local().copy_(piece.to(target.dtype))
    else:
        target.copy_(value.to(device=target.device, dtype=target.dtype))


def like(reference: Tensor, piece: Tensor) -> Tensor:
    """Wrap this rank's ``piece`` (sharded along dim 0 as ``reference`` is) into a ``DTensor``
    like ``reference``; ``piece`` itself when ``reference`` is not sharded.

    Used for optimizer state computed on local pieces (e.g. ``RiemannianAdam``'s moments),
    so that checkpoints gather it like AdamW's.
    """
    if not is_sharded(reference) or piece.dim() == 0:
        return piece
    _check_placement(reference)
    shape = torch.Size([reference.shape[0], *piece.shape[1:]])
    return DTensor.from_local(piece, reference.device_mesh, reference.placements, run_check=False,
                              shape=shape, stride=_contiguous_strides(shape))


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def square_share(t: Tensor) -> float:
    """The weight of this rank's ``‖local(t)‖²`` in ``‖t‖² = Σ_ranks weight · ‖local(t)‖²``.

    A ``DTensor`` (each piece on one rank): 1. A plain tensor under ``torch.distributed``
    (replicated, e.g. a DDP gradient after its all-reduce): ``1 / world``. No process group: 1.
    """
    if is_sharded(t):
        _check_placement(t)
        return 1.0
    return 1.0 / world_size()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (identity without a process group); returns ``t``."""
    if initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: Tensor) -> Tensor:
    """Element-wise maximum of ``t`` over ranks in place (identity without a process group); returns ``t``."""
    if initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def any_sharded(tensors: Any) -> bool:
    return any(is_sharded(t) for t in tensors)


def gather_tensors(obj: Any, rank0_only: bool = True) -> Any:
    """``obj`` (nested dicts/lists/tuples of tensors and plain values, e.g. a state dict or an
    optimizer's ``state_dict()``) with every ``DTensor`` all-gathered and every tensor detached
    on the CPU.

    Collective when anything is sharded: every rank must call it with the same structure
    (the same keys in the same order). With ``rank0_only`` the ranks other than 0 drop
    each gathered tensor at once and get ``None`` for every tensor, so they never hold
    more than one whole tensor.
    """
    drop = rank0_only and rank() != 0

    def visit(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: visit(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(visit(v) for v in value)
        if torch.is_tensor(value):
            whole = full(value)
            return None if drop else whole.detach().cpu()
        return value

    return visit(obj)


@torch.no_grad()
def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of gathered (whole) state: shard every per-parameter state
    tensor of a sharded parameter like the parameter, so the optimizer steps on DTensors again.

    A state tensor is the parameter's if its dim 0 has the parameter's length (moments, the
    Riemannian optimizer's per-matrix scales); 0-dim values (step counts) stay as they are.
    Optimizers holding other optimizers (``CombinedOptimizer``) are handled through ``optimizers``.
    """
    children = getattr(optimizer, "optimizers", None)
    if children is not None:
        for child in children:
            reshard_optimizer_state(child)
        return
    for param, state in optimizer.state.items():
        if not is_sharded(param):
            continue
        _check_placement(param)
        for key, value in list(state.items()):
            if torch.is_tensor(value) and not is_sharded(value) and value.dim() > 0 and value.shape[0] == param.shape[0]:
                state[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                               src_data_rank=None)


def broadcast_from_rank0(*tensors: Tensor) -> None:
    """Overwrite ``tensors`` (plain, same shapes on every rank) with rank 0's values, in place.

    For values every rank computes but must hold bit for bit alike (e.g. factors from a
    randomized SVD, whose random draws may differ between ranks). Identity without a process group.
    """
    if not (initialized() and world_size() > 1):
        return
    on_cpu = dist.get_backend() == "gloo"
    for t in tensors:
        buf = t.cpu() if on_cpu and t.device.type != "cpu" else t
        dist.broadcast(buf, src=0)
        if buf is not t:
            t.copy_(buf)
