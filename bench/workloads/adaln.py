"""adaLN modulation: ``tk.adaln_modulate`` against DiT / PixArt-alpha's eager code.

PixArt-alpha at 512 px: 16 images of 1024 tokens (a 64 x 64 latent in 2 x 2 patches), width 1152,
per-sample conditioning (adaLN-single), LayerNorm with eps 1e-6, bf16 on CUDA (quick: 2 images of
64 tokens, width 96, float32 on the CPU). Two workloads:

- ``adaln_modulate``: ``y = norm(x) * (1 + scale) + shift``, the input of a block's attention or MLP;
- ``adaln_gated_residual``: the block's gated residual add fused in front of it,
  ``h = residual + gate * branch``, ``y = norm(h) * (1 + scale) + shift``, returning ``(y, h)``
  (the benchmark differentiates ``y``).

Memory-bound, so the throughput is useful GB/s, counted in ``[B, T, C]`` tensors (the per-sample
``[B, C]`` rows are a thousandth of that): plain forward reads x and writes y (2), its backward
reads dy and x and writes dx (3); gated forward reads branch and residual and writes h and y (4),
its backward reads dy, h and branch and writes d(branch) and d(residual) (5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tfkernels as tk

from ..harness import DIFFERENTIABLE_MODES, Implementation, InputSet, Work, Workload
from .common import bench_dtype, dtype_name, eager_peers, tfkernels_backend

SUITE = "adaln"
EPS = 1e-6  # PixArt-alpha's LayerNorm(elementwise_affine=False, eps=1e-6)
# [B, T, C] tensors moved per mode, without (plain) and with the gated residual add.
TENSORS_MOVED = {
    False: {"forward": 2, "backward": 3, "forward_backward": 5},
    True: {"forward": 4, "backward": 5, "forward_backward": 9},
}


@dataclass
class AdaLNData:
    x: torch.Tensor  # [B, T, C]: the tokens, or (gated) the branch output
    shift: torch.Tensor  # [B, C]
    scale: torch.Tensor  # [B, C]
    gate: torch.Tensor | None  # [B, C] (gated only)
    residual: torch.Tensor | None  # [B, T, C] (gated only)


def setup_for(batch: int, tokens: int, channels: int, dtype: torch.dtype, gated: bool):
    def setup(device: torch.device, seed: int) -> InputSet:
        generator = torch.Generator(device).manual_seed(seed)

        def randn(*shape, std=1.0):
            return (torch.randn(shape, generator=generator, device=device, dtype=dtype) * std).requires_grad_()

        x = randn(batch, tokens, channels)
        shift, scale = randn(batch, channels, std=0.3), randn(batch, channels, std=0.3)
        gate = randn(batch, channels, std=0.3) if gated else None
        residual = randn(batch, tokens, channels) if gated else None
        data = AdaLNData(x, shift, scale, gate, residual)
        leaves = tuple(t for t in (x, shift, scale, gate, residual) if t is not None)
        return InputSet(data, leaves=leaves, grad_output=torch.randn(x.shape, generator=generator, device=device,
                                                                     dtype=dtype))

    return setup


def eager_adaln_modulate(x, shift, scale, gate, residual):
    """As DiT / PixArt-alpha write it: ``x = x + gate * branch`` in the activations' dtype, then
    ``modulate(norm(x), shift, scale)`` with a LayerNorm without affine. Returns ``y`` or ``(y, h)``."""
    h = None
    if residual is not None:
        h = residual + gate.unsqueeze(1) * x
        x = h
    y = F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return y if h is None else (y, h)


def arguments(data: AdaLNData) -> tuple:
    return data.x, data.shift, data.scale, data.gate, data.residual


def tfkernels_adaln() -> Implementation:
    def prepare(first: InputSet):
        def call(inputs):
            d = inputs.data
            return tk.adaln_modulate(d.x, d.shift, d.scale, gate=d.gate, residual=d.residual, eps=EPS)

        return call

    return Implementation("tfkernels", prepare, backend=tfkernels_backend)


def workloads(quick: bool, device: torch.device) -> list[Workload]:
    dtype = bench_dtype(device)
    batch, tokens, channels = (2, 64, 96) if quick else (16, 1024, 1152)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    result = []
    for gated in (False, True):

        def work(mode: str, gated=gated) -> Work:
            return Work(bytes=TENSORS_MOVED[gated][mode] * batch * tokens * channels * itemsize)

        what = "residual + gate * branch, then " if gated else ""
        result.append(Workload(
            suite=SUITE, name="adaln_gated_residual" if gated else "adaln_modulate",
            shape=f"B={batch} T={tokens} C={channels}, {what}LayerNorm * (1 + scale) + shift, per-sample "
                  f"{dtype_name(dtype)}",
            dtype=dtype, setup=setup_for(batch, tokens, channels, dtype, gated),
            implementations=[tfkernels_adaln(), *eager_peers(eager_adaln_modulate, arguments)],
            modes=DIFFERENTIABLE_MODES, work=work,
        ))
    return result
