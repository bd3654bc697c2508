"""LM loss: ``tk.linear_cross_entropy`` against the eager projection + cross-entropy.

N = 16384 text tokens, hidden 2048, V = 65536, bf16 on CUDA (quick: N = 256, hidden 64, V = 512,
float32 on the CPU). Compute-bound: useful FLOPs are the projection's, ``2 N H V`` forward and
``4 N H V`` backward (d hidden and d weight); the fused kernel's recomputed logits do not count.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tfkernels as tk

from ..harness import DIFFERENTIABLE_MODES, Implementation, InputSet, Work, Workload
from .common import bench_dtype, dtype_name, eager_peers, tfkernels_backend

SUITE = "lm_loss"
PROJECTIONS = {"forward": 1, "backward": 2, "forward_backward": 3}  # [N, H] x [H, V] products per mode


@dataclass
class LMLossData:
    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    target: torch.Tensor  # int64 [N]


def setup_for(tokens: int, hidden_size: int, vocab_size: int, dtype: torch.dtype):
    def setup(device: torch.device, seed: int) -> InputSet:
        generator = torch.Generator(device).manual_seed(seed)
        hidden = torch.randn(tokens, hidden_size, generator=generator, device=device, dtype=dtype)
        weight = torch.randn(vocab_size, hidden_size, generator=generator, device=device, dtype=dtype)
        weight = (weight * hidden_size**-0.5).requires_grad_()  # logits of unit scale
        target = torch.randint(vocab_size, (tokens,), generator=generator, device=device)
        return InputSet(LMLossData(hidden.requires_grad_(), weight, target), leaves=(hidden, weight))

    return setup


def eager_linear_cross_entropy(hidden, weight, target, ignore_index=-100):
    """How eager training code writes it: the ``[N, V]`` logits in the activations' dtype, the
    cross-entropy in float32."""
    return F.cross_entropy(F.linear(hidden, weight).float(), target, ignore_index=ignore_index)


def loss_arguments(data: LMLossData) -> tuple:
    return data.hidden, data.weight, data.target


def tfkernels_loss() -> Implementation:
    def prepare(first: InputSet):
        return lambda inputs: tk.linear_cross_entropy(*loss_arguments(inputs.data))

    return Implementation("tfkernels", prepare, backend=tfkernels_backend)


def _chunked_options():
    """torch's chunked linear cross-entropy options, or None where torch has none. The harness takes
    gradients with ``retain_graph=True`` (the backward mode reuses one forward graph), which the
    chunked path allows only when asked (at the cost of one gradient-sized buffer)."""
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is None:
        return None
    try:
        return options(allow_retain_graph=True)
    except TypeError:
        return options()


def torch_linear_cross_entropy() -> Implementation:
    """Optional peer: torch's own ``F.linear_cross_entropy`` (newer torch only), on its chunked path
    (``torch.nn.LinearCrossEntropyOptions``) where torch has one, else its reference path."""

    def prepare(first: InputSet):
        options = _chunked_options()
        chunked = {} if options is None else {"options": options}
        return lambda inputs: F.linear_cross_entropy(*loss_arguments(inputs.data), **chunked)

    def unavailable(device, mode):
        if hasattr(F, "linear_cross_entropy"):
            return None
        return f"torch {torch.__version__} has no F.linear_cross_entropy"

    backend = "torch chunked" if hasattr(torch.nn, "LinearCrossEntropyOptions") else "torch"
    return Implementation("torch_linear_cross_entropy", prepare, backend=backend, unavailable=unavailable)


def liger_linear_cross_entropy() -> Implementation:
    """Optional peer: Liger Kernel's fused linear cross-entropy (Triton, CUDA only), skipped where
    ``liger_kernel`` is not installed."""

    def prepare(first: InputSet):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda inputs: liger_fused_linear_cross_entropy(*loss_arguments(inputs.data))

    def unavailable(device, mode):
        if device.type != "cuda":
            return "Liger's kernels need CUDA"
        return None if importlib.util.find_spec("liger_kernel") else "liger_kernel is not installed"

    return Implementation("liger", prepare, backend="liger (triton)", unavailable=unavailable)


def workloads(quick: bool, device: torch.device) -> list[Workload]:
    dtype = bench_dtype(device)
    tokens, hidden_size, vocab_size = (256, 64, 512) if quick else (16384, 2048, 65536)

    def work(mode: str) -> Work:
        return Work(flops=2 * tokens * hidden_size * vocab_size * PROJECTIONS[mode])

    return [Workload(
        suite=SUITE, name="lm_loss", shape=f"N={tokens} H={hidden_size} V={vocab_size} {dtype_name(dtype)}",
        dtype=dtype, setup=setup_for(tokens, hidden_size, vocab_size, dtype),
        implementations=[tfkernels_loss(), *eager_peers(eager_linear_cross_entropy, loss_arguments),
                         torch_linear_cross_entropy(), liger_linear_cross_entropy()],
        modes=DIFFERENTIABLE_MODES, work=work,
    )]
