"""LM loss: ``tk.linear_cross_entropy`` against the eager projection + cross-entropy.

N = 16384 text tokens, hidden 2048, V = 65536, bf16 on CUDA (quick: N = 256, hidden 64, V = 512,
float32 on the CPU). Compute-bound: useful FLOPs are the projection's, ``2 N H V`` forward and
``4 N H V`` backward (d hidden and d weight); the fused kernel's recomputed logits do not count.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tfkernels as tk

from ..harness import DIFFERENTIABLE_MODES, Implementation, InputSet, Work, Workload
from .common import bench_dtype, compile_unavailable, dtype_name, tfkernels_backend

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


@functools.cache
def _compiled_eager():
    return torch.compile(eager_linear_cross_entropy, dynamic=False)


def implementation(name: str) -> Implementation:
    functions = {"tfkernels": lambda: tk.linear_cross_entropy, "eager": lambda: eager_linear_cross_entropy,
                 "compiled_eager": _compiled_eager}

    def prepare(first: InputSet):
        fn = functions[name]()
        return lambda inputs: fn(inputs.data.hidden, inputs.data.weight, inputs.data.target)

    if name == "tfkernels":
        return Implementation(name, prepare, backend=tfkernels_backend)
    if name == "compiled_eager":
        return Implementation(name, prepare, backend="torch.compile", unavailable=compile_unavailable)
    return Implementation(name, prepare, backend="eager")


def workloads(quick: bool, device: torch.device) -> list[Workload]:
    dtype = bench_dtype(device)
    tokens, hidden_size, vocab_size = (256, 64, 512) if quick else (16384, 2048, 65536)

    def work(mode: str) -> Work:
        return Work(flops=2 * tokens * hidden_size * vocab_size * PROJECTIONS[mode])

    return [Workload(
        suite=SUITE, name="lm_loss", shape=f"N={tokens} H={hidden_size} V={vocab_size} {dtype_name(dtype)}",
        dtype=dtype, setup=setup_for(tokens, hidden_size, vocab_size, dtype),
        implementations=[implementation(name) for name in ("tfkernels", "eager", "compiled_eager")],
        modes=DIFFERENTIABLE_MODES, work=work,
    )]
