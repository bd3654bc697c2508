"""Which implementation a call runs: Triton kernels or the eager reference (docs/design.md#dispatch).

CUDA tensors run the Triton kernels. CPU tensors run the reference, except under
``TRITON_INTERPRET=1``, where Triton's interpreter runs the kernels themselves on the CPU: this is
how the test suite checks the kernels without a GPU.
"""

from __future__ import annotations

import functools

import torch

from .launch import HAS_TRITON, recording, triton_interpret

__all__ = ["HAS_TRITON", "backend", "check_interpreter", "use_triton"]


def check_interpreter(triton_version: str, numpy_version: str) -> None:
    """Raise if this Triton's interpreter cannot run tfkernels' kernels: Triton 3.6's turns a loop bound
    computed from a loaded value into a one-element array, which numpy >= 2.4 refuses to convert to
    an int (``range(tile_lo, tile_hi)`` in the attention walks). Checked: 3.6 with numpy 2.3 and 3.9
    with numpy 2.4 work. The compiled GPU path is unaffected."""
    def major_minor(version: str) -> tuple[int, int]:
        parts = version.split(".")
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)

    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        raise RuntimeError(f"TRITON_INTERPRET=1: Triton {triton_version}'s interpreter cannot run tfkernels' "
                           f"kernels with numpy {numpy_version} (it needs numpy < 2.4); install numpy<2.4 or a newer "
                           f"Triton (3.9 is tested), or unset TRITON_INTERPRET for the eager reference")


@functools.cache
def _interpreter_checked() -> bool:
    import numpy
    import triton

    check_interpreter(triton.__version__, numpy.__version__)
    return True


def use_triton(x: torch.Tensor) -> bool:
    """True when ops on ``x`` should launch the Triton kernels."""
    if not HAS_TRITON:
        return False
    if x.device.type == "cuda" or recording():  # recording: launches are collected, nothing runs
        return True
    if x.device.type != "cpu" or not triton_interpret():
        return False
    # Checked in eager mode (once); dynamo would trace through the cache wrapper.
    return torch.compiler.is_compiling() or _interpreter_checked()


def backend(device: torch.device | str) -> str:
    """What tfkernels ops run for tensors on ``device``: ``"triton"`` (the kernels, compiled on CUDA or in
    Triton's interpreter under ``TRITON_INTERPRET=1``) or ``"reference"`` (the eager PyTorch reference)."""
    return "triton" if use_triton(torch.empty(0, device=device)) else "reference"
