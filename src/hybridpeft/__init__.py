"""hybridpeft: parameter-efficient fine-tuning with LoRA, LoRA-GA, BOFT, unitary adapters and a Hybrid."""
__version__ = "0.1.0"

from .adapters import Adapter, AdaptedLinear  # noqa: E402
from .adapters.full import FullConfig  # noqa: E402
from .adapters.lora import LoraConfig  # noqa: E402
from .adapters.unitary import UnitaryConfig  # noqa: E402
from .adapters.boft import BoftConfig  # noqa: E402
from .adapters.dora import DoraConfig  # noqa: E402
from .adapters.ia3 import IA3Config  # noqa: E402
from .api import (  # noqa: E402
    after_optimizer_step,
    count_trainable,
    disabled,
    load_adapter,
    merge,
    merge_and_unload,
    read_adapter_config,
    save_adapter,
    trainable_parameters,
    unmerge,
    update_mixing,
)
from .config import AdapterConfig  # noqa: E402
from .inject import adapted_layers, inject  # noqa: E402
from .optim import CombinedOptimizer, RiemannianAdam, RiemannianSGD, build_optimizer  # noqa: E402
from .adapters.lora_ga import LoraGAConfig  # noqa: E402
from .lora_ga import lora_ga_init  # noqa: E402
from .adapters.hybrid import HybridConfig  # noqa: E402
from .mixing import mixing_state  # noqa: E402
from .peft_format import export_peft, load_peft  # noqa: E402
