"""Argument checks shared by the public ops, the mask and the schedules.

One rule everywhere: an argument of the wrong type (a float where an int is due, a list where a
tensor is, a tensor of the wrong dtype) raises ``TypeError``; one of the right type with a wrong
value (out of range, wrong shape, wrong device) raises ``ValueError``. Every message starts with
the argument's name: ``"name: expected ..., got ..."``.

``is_int`` is the predicate (for callers that raise their own error); the ``check_*`` functions
raise. A bool is never an int or a float here, although Python says it is one.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FLOAT_DTYPES", "INDEX_DTYPES", "check_choice", "check_float", "check_float_tensor", "check_index_tensor",
           "check_int", "is_int", "is_int_dtype", "is_real"]

# The dtypes the kernels take for data (activations, weights, images).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The dtypes they take for indices (timesteps, offsets, class targets).
INDEX_DTYPES = (torch.int32, torch.int64)


def is_int(value, low=None, high=None) -> bool:
    """``value`` is an int, not a bool, with ``low <= value <= high`` (each bound optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def is_real(value) -> bool:
    """``value`` is a Python int or float, not a bool (finite or not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int_dtype(dtype: torch.dtype) -> bool:
    """An integer tensor dtype: not floating point, complex or bool."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _bounds(low, high) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    return "" if high is None else f" <= {high}"


def check_int(name: str, value, low=None, high=None) -> int:
    """``value`` if it is an int (not a bool) with ``low <= value <= high``.

    Raises ``TypeError`` for anything that is not an int, ``ValueError`` for an int out of range.
    """
    message = f"{name}: expected an int{_bounds(low, high)}, got {value!r}"
    if not is_int(value):
        raise TypeError(message)
    if not is_int(value, low, high):
        raise ValueError(message)
    return value


def check_float(name: str, value, low=None, high=None, *, what: str | None = None) -> float:
    """``float(value)`` if it is a finite int or float (not a bool) with ``low <= value <= high``.

    ``what`` replaces the expectation in the message (default ``"a finite float"`` and the bounds).
    Raises ``TypeError`` for a value that is not a number, ``ValueError`` for NaN, infinities and
    values out of range.
    """
    message = f"{name}: expected {what or 'a finite float' + _bounds(low, high)}, got {value!r}"
    if not is_real(value):
        raise TypeError(message)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(message)
    return float(value)


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of the strings ``choices``: ``TypeError`` for a non-str, else ``ValueError``."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_float_tensor(name: str, x) -> torch.Tensor:
    """``x`` if it is a tensor of one of the kernels' float dtypes (``FLOAT_DTYPES``), else ``TypeError``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16 or float32, got {x.dtype}")
    return x


def check_index_tensor(name: str, x, shape: str) -> torch.Tensor:
    """``x`` if it is an int32 or int64 tensor, else ``TypeError``; ``shape`` (e.g. ``"[N]"``) names
    the expected shape in the message, which the caller checks."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected an int tensor {shape}, got {type(x).__name__}")
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected dtype int32 or int64, got {x.dtype}")
    return x
