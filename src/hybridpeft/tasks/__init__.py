"""Task modules register themselves with ``register_task``; import them here, one line each."""
from .base import IGNORE_INDEX, Example, Task, encode_causal, encode_classification, get_task, known_tasks, register_task  # noqa: F401
from . import synthetic  # noqa: F401,E402  (registers 'arith')
from . import classification, gsm8k, humaneval, translation  # noqa: F401,E402  (sst2, rte, mnli, qnli, qqp, xnli [-cls], gsm8k, humaneval, translate-en-*)
