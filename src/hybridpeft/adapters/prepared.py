"""Work done once per model forward for every layer at once, handed to each layer's forward.

BOFT and the Hybrid compute their rotation blocks from their parameters alone: a Cayley
transform of ``m k`` small skew matrices and the composition of ``m`` butterfly factors,
plus (Hybrid) ``M = λ I + (1 − λ) R``, its inverse and a conditioning flag. None of it
depends on the tokens, and per layer it is dozens of tiny kernels: on the CPU benchmark
it was about 60 % of what the Hybrid adds to a frozen layer (``docs/perf/README.md``), on a
GPU dozens of launches per layer. A forward pre-hook on the model
(``hybridpeft.inject`` registers ``prepare_adapters``) calls each adapter class's
``prepare_all`` with every active adapter of that class, which computes all layers'
blocks in one batched pass and ``offer``s each layer its slice; the layer's forward
``take``s it, or computes its own when nothing valid is there. This runs for parameters on
``PREPARE_DEVICES`` (CUDA; the CPU opts in, see there for why it does not by default).

What keeps this exact and safe:

* A slice is used only while every tensor it came from is unchanged: the same object,
  storage and version counter (an optimizer step, ``load_state_dict`` or ``copy_``
  bumps the version), and only under the grad mode it allows: slices computed
  without grad are never used where a gradient is wanted.
* With grad, the slices are dropped when the gradient of the batched result is
  computed, i.e. after every layer that used it has run its backward, including
  layers that activation checkpointing re-runs inside backward (non-reentrant
  checkpointing re-runs a layer expecting the very tensors its forward used). Until then,
  re-running a layer reuses its slice; afterwards, a layer called on its own computes its own.
* The slices live in a weak dictionary outside the modules: ``copy.deepcopy`` and
  pickling of a model never see tensors that carry autograd history.

The batched and the per-layer computations do the same arithmetic per block (the batch
size changes, the operations do not), and tests compare them to float tolerance.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .. import distributed


@dataclass(eq=False)
class Prepared:
    """Values computed for one adapter's next forward, and what they were computed from."""

    values: tuple[object, ...]
    sources: tuple[Tensor, ...]
    stamps: tuple[tuple[int, int], ...]  # (data_ptr, version) of each source
    grad: bool  # computed with autograd history

    def valid(self, sources: tuple[Tensor, ...]) -> bool:
        if len(sources) != len(self.sources):
            return False
        for old, new, stamp in zip(self.sources, sources, self.stamps):
            if old is not new or _stamp(new) != stamp:
                return False
        # Without history the values are usable only where no gradient is wanted.
        return self.grad or not torch.is_grad_enabled() or not any(s.requires_grad for s in sources)


_PREPARED: "weakref.WeakKeyDictionary[nn.Module, Prepared]" = weakref.WeakKeyDictionary()


def _stamp(t: Tensor) -> tuple[int, int]:
    return t.data_ptr(), t._version


PREPARE_DEVICES: set[str] = {"cuda"}
"""Device types whose parameters are prepared model-wide. Not the CPU by default: there the
batched pass was 6–7 % faster per step (BOFT and Hybrid, cpu-small, 256 tokens) but raised peak
RSS by 40–80 MiB (BOFT 1.01× → 1.26× our LoRA's), glibc keeping the model-wide temporaries'
heap; the true live peak grew by ~20 MiB (measured with ``MALLOC_MMAP_THRESHOLD_=65536``).
Add ``"cpu"`` to opt in (tests do; ``docs/perf/README.md`` has the numbers)."""


def preparable(adapter: nn.Module, t: Tensor) -> bool:
    """Whether ``adapter``'s parameter ``t`` can take part in a batched preparation: an ordinary
    tensor with storage (not an FSDP shard, which only its layer's own forward sees gathered,
    nor meta) on a device in ``adapter.prepare_devices`` if the adapter sets one (benchmarks
    do, to compare both paths in one process), else in ``PREPARE_DEVICES``."""
    devices = getattr(adapter, "prepare_devices", None)
    devices = PREPARE_DEVICES if devices is None else devices
    return t.device.type in devices and not distributed.is_sharded(t)


def offer(adapters: Sequence[nn.Module], values: Sequence[tuple[object, ...]],
          sources: Sequence[tuple[Tensor, ...]], root: Tensor) -> None:
    """Give ``adapters[i]`` the ``values[i]`` computed from ``sources[i]``; ``root`` is the
    batched tensor all of them derive from (with grad, its gradient hook drops them)."""
    grad = root.requires_grad
    entries = [Prepared(tuple(v), tuple(s), tuple(_stamp(t) for t in s), grad) for v, s in zip(values, sources)]
    for adapter, entry in zip(adapters, entries):
        _PREPARED[adapter] = entry
    if grad:
        refs = [(weakref.ref(a), e) for a, e in zip(adapters, entries)]  # weak: the graph must not keep the model
        root.register_hook(_dropper(refs))


def _dropper(refs: list[tuple[weakref.ref, Prepared]]) -> Callable[[Tensor], None]:
    def drop(_grad: Tensor) -> None:
        for ref, entry in refs:
            adapter = ref()
            if adapter is not None and _PREPARED.get(adapter) is entry:
                del _PREPARED[adapter]
    return drop


def take(adapter: nn.Module, *sources: Tensor) -> tuple[object, ...] | None:
    """The values prepared for ``adapter`` if they are still valid for ``sources``, else ``None``.

    The entry stays (a checkpointed layer re-run in backward takes it again); it goes when
    the gradient passes or the next preparation replaces it.
    """
    entry = _PREPARED.get(adapter)
    if entry is None or not entry.valid(sources):
        return None
    return entry.values


def discard(adapters: Sequence[nn.Module]) -> None:
    """Forget what was prepared for these adapters (e.g. before a new preparation)."""
    for adapter in adapters:
        _PREPARED.pop(adapter, None)
