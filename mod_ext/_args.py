"""Argument checks shared by the Python modules: one rule for what counts as an integer or
a real number (Python, NumPy and 0-d integer torch scalars alike; bool is never a number
here), and an error that names the argument and the expected range."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional


def as_int(value, name: str, low: int, high: Optional[int] = None, where: str = "mod_ext",
           allow_none: bool = False) -> Optional[int]:
    """value as a Python int in [low, high) (high None: no upper bound).

    Raises:
        ValueError: a bool, a non-integer, or an int out of range; the message names
            ``where`` and ``name``.
    """
    if value is None and allow_none:
        return None
    expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
    if allow_none:
        expected += " or None"
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy.bool_ too
        raise ValueError(f"{where}: {name} must be {expected}, got {value!r}")
    try:
        i = operator.index(value)
    except TypeError:
        raise ValueError(f"{where}: {name} must be {expected}, got {value!r}") from None
    if i < low or (high is not None and i >= high):
        raise ValueError(f"{where}: {name} must be {expected}, got {i}")
    return i


def is_real(value) -> bool:
    """A real number (Python, NumPy), not a bool and not a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def as_real(value, name: str, where: str, *, low: float = -math.inf, low_open: bool = False,
            high: float = math.inf, what: str = "a number") -> float:
    """value as a Python float in the given range (inf allowed only when it is the bound).

    Raises:
        ValueError: not a real number, NaN, or out of range; the message names the argument.
    """
    ok = is_real(value) and not math.isnan(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and v <= high
    if not ok:
        raise ValueError(f"{where}: {name} must be {what}, got {value!r}")
    return v
