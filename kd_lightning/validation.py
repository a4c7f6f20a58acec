"""Checks of numeric hyperparameters (temperatures, weights, fractions) given from Python or YAML.

From the command line jsonargparse converts ``temperature: 4`` to a float; from Python nothing
does, so ``SoftTargetKLLoss("4")`` or ``OfflineDistillation(..., alpha="0.5")`` would meet a
comparison deep inside a constructor (``'>' not supported between 'str' and 'int'``). Every
constructor that takes such a number checks it here: a string, ``None`` or a bool is refused
with a :class:`TypeError` naming the argument and the fix, a NaN or infinite value with a
:class:`ValueError` (an infinite temperature or weight only ever gives a NaN loss later).
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def number(name: str, value: Any) -> float:
    """``value`` as a float when it is a real number (not a bool, string or ``None``).

    Raises:
        TypeError: naming ``name``, the value given and how to write it as a number.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    fix = "give a number"
    if isinstance(value, str):
        try:
            fix = f"write {name}={float(value)!r} (a number, not the string {value!r})"
        except ValueError:
            fix = f"give a number (the string {value!r} is not one)"
    raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}): {fix}")


def _finite(name: str, value: float, bound: str, hint: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {bound} and finite, got {value}. {hint}".rstrip())
    return value


def positive(name: str, value: Any, hint: str = "") -> float:
    """A finite number > 0 (temperatures, epsilons).

    Raises:
        TypeError: not a number. ValueError: ``<= 0``, NaN or infinite; the message ends with
            ``hint`` (e.g. "Use e.g. temperature: 4.0").
    """
    value = number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}. {hint}".rstrip())
    return _finite(name, value, "> 0", hint)


def within(name: str, value: Any, low: float, high: float, why: str) -> float:
    """A finite number in ``[low, high]`` (a temperature with a documented useful range).

    Raises:
        TypeError: not a number. ValueError: outside the range, NaN or infinite; the message
            names the range and ends with ``why`` (what goes wrong outside it, what to use).
    """
    value = positive(name, value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value:g}: {why}")
    return value


TEMPERATURE_RANGE = (1e-2, 1e4)
"""Softening temperatures the library accepts. Below 0.01 a logit gap of 1 becomes a factor
``exp(-100)`` after softening, under float32's smallest number: the softened distribution is
one-hot (no dark knowledge; sampling from it fails) and a T^2-scaled loss vanishes. Above 1e4
it is uniform to float32 precision (its high-temperature limit is logit matching)."""


def temperature(value: Any, name: str = "temperature") -> float:
    """A softening temperature in :data:`TEMPERATURE_RANGE` (token losses, teacher caches).

    Raises:
        TypeError: not a number. ValueError: outside the range, NaN or infinite, saying why.
    """
    return within(
        name,
        value,
        *TEMPERATURE_RANGE,
        "below 0.01 the softened distribution is one-hot in float32 (no dark knowledge is "
        "left); above 1e4 it is uniform to float32 precision. Use e.g. temperature: 1.0 "
        "(1-20 are common)",
    )


def non_negative(name: str, value: Any, hint: str = "") -> float:
    """A finite number >= 0 (loss weights).

    Raises:
        TypeError: not a number. ValueError: negative, NaN or infinite.
    """
    value = number(name, value)
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}. {hint}".rstrip())
    return _finite(name, value, ">= 0", hint)


def fraction(name: str, value: Any, upper: float = 1.0) -> float:
    """A number in ``[0, upper]`` (``alpha`` and other mixing weights).

    Raises:
        TypeError: not a number. ValueError: outside the interval or NaN.
    """
    value = number(name, value)
    if not 0 <= value <= upper:
        raise ValueError(f"{name} must be in [0, {upper:g}], got {value}")
    return value
