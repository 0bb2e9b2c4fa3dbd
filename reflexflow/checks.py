"""Argument checks shared by the config, the time samplers, the sampler and diagnostics.

A leaf module (it imports nothing from the package), so that any module can use it without
an import cycle. Each raises TypeError for a wrong kind and ValueError for a wrong value,
naming the argument and what was expected.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["CONVENTIONS", "check_bool", "check_choice", "check_number", "check_own_convention"]

# the two time conventions (reflexflow.conventions): data at t = 1, or noise at sigma = 1
CONVENTIONS = ("data_at_1", "noise_at_1")


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
) -> None:
    """A finite real number (an int with ``integer``; never a bool) in [low, high], or in
    (low, high] with ``low_open``; a bound left None is not checked."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def check_bool(name: str, value: Any, *, optional: bool = False) -> None:
    """A bool (or None with ``optional``); 0 and 1 are not bools."""
    if not (isinstance(value, bool) or (optional and value is None)):
        expected = "a bool or None" if optional else "a bool"
        raise TypeError(f"{name} must be {expected}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_own_convention(name: str, obj: Any) -> None:
    """``obj.convention``, where set (not None), is one of :data:`CONVENTIONS`: a time
    sampler or loss weighting that declares the convention of its times."""
    value = getattr(obj, "convention", None)
    if value is not None and value not in CONVENTIONS:
        raise ValueError(f"{name}.convention must be one of {CONVENTIONS} or None, got {value!r}")
