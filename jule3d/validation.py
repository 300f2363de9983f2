"""Checks of user input, shared by every module: each raises ``ValueError`` naming the parameter.

Examples
--------
>>> check_int("k_s", 5, minimum=1)
5
>>> check_int("k_s", 0, minimum=1)
Traceback (most recent call last):
...
ValueError: k_s must be an integer >= 1, got 0
>>> check_weight("smoothing", -1.0)
Traceback (most recent call last):
...
ValueError: smoothing must be a finite number >= 0, got -1.0
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["check_choice", "check_int", "check_mask", "check_range", "check_weight"]


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (bools refused), or a ``ValueError`` naming ``name``."""
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))
    if not ok or value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name} must be an integer >= {minimum}{upper}, got {value!r}")
    return int(value)


def check_range(name: str, value: Any, low: float, high: float, low_open: bool = False,
                high_open: bool = False) -> float:
    """``value`` as a ``float`` in the interval from ``low`` to ``high`` (open ends as given), else ``ValueError``."""
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_))
    ok = ok and math.isfinite(value) and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {bounds}, got {value!r}")
    return float(value)


def check_weight(name: str, value: Any) -> float:
    """A weight: a finite number >= 0 (bools refused)."""
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))
    if not ok or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_mask(mask: Any, shape: Sequence[int], name: str = "mask", what: str = "the volume") -> np.ndarray:
    """``mask`` as a ``bool`` array of ``shape`` with at least one true voxel (all true when ``None``).

    Raises
    ------
    ValueError
        If its shape differs from ``shape`` or it selects no voxel; the message names ``name``.
    """
    shape = tuple(int(s) for s in shape)
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name} shape {mask.shape} does not match the shape {shape} of {what}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise ValueError(f"{name} is empty: no foreground voxel in {what}")
    return mask
