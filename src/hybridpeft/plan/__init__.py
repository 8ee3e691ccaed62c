"""``hybridpeft plan``: predicted peak memory per device, from shapes alone (meta device, no weights).

    from hybridpeft.plan import PlanRequest, plan, format_plan
    print(format_plan(plan(PlanRequest("llama-3.1-8b", "hybrid", quantization="nf4"))))

Modules: ``shapes`` (named shapes, config.json / directory / hub id, the meta-device
inventory), ``activations`` (the base model's saved bytes), ``methods`` (each method's
tensors and saved bytes per module), ``estimate`` (the step's phases, sharding, LoRA-GA's
estimate), ``report`` (text and JSON).
"""
from .estimate import Plan, PlanRequest, plan
from .report import format_plan, plan_json
from .shapes import NAMED_SHAPES, PlanInputError

__all__ = ["NAMED_SHAPES", "Plan", "PlanInputError", "PlanRequest", "format_plan", "plan", "plan_json"]
