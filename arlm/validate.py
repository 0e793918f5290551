"""The one place user-given numbers are checked: a ``ValueError`` naming the value and what is
allowed, never an ``assert``."""

from __future__ import annotations

import math
from collections.abc import Callable


def check_int(name: str, value: object, low: int, allowed: str | None = None) -> None:
    """``value`` must be an int (not a bool) of at least ``low``; ``allowed`` words the rule
    (default: ``>= low``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        rule = allowed or f">= {low}"
        raise ValueError(f"{name}={value!r} is not allowed; it must be an integer {rule}")


def check_float(name: str, value: object, ok: Callable[[float], bool], allowed: str) -> None:
    """``value`` must be a finite number for which ``ok`` holds; ``allowed`` words the rule."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ValueError(f"{name}={value!r} is not allowed; it must be {allowed}")
