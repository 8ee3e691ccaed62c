"""Data-parallel training: 2 CPU processes (gloo) launched with torchrun end with identical adapters.

Each rank trains on its own shard of every global batch; DDP averages the
gradients, so the adapters — and the Hybrid's λ, which each rank moves from
all-reduced gradient norms — must agree bit for bit afterwards. DDP's buffer
broadcast is off in the loop, so a rank whose λ drifted would show here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybridpeft.adapters.config import known_methods
from tiny_models import save_tiny_causal_lm, smoke_overrides

# The Hybrid exercises the most (LoRA-GA's all-reduced estimate, BOFT, λ from all-reduced norms);
# the other methods run with ``-m slow`` (each launch costs ~15-40 s on 2 shared cores).
METHODS = [pytest.param(m, marks=() if m == "hybrid" else pytest.mark.slow) for m in known_methods()]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("method", METHODS)
def test_two_cpu_processes_keep_adapters_identical(method, tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    sets = smoke_overrides(tiny_model, run_dir, steps=4) + [
        f"adapter.method={method}", "debug.save_rank_states=true", "train.batch_size=2", "train.save_every=2",
        "eval.before=false", "eval.after=false", "eval.every=2",
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "hybridpeft.cli", "train", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "world size 2" in done.stderr

    rank0 = load_file(str(run_dir / "debug" / "rank0.safetensors"))
    rank1 = load_file(str(run_dir / "debug" / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and rank0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    final = load_file(str(run_dir / "adapter" / "adapter.safetensors"))
    assert all(torch.equal(final[k], rank0[k]) for k in final)
    if method == "hybrid":
        lams = [v for k, v in rank0.items() if k.endswith("mix_lambda")]
        assert len(lams) == 4 and any(float(v) != 0.5 for v in lams)  # λ moved, and identically on both ranks
    # the checkpoint holds one RNG state per rank
    assert {p.name for p in (run_dir / "checkpoints" / "step-000004").glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
