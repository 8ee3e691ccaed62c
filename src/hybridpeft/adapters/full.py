"""Full fine-tuning as a 'method', so every comparison runs through one code path."""
from __future__ import annotations

from dataclasses import dataclass

from .config import AdapterConfig


@dataclass
class FullConfig(AdapterConfig):
    """Every parameter trains; ``target_modules`` is ignored. Saved as the whole state."""

    method = "full"
