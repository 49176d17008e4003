"""The checks every config section runs on its fields, each raising `config_error` naming the field."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from megatron.bridge.utils.errors import config_error

__all__ = [
    "NUMPY_SEED_LIMIT",
    "check_choice",
    "check_fraction",
    "check_number",
    "check_positive",
    "check_seed",
    "is_int",
]

NUMPY_SEED_LIMIT = 2**32
"""Seeds must be below this: NumPy's legacy seeding takes 32-bit integers."""


def is_int(value: Any) -> bool:
    """True for an `int` that is not a `bool`."""
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to us


def check_positive(field_name: str, value: Any, *, optional: bool = True) -> None:
    """Refuse anything but a positive integer (or None when `optional`)."""
    if value is None and optional:
        return
    if not is_int(value) or value <= 0:
        allowed = "a positive integer" + (" or None" if optional else "")
        raise config_error(field_name, value, allowed)


def check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Refuse a value that is not one of `choices`."""
    if value not in choices:
        raise config_error(field_name, value, f"choose one of {', '.join(choices)}")


def check_number(field_name: str, value: Any, allowed: str, *, ok: Callable[[float], bool] = lambda _: True,
                  infinite: bool = False, optional: bool = False) -> None:
    """Refuse anything but a real number for which `ok` holds: NaN never, infinity only when `infinite`.

    NaN passes no comparison and infinity passes most (`inf > 0`), so both are ruled out first; a string
    or a bool is not a number either, though `True > 0` holds.
    """
    if value is None and optional:
        return
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (not is_number or (isinstance(value, float) and math.isnan(value))
            or (not infinite and isinstance(value, float) and math.isinf(value)) or not ok(value)):
        raise config_error(field_name, value, allowed)


def check_fraction(field_name: str, value: Any) -> None:
    """Refuse anything but a probability in [0, 1)."""
    check_number(field_name, value, "a probability in [0, 1)", ok=lambda v: 0.0 <= v < 1.0)


def check_seed(field_name: str, value: Any) -> None:
    """Refuse anything but an integer in NumPy's seed range [0, 2**32)."""
    if not is_int(value) or not 0 <= value < NUMPY_SEED_LIMIT:
        raise config_error(field_name, value, "an integer in [0, 2**32) (NumPy's seed range)")
