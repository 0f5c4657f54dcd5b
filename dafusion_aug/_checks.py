"""Argument checks shared by the public functions: one rule, one wording for every integer argument."""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["check_int"]


def check_int(value: Any, name: str, minimum: int | None = None, unit: str | None = None) -> int:
    """``value`` as a Python int, checked; any integer type is accepted (``np.int64`` too), bools and floats are not.

    Args:
        value: what the caller passed.
        name: the argument's name, as the message shows it.
        minimum: the smallest value allowed, or None for any.
        unit: shown after "an int" in the messages (``"pixels"``), or None.

    Raises:
        TypeError: ``value`` is not an integer ("mask_grow must be an int (pixels), got float: 1.5").
        ValueError: ``value < minimum`` ("steps must be an int >= 1, got 0").
    """
    what = "an int" + (f" ({unit})" if unit else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}: {value!r}")
    if minimum is not None and value < minimum:
        what = f"an int >= {minimum}" + (f" ({unit})" if unit else "")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)
