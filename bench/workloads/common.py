"""What several suites share: the benchmark dtype per device and how to label what ran."""

from __future__ import annotations

import torch

import tfkernels as tk


def bench_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (what training runs); float32 on the CPU, whose bf16 matmuls are slow and
    where the quick mode only checks the harness."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tfkernels_backend(device: torch.device) -> str:
    """What a tfkernels op runs on this device: its Triton kernels or the eager reference."""
    return "triton" if tk.backend(device) == "triton" else "reference (eager)"


def compile_unavailable(device: torch.device, mode: str) -> str | None:
    if device.type == "cpu":
        return "torch.compile peers run on CUDA only (compiling on the CPU takes tens of seconds per shape)"
    return None
