"""One module per method; each registers its config and adapter in one line below."""
from __future__ import annotations

from ..config import AdapterConfig
from .base import AdaptedLinear, Adapter

_ADAPTERS: dict[str, type[Adapter]] = {}


def register(config_cls: type[AdapterConfig], adapter_cls: type[Adapter]) -> None:
    from ..config import register_config

    register_config(config_cls)
    _ADAPTERS[config_cls.method] = adapter_cls


def adapter_class(method: str) -> type[Adapter]:
    if method not in _ADAPTERS:
        raise ValueError(f"method={method!r} has no adapter; known: {sorted(_ADAPTERS)}")
    return _ADAPTERS[method]


from .lora import LoraAdapter, LoraConfig  # noqa: E402

register(LoraConfig, LoraAdapter)
from .boft import BoftAdapter, BoftConfig  # noqa: E402
register(BoftConfig, BoftAdapter)
from .unitary import UnitaryAdapter, UnitaryConfig  # noqa: E402
register(UnitaryConfig, UnitaryAdapter)
from .lora_ga import LoraGAAdapter, LoraGAConfig  # noqa: E402
register(LoraGAConfig, LoraGAAdapter)
from .hybrid import HybridAdapter, HybridConfig  # noqa: E402
register(HybridConfig, HybridAdapter)
from .dora import DoraAdapter, DoraConfig  # noqa: E402
register(DoraConfig, DoraAdapter)
from .ia3 import IA3Adapter, IA3Config  # noqa: E402
register(IA3Config, IA3Adapter)
