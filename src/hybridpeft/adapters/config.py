"""Adapter configurations: validated dataclasses, serialized as JSON.

Every method has one config class registered under its ``method`` name; the
registry lets ``load_adapter`` rebuild the right config from
``adapter_config.json`` without executing anything.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..checks import check
from ..patterns import compile_entry

FORMAT_VERSION = 1

_CONFIGS: dict[str, type["AdapterConfig"]] = {}


def register_config(cls: type["AdapterConfig"]) -> type["AdapterConfig"]:
    """Class decorator: make ``cls`` loadable by its ``method`` name."""
    _CONFIGS[cls.method] = cls
    return cls


def config_class(method: str) -> type["AdapterConfig"]:
    if method not in _CONFIGS:
        raise ValueError(f"method={method!r} is not a known adapter method; known: {sorted(_CONFIGS)}")
    return _CONFIGS[method]


def known_methods() -> list[str]:
    return sorted(_CONFIGS)


DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterConfig:
    """Fields shared by every method.

    Args:
        target_modules: which modules to adapt. A list entry matches a module
            whose qualified name equals it or ends with ``"." + entry``; an entry
            starting with ``"re:"`` is a regular expression matched against the
            whole qualified name (``regex`` engine, time-bounded; see ``hybridpeft.patterns``). ``"all-linear"`` matches every ``nn.Linear`` /
            GPT-2 ``Conv1D`` except the output head.
        adapter_dtype: dtype of the adapter tensors (``"float32"``, ``"float64"``,
            ``"bfloat16"``, ``"float16"``); ``None`` follows the base weight.
        trainable_modules: modules (same pattern rules) trained in full and
            saved with the adapter, e.g. a new classification head ``["classifier"]``.
    """

    method: ClassVar[str] = "base"
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    adapter_dtype: str | None = None
    trainable_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        self.trainable_modules = list(self.trainable_modules)
        check(len(self.target_modules) > 0, "target_modules", self.target_modules, "a non-empty list of names")
        for name in ("target_modules", "trainable_modules"):
            for pattern in getattr(self, name):
                check(isinstance(pattern, str) and pattern != "", name, pattern, "non-empty strings")
                compile_entry(pattern, name)  # a bad regex is refused here; matching time is bounded in inject
        check(
            self.adapter_dtype in (None, "float32", "float64", "bfloat16", "float16"),
            "adapter_dtype", self.adapter_dtype, "None, 'float32', 'float64', 'bfloat16' or 'float16'",
        )

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "AdapterConfig":
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"format_version={version!r} is newer than this hybridpeft understands ({FORMAT_VERSION}); "
                "upgrade hybridpeft to load this adapter"
            )
        if "method" not in data:
            raise ValueError("adapter config has no 'method' field")
        cls = config_class(data.pop("method"))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown fields for method={cls.method!r}: {unknown}")
        return cls(**data)
