"""Argument checks shared by the public ops, the mask and the schedules (docs/design.md#argument-checks).

One rule everywhere: an argument of the wrong type (a float where an int is due, a list where a
tensor is, a tensor of the wrong dtype) raises ``TypeError``; one of the right type with a wrong
value (out of range, wrong shape, wrong device) raises ``ValueError``. Every message starts with
the argument's name: ``"name: expected ..., got ..."``.

``is_int`` is the predicate (for callers that raise their own error); the ``check_*`` functions
raise. A bool is never an int or a float here, although Python says it is one.

The autocast rule of the ops is applied here too (``autocast_dtype``, ``autocast_cast``,
``autocast_off``): inside an op autocast is off; an op that is a matmul consumer (attention, the LM
loss) first casts its float operands to autocast's dtype, as ``nn.Linear`` does; an elementwise op
(the diffusion ops) takes its inputs as given and computes in float32. See docs/design.md#autocast.
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = ["FLOAT_DTYPES", "INDEX_DTYPES", "autocast_cast", "autocast_dtype", "autocast_off", "check_choice",
           "check_float", "check_float_tensor", "check_index_tensor", "check_int", "is_int", "is_int_dtype", "is_real"]

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


# Device types whose autocast state the ops read: ``torch.is_autocast_enabled`` raises for others
# (e.g. "meta"), where autocast cannot be on anyway.
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def autocast_dtype(x) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on ``x``'s device type, or ``None`` where autocast is off
    there (and for a non-tensor, which the op's own checks then reject). Traceable by
    ``torch.compile`` (dynamo folds the autocast state into a constant and guards on it)."""
    if not isinstance(x, torch.Tensor) or x.device.type not in _AUTOCAST_DEVICE_TYPES:
        return None
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def autocast_cast(dtype: torch.dtype, *tensors):
    """``tensors``, each cast to ``dtype`` if it is a tensor of one of ``FLOAT_DTYPES``, else as given:
    what autocast does to the operands of ``nn.Linear`` (float64, integer tensors and non-tensors
    are left alone, for the op's checks to judge)."""
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES else x for x in tensors)


def autocast_off(x):
    """A context that turns autocast off on ``x``'s device type (a no-op one where autocast does not
    exist): inside an op, torch functions must run in the dtypes the op chose, not autocast's."""
    if not isinstance(x, torch.Tensor) or x.device.type not in _AUTOCAST_DEVICE_TYPES:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)
