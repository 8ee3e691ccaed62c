"""The embedded default job (``hybridpeft train`` with no arguments).

``configs/default.yaml`` in the source tree holds the same settings for reading
and copying; a test keeps the two equal. The job fine-tunes the offline
SmolLM2-135M-Instruct with the Hybrid on the synthetic ``arith`` task
(generated from a seed, no download) and prints the exact-match score before
and after: about 3 minutes on 2 CPU cores, the one-time GGUF de-quantization
included (measured 2 min 52 s; exact match 16% → 38% on 50 test problems).
"""
from __future__ import annotations

import copy
from typing import Any

DEFAULT_JOB: dict[str, Any] = {
    "model": {"name": None},  # null: smollm2-135m for causal tasks, minilm-l6 for classification ones
    "data": {"task": "arith", "train_limit": 2000, "val_limit": 32, "max_length": 64},
    "adapter": {
        "method": "hybrid",
        "target_modules": ["q_proj", "v_proj"],
        "hybrid": {"ga_num_batches": 4},
    },
    "train": {
        "seed": 0, "max_steps": 40, "batch_size": 8, "lr": 1.0e-3, "warmup_steps": 5,
        "schedule": "cosine", "save_every": 20,
    },
    "eval": {"every": 20, "limit": 50, "batch_size": 25},
    "output": {"run_dir": "runs/default"},
}


def default_job() -> dict[str, Any]:
    """A fresh copy of the default job mapping."""
    return copy.deepcopy(DEFAULT_JOB)

