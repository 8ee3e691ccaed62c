"""hybridpeft: parameter-efficient fine-tuning with LoRA, LoRA-GA, BOFT, unitary adapters and a Hybrid."""
from ._version import __version__
from .adapters import Adapter, AdaptedLinear
from .adapters.boft import BoftConfig
from .adapters.config import AdapterConfig
from .adapters.dora import DoraConfig
from .adapters.full import FullConfig
from .adapters.hybrid import HybridConfig
from .adapters.ia3 import IA3Config
from .adapters.lora import LoraConfig
from .adapters.lora_ga import LoraGAConfig
from .adapters.unitary import UnitaryConfig
from .api import (
    after_optimizer_step,
    count_trainable,
    disabled,
    load_adapter,
    merge,
    merge_and_unload,
    mixing_state,
    read_adapter_config,
    save_adapter,
    trainable_parameters,
    unmerge,
    update_mixing,
)
from .gradient_init import lora_ga_init
from .inject import adapted_layers, inject
from .optim import CombinedOptimizer, RiemannianAdam, RiemannianSGD, build_optimizer
from .peft_format import export_peft, load_peft

__all__ = [
    "__version__",
    # configs, one per method, and the interfaces
    "AdapterConfig", "LoraConfig", "LoraGAConfig", "BoftConfig", "UnitaryConfig", "HybridConfig", "DoraConfig",
    "IA3Config", "FullConfig", "Adapter", "AdaptedLinear",
    # model-level operations
    "inject", "adapted_layers", "lora_ga_init", "merge", "unmerge", "merge_and_unload", "disabled",
    "trainable_parameters", "count_trainable", "after_optimizer_step", "update_mixing", "mixing_state",
    "save_adapter", "load_adapter", "read_adapter_config",
    # the HF PEFT format
    "export_peft", "load_peft",
    # optimizers
    "build_optimizer", "CombinedOptimizer", "RiemannianAdam", "RiemannianSGD",
]
