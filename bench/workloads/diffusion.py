"""Diffusion noise + loss: ``tk.add_noise`` and ``tk.diffusion_loss`` against eager PyTorch.

One call noises a batch of latents to per-image timesteps (cosine schedule) and takes the eps
loss of a prediction against them: 64 images of 4x32x32 and of 8x32x32 latents, bf16 on CUDA
(quick: 8 images of 4x8x8 and 8x8x8, float32 on the CPU). Memory-bound, so the throughput is
useful GB/s: per element, the forward reads x0, noise and pred and writes x_t; the backward reads
pred, x0 and noise and writes d(pred). ``device_copy`` copies the same bytes as forward+backward:
the bandwidth ceiling at this size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tfkernels as tk

from ..harness import DIFFERENTIABLE_MODES, Implementation, InputSet, Work, Workload
from .common import bench_dtype, dtype_name, eager_peers, tfkernels_backend

SUITE = "diffusion"
TENSORS_MOVED = {"forward": 4, "backward": 4, "forward_backward": 8, "copy": 8}


@dataclass
class DiffusionData:
    x0: torch.Tensor  # [N, C, H, W] clean latents
    noise: torch.Tensor  # like x0
    pred: torch.Tensor  # like x0, the model's eps prediction (needs a gradient)
    t: torch.Tensor  # int64 [N]
    schedule: tk.NoiseSchedule  # tables on the data's device
    seed: int  # for the in-kernel noise of tfkernels_seeded


def setup_for(images: int, channels: int, side: int, dtype: torch.dtype):
    def setup(device: torch.device, seed: int) -> InputSet:
        generator = torch.Generator(device).manual_seed(seed)
        schedule = tk.NoiseSchedule.cosine().to(device)

        def randn():
            return torch.randn(images, channels, side, side, generator=generator, device=device, dtype=dtype)

        x0, noise, pred = randn(), randn(), randn().requires_grad_()
        t = schedule.sample_timesteps(images, generator=generator, device=device)
        return InputSet(DiffusionData(x0, noise, pred, t, schedule, seed), leaves=(pred,))

    return setup


def eager_noise_and_loss(x0, noise, pred, t, signal_scale, noise_scale):
    """How eager training code writes it (diffusers style): gather the per-image coefficients,
    noise in float32, eps loss as one mean (equal to the mean of per-image means here, since all
    images have the same size). Returns ``(loss, x_t)``."""
    a = signal_scale[t].view(-1, *([1] * (x0.ndim - 1)))
    b = noise_scale[t].view(-1, *([1] * (x0.ndim - 1)))
    x_t = (a * x0.float() + b * noise.float()).to(x0.dtype)
    return F.mse_loss(pred.float(), noise.float()), x_t


def eager_arguments(data: DiffusionData) -> tuple:
    return data.x0, data.noise, data.pred, data.t, data.schedule.signal_scale, data.schedule.noise_scale


def tfkernels_noise_and_loss(seeded: bool) -> Implementation:
    def prepare(first: InputSet):
        def call(inputs):
            d = inputs.data
            noise = {"seed": d.seed} if seeded else {"noise": d.noise}
            x_t = tk.add_noise(d.x0, d.t, d.schedule, **noise)
            return tk.diffusion_loss(d.pred, d.x0, d.t, d.schedule, **noise), x_t

        return call

    return Implementation("tfkernels_seeded" if seeded else "tfkernels", prepare, backend=tfkernels_backend)


def device_copy() -> Implementation:
    def prepare(first: InputSet):
        x0 = first.data.x0
        # Half the forward+backward traffic is read from src, half written to dst.
        source = torch.empty(TENSORS_MOVED["copy"] // 2 * x0.numel(), dtype=x0.dtype, device=x0.device).normal_()
        destination = torch.empty_like(source)
        return lambda inputs: destination.copy_(source)

    return Implementation("device_copy", prepare, backend="Tensor.copy_", modes=("copy",))


def workloads(quick: bool, device: torch.device) -> list[Workload]:
    dtype = bench_dtype(device)
    images, side = (8, 8) if quick else (64, 32)
    result = []
    for channels in (4, 8):
        elements = images * channels * side * side
        itemsize = torch.empty(0, dtype=dtype).element_size()

        def work(mode: str, elements=elements, itemsize=itemsize) -> Work:
            return Work(bytes=TENSORS_MOVED[mode] * elements * itemsize)

        result.append(Workload(
            suite=SUITE, name=f"diffusion_{channels}x{side}x{side}",
            shape=f"{images} images [{channels}, {side}, {side}], cosine, eps {dtype_name(dtype)}",
            dtype=dtype, setup=setup_for(images, channels, side, dtype),
            implementations=[tfkernels_noise_and_loss(seeded=False), tfkernels_noise_and_loss(seeded=True),
                             *eager_peers(eager_noise_and_loss, eager_arguments), device_copy()],
            modes=DIFFERENTIABLE_MODES, work=work,
        ))
    return result
