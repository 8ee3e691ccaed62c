"""Peak memory on a CPU, two ways: the allocation-level peak of live tensor storages, and peak RSS.

``StorageTracker`` is the CPU counterpart of ``torch.cuda.max_memory_allocated``: a
``TorchDispatchMode`` that adds the bytes of every new storage an ATen operator returns and
subtracts them when the storage is freed (a weak reference to the storage fires then). It
sees tensors created by operators — activations, gradients, optimizer states, temporaries —
and counts tensors that already exist when it starts (``track``), e.g. the model's weights.
It does not see memory a kernel allocates privately (BLAS workspaces), nor Python objects.

``rss_now`` / ``rss_peak`` read the resident set size (``/proc/self/statm``) and its peak
(``ru_maxrss``); a measurement subtracts the RSS of the process after imports and a warm-up
(the *process baseline*: interpreter, libraries, kernel code pages), so the difference holds
the model, the training tensors, allocator slack and fragmentation.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class StorageTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        key = storage.data_ptr()
        if nbytes == 0 or key in self._refs:
            return
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self._refs[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._free(key, nbytes))

    def _free(self, key: int, nbytes: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._add(t)
        return out


def warm_up() -> None:
    """Load the kernels a training step uses (their code pages count in RSS) before the baseline."""
    import hybridpeft as hp
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, use_cache=False))
    hp.inject(model, hp.HybridConfig(lora_r=2, boft_block_size=8, boft_n_factors=2))
    opt = hp.build_optimizer(model, lr=1e-3)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    del model, opt


def run_child(cmd: list[str]) -> dict | None:
    """Run one measurement in a fresh single-threaded process; its last stdout line is a JSON
    row. None (with the child's stderr tail printed) when it failed."""
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_meta() -> dict:
    """Where and how a memory table was measured (date, torch, cores, load, malloc setting)."""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
            "machine": f"{os.cpu_count()} cores, 1 torch thread per child, load {os.getloadavg()[0]:.1f}",
            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default (dynamic)")}
