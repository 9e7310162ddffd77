"""Up-front checks of option and config values, each failure one line naming the key.

Every command checks the values it was given before it loads a model or starts long work, so a
typo costs a second, not a model load. The helpers take the value and the key as the user wrote it
(``--batch-size``, ``train.lr``) and return the value (converted where that is lossless), or raise
:class:`InvalidValueError`::

    lr = require_positive(cfg.lr, "train.lr")
    steps = require_int(cfg.max_steps, "train.max_steps", minimum=1)
    device = require_device(device, "--device")
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from conditune.errors import CondituneError


class InvalidValueError(CondituneError):
    """An option or config value out of its range or of the wrong type; ``key`` names it."""

    def __init__(self, key: str, value: Any, expected: str):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key} must be {expected}, got {value!r}")


def _number(value: Any, key: str) -> float | int:
    # bool is an int subclass, and numpy scalars are numbers.Real: accept those, refuse True and "3".
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidValueError(key, value, "a number")
    return value


def require_finite(value: Any, key: str) -> float | int:
    """``value`` as given, if it is a finite real number (not NaN, not ±inf)."""
    value = _number(value, key)
    if not math.isfinite(value):
        raise InvalidValueError(key, value, "a finite number")
    return value


def require_range(
    value: Any,
    key: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> float | int | None:
    """A finite number in [low, high] (``low_open``/``high_open``: excluding that end; None: unbounded);
    ``allow_none``: None passes (an optional setting left unset)."""
    if value is None and allow_none:
        return None
    value = require_finite(value, key)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise InvalidValueError(key, value, _describe_range(low, high, low_open, high_open))
    return value


def require_positive(value: Any, key: str, *, allow_zero: bool = False) -> float | int:
    """A finite number > 0 (``allow_zero``: >= 0)."""
    value = require_finite(value, key)
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidValueError(key, value, "a number >= 0" if allow_zero else "a positive number")
    return value


def require_int(value: Any, key: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (``2.0`` is accepted as 2, ``2.5``, ``"2"`` and ``True`` are not) in [minimum, maximum]."""
    number = _number(value, key)
    if isinstance(number, numbers.Integral) or (math.isfinite(number) and float(number).is_integer()):
        result = int(number)
    else:
        raise InvalidValueError(key, value, "a whole number")
    if (minimum is not None and result < minimum) or (maximum is not None and result > maximum):
        bounds = _describe_range(minimum, maximum, False, False)
        raise InvalidValueError(key, value, f"a whole number {bounds}")
    return result


def require_choice(value: Any, key: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices`` (compared as strings)."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise InvalidValueError(key, value, f"one of {', '.join(choices)}")
    return value


DEVICE_TYPES = ("cpu", "cuda")


def require_device(value: Any, key: str = "--device", *, allow_auto: bool = True) -> str:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:N`` (and ``auto`` if allowed).

    Returns the normalised name (``"cuda:0"`` stays ``"cuda:0"``, ``" CPU"`` becomes ``"cpu"``).
    """
    expected = ("auto, " if allow_auto else "") + "cpu, cuda or cuda:N"
    if not isinstance(value, str):
        raise InvalidValueError(key, value, expected)
    name = value.strip().lower()
    if allow_auto and name == "auto":
        return name
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InvalidValueError(key, value, expected) from None
    if device.type not in DEVICE_TYPES:
        raise InvalidValueError(key, value, expected)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CondituneError(f"{key} {value}: torch sees no CUDA device on this machine (use cpu)")
        if device.index is not None and device.index >= count:
            raise CondituneError(f"{key} {value}: this machine has {count} CUDA device(s), numbered from 0")
    return name


def _describe_range(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return "a finite number"
