"""Task modules register themselves with ``register_task``; import them here, one line each."""
from .base import IGNORE_INDEX, Example, Task, encode_causal, encode_classification, get_task, known_tasks, register_task  # noqa: F401
from . import synthetic  # noqa: F401,E402  (registers 'arith')
