"""What the kernel test modules share: the device, the dtypes the interpreter handles, and the
marks that skip a module without a way to run Triton, or a test without a GPU."""

import pytest
import torch

import tfkernels as tk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Triton's interpreter mishandles bfloat16 (loads keep raw 16-bit integers): CPU runs test these.
CPU_DTYPES = [torch.float32, torch.float16]

requires_triton = pytest.mark.skipif(
    tk.backend(DEVICE) != "triton",
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 to run the Triton kernels",
)

gpu_only = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: bfloat16 (the interpreter mishandles it) and full-size shapes",
)


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_anchored(name: str, ours: torch.Tensor, ref64: torch.Tensor, lowp: torch.Tensor,
                    magnitude: float = 0.0) -> None:
    """``max |ours - ref64| <= 2 * max |lowp - ref64| + 4 * eps * max(1, max |ref64|, magnitude)``:
    within twice eager PyTorch's own error in the same dtype, plus a few ulps of the values'
    magnitude (``magnitude``: the scale of the terms that cancel into a small result)."""
    eps = torch.finfo(ours.dtype).eps
    error = max_error(ours, ref64)
    largest = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = 2 * max_error(lowp, ref64) + 4 * eps * max(1.0, largest, magnitude)
    assert error <= bound, f"{name}: max error {error:.3g} > bound {bound:.3g}"
    assert torch.isfinite(ours).all(), name
