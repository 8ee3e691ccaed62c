"""What a run leaves in its directory: JSONL step/eval logs, TensorBoard events, metadata.

``train_log.jsonl`` has one record per logged optimizer step (loss, lr, grad
norm, tokens/s, peak memory, and for mixing methods the per-layer λ and branch
gradient norms); ``eval_log.jsonl`` one record per validation. On resume both
are cut back to the checkpoint's step, so a resumed run's logs equal an
uninterrupted run's.
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .._version import __version__

TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "eval_log.jsonl"


def _plain(value: Any) -> Any:
    """JSON-safe: tensors to numbers, non-finite floats to strings ("nan", "inf")."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep only the records of ``path`` with ``step <= max_step`` (rewritten atomically)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if record.get("step", 0) <= max_step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    """Appends records to the run's JSONL files (main process only) and, optionally, TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False, resume_step: int | None = None) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None:
            truncate_jsonl(run_dir / TRAIN_LOG, resume_step)
            truncate_jsonl(run_dir / EVAL_LOG, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(_plain(record), sort_keys=True) + "\n")
            f.flush()

    def step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(TRAIN_LOG, record)
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
                value = record.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
            for layer, value in (record.get("mixing") or {}).items():
                if isinstance(value, dict) and "lambda" in value:
                    self.writer.add_scalar(f"lambda/{layer}", value["lambda"], record["step"])

    def eval(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(EVAL_LOG, record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"eval/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MiB, what was measured): CUDA allocator peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss_kb / 2**10 if sys.platform != "darwin" else rss_kb / 2**20), "cpu_max_rss"


def versions() -> dict[str, str]:
    """Versions of what shapes numerical results."""
    import accelerate
    import numpy
    import transformers

    return {
        "hybridpeft": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "numpy": numpy.__version__, "platform": platform.platform(),
        "cuda": torch.version.cuda or "none",
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_plain(data), indent=2, sort_keys=True))
    os.replace(tmp, path)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
