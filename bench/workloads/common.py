"""What several suites share: the benchmark dtype per device, how to label what ran, and the
eager peers (as written, and under ``torch.compile``) of the loss suites."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

import tfkernels as tk

from ..harness import Implementation, InputSet

# Modes whose timed call runs a backward pass: the harness's two, and the end-to-end training step.
BACKWARD_MODES = ("backward", "forward_backward", "train_step")


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


@functools.cache
def compiled(function: Callable) -> Callable:
    """``function`` under ``torch.compile`` (static shapes), compiled once per process."""
    return torch.compile(function, dynamic=False)


def eager_peers(function: Callable, arguments: Callable[[object], tuple]) -> list[Implementation]:
    """``eager``: ``function`` as eager training code runs it; ``compiled_eager``: the same under
    ``torch.compile`` (CUDA only). ``arguments(data)`` gives its arguments from an input set's data."""

    def prepare_with(get_function: Callable[[], Callable]):
        def prepare(first: InputSet):
            fn = get_function()
            return lambda inputs: fn(*arguments(inputs.data))

        return prepare

    return [
        Implementation("eager", prepare_with(lambda: function), backend="eager"),
        Implementation("compiled_eager", prepare_with(lambda: compiled(function)), backend="torch.compile",
                       unavailable=compile_unavailable),
    ]
