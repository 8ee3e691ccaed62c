"""hybridpeft: parameter-efficient fine-tuning with LoRA, LoRA-GA, BOFT, unitary adapters and a Hybrid."""
from ._version import __version__
from .adapters import Adapter, AdaptedLinear
from .adapters.full import FullConfig
from .adapters.lora import LoraConfig
from .adapters.unitary import UnitaryConfig
from .adapters.boft import BoftConfig
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
from .adapters.config import AdapterConfig
from .inject import adapted_layers, inject
from .optim import CombinedOptimizer, RiemannianAdam, RiemannianSGD, build_optimizer
from .adapters.lora_ga import LoraGAConfig
from .gradient_init import lora_ga_init
from .adapters.hybrid import HybridConfig
