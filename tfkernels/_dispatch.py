"""Which implementation a call runs: Triton kernels or the eager reference (DESIGN §3, Dispatch).

CUDA tensors run the Triton kernels. CPU tensors run the reference, except under
``TRITON_INTERPRET=1``, where Triton's interpreter runs the kernels themselves on the CPU: this is
how the test suite checks the kernels without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """True when ops on ``x`` should launch the Triton kernels."""
    if not HAS_TRITON:
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and triton_interpret()


def backend(device: torch.device | str) -> str:
    """What tfkernels ops run for tensors on ``device``: ``"triton"`` (the kernels, compiled on CUDA or in
    Triton's interpreter under ``TRITON_INTERPRET=1``) or ``"reference"`` (the eager PyTorch reference)."""
    return "triton" if use_triton(torch.empty(0, device=device)) else "reference"
