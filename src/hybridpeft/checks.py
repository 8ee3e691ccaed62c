"""Validation of user-facing values: one error format for every config field and argument.

``check(condition, field, value, expected)`` raises
``ValueError("<field>=<value!r> is invalid: expected <expected>")``; the predicates
below are the tests the fields share (a ``bool`` is not accepted where a number is meant).
"""
from __future__ import annotations

from typing import Any


def check(condition: bool, field_name: str, value: Any, expected: str) -> None:
    """Raise a ValueError that names the field, the value and what was expected."""
    if not condition:
        raise ValueError(f"{field_name}={value!r} is invalid: expected {expected}")


def is_int(value: Any) -> bool:
    """An integer, and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An ``int`` or ``float``, and not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
