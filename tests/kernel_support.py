"""What the kernel test modules share: the device, the dtypes the interpreter handles, and the
marks that skip a module without a way to run Triton, or a test without a GPU."""

import pytest
import torch

from tfkernels._dispatch import use_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Triton's interpreter mishandles bfloat16 (loads keep raw 16-bit integers): CPU runs test these.
CPU_DTYPES = [torch.float32, torch.float16]

requires_triton = pytest.mark.skipif(
    not use_triton(torch.empty(0, device=DEVICE)),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 to run the Triton kernels",
)

gpu_only = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: bfloat16 (the interpreter mishandles it) and full-size shapes",
)
