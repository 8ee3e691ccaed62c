"""One module per method; each is registered below, one line per method (config class, adapter class)."""
from __future__ import annotations

from .base import AdaptedLinear, Adapter
from .boft import BoftAdapter, BoftConfig
from .config import AdapterConfig, register_config
from .dora import DoraAdapter, DoraConfig
from .full import FullConfig
from .hybrid import HybridAdapter, HybridConfig
from .ia3 import IA3Adapter, IA3Config
from .lora import LoraAdapter, LoraConfig
from .lora_ga import LoraGAAdapter, LoraGAConfig
from .unitary import UnitaryAdapter, UnitaryConfig

_ADAPTERS: dict[str, type[Adapter]] = {}


def register(config_cls: type[AdapterConfig], adapter_cls: type[Adapter] | None) -> None:
    """Make ``config_cls.method`` loadable and injectable (``None``: the method adapts no layer)."""
    register_config(config_cls)
    if adapter_cls is not None:
        _ADAPTERS[config_cls.method] = adapter_cls


def adapter_class(method: str) -> type[Adapter]:
    if method not in _ADAPTERS:
        raise ValueError(f"method={method!r} has no adapter; known: {sorted(_ADAPTERS)}")
    return _ADAPTERS[method]


def adapter_methods() -> list[str]:
    """The registered methods that adapt layers (all but ``full``, which trains the model itself)."""
    return sorted(_ADAPTERS)


register(LoraConfig, LoraAdapter)
register(BoftConfig, BoftAdapter)
register(UnitaryConfig, UnitaryAdapter)
register(LoraGAConfig, LoraGAAdapter)
register(HybridConfig, HybridAdapter)
register(DoraConfig, DoraAdapter)
register(IA3Config, IA3Adapter)
register(FullConfig, None)
