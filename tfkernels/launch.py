"""Every Triton launch tfkernels makes goes through ``launch``; ``record_launches`` collects them instead.

Inside ``with record_launches(arch="sm_90") as launches:`` the ops on CPU tensors take their Triton
path (not the eager reference), choose the launch settings they would choose on that GPU
architecture, and append a ``Launch`` (kernel, grid, arguments) to ``launches`` instead of running
anything. This is how a machine without a GPU compiles exactly what a GPU run would launch
(``python -m bench.compile_report``): the launch's real arguments go through Triton's own binder, so
the kernel specialises as it would on the GPU. Output tensors are allocated but never written.

The kernels must have been defined without ``TRITON_INTERPRET=1`` (they are then ``JITFunction``s;
under the interpreter they are not, and there is nothing to compile): ``record_launches`` refuses
otherwise (``RecordingUnavailableError``).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["HAS_TRITON", "Launch", "RecordingUnavailableError", "arch_of", "launch", "record_launches", "recording",
           "triton_interpret"]


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **kwargs)``."""

    kernel: object  # a triton JITFunction
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass
class _Recording:
    arch: str
    launches: list


HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class RecordingUnavailableError(RuntimeError):
    """``record_launches`` cannot record here: Triton is missing, or the kernels are the interpreter's."""


# The package's kernels are defined when it is imported: interpreted functions if TRITON_INTERPRET=1 then.
_INTERPRETED_KERNELS = triton_interpret()
_RECORDING: contextvars.ContextVar[_Recording | None] = contextvars.ContextVar("tfkernels_recording", default=None)


def recording() -> bool:
    """True inside ``record_launches``: the ops take their Triton path and launch nothing. Never true
    while torch.compile traces (dynamo cannot trace a ContextVar, and recording compiles nothing)."""
    return not torch.compiler.is_compiling() and _RECORDING.get() is not None


def arch_of(device: torch.device) -> str:
    """The architecture launch settings are chosen for: ``"sm_90"`` style for a CUDA device (or the one
    ``record_launches`` names), ``"interpreter"`` for Triton's interpreter on the CPU."""
    active = _RECORDING.get()
    if active is not None:
        return active.arch
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    return "interpreter"


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or recorded inside ``record_launches``."""
    active = _RECORDING.get()
    if active is None:
        kernel[grid](*args, **kwargs)
    else:
        active.launches.append(Launch(kernel, tuple(grid), args, kwargs))


@contextlib.contextmanager
def record_launches(arch: str = "sm_90") -> Iterator[list[Launch]]:
    """Record the launches of the ops called inside, as they would be made on ``arch`` (``"sm_90"``,
    ``"sm_80"``, ...), instead of running them. Yields the list they are appended to."""
    if not (isinstance(arch, str) and arch.startswith("sm_") and arch[3:].isdigit()):
        raise ValueError(f"arch: expected a GPU architecture like 'sm_90', got {arch!r}")
    if not HAS_TRITON:
        raise RecordingUnavailableError("record_launches: triton is not installed")
    if _INTERPRETED_KERNELS:
        raise RecordingUnavailableError(
            "record_launches: tfkernels was imported under TRITON_INTERPRET=1, so its kernels are the interpreter's "
            "and there is nothing to compile; import it without TRITON_INTERPRET=1 (e.g. in a separate process)")
    token = _RECORDING.set(_Recording(arch, []))
    try:
        yield _RECORDING.get().launches
    finally:
        _RECORDING.reset(token)
