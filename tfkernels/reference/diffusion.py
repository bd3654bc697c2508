"""Forward noising and the diffusion loss, eagerly: the semantics the diffusion kernels match; and
``seeded_noise``, the seeded noise in torch. (The schedules are ``tfkernels.schedule``, re-exported
here.)

Images come either as a batch ``[N, ...]`` (one timestep per leading index) or packed in one flat
patch buffer ``[P, C]`` with ``offsets`` ``[N + 1]`` (image ``i`` owns rows
``offsets[i]:offsets[i + 1]``, like ``cu_seqlens``). Coefficients are the schedule's float32
tables whatever the data dtype, or, for float32 continuous times of a flow schedule, ``(1 - t, t)``
in float32 (``NoiseSchedule.coefficients``).

Seeded noise is a counter-based generator, Philox-4x32-10 (``tfkernels._philox``) keyed by the seed
and counted by the element's row-major index in the buffer, followed by Box-Muller. ``seeded_noise``
implements it in torch bit for bit up to the uniforms; the normals then differ from the Triton
kernels' only by the float32 rounding of ``log``, ``sqrt`` and ``cos`` (1-2 ulp on CPU, GPU
approximate instructions a few ulp).
"""

from __future__ import annotations

import math

import torch

from .._checks import autocast_off, check_choice, check_int
from .._philox import UINT32, UNIFORM_BITS, philox4x32
from ..schedule import TARGETS, NoiseSchedule, check_target, target_coefficients

__all__ = ["REDUCTIONS", "TARGETS", "NoiseSchedule", "add_noise", "diffusion_loss", "seeded_noise"]

REDUCTIONS = ("mean", "none")


def seeded_noise(seed: int, shape, device=None) -> torch.Tensor:
    """Standard normal float32 noise of ``shape``, a pure function of ``seed`` (an int in ``[0, 2**63)``,
    as the ops take) and element index.

    Element ``e`` (row-major index) draws Philox-4x32-10 with counter ``(e mod 2^32, e >> 32, 0, 0)``
    and key ``(seed mod 2^32, seed >> 32)``; words 0 and 1 give the uniforms
    ``u1 = (w0 >> 8) + 1) / 2^24`` in ``(0, 1]`` and ``u2 = (w1 >> 8) / 2^24``, then
    ``sqrt(-2 ln u1) cos(2π u2)`` (Box-Muller; tails are cut at 5.77σ).

    The generator is an opaque op to ``torch.compile``: Inductor takes many minutes over the 64-bit
    integer arithmetic of ten unrolled Philox rounds, and it runs eagerly anyway.
    """
    check_int("seed", seed, 0, 2**63 - 1)
    shape = tuple(shape)
    device = torch.device("cpu") if device is None else torch.device(device)
    return _seeded_noise_op(seed, math.prod(shape), device).reshape(shape)


@torch.library.custom_op("tfkernels::reference_seeded_noise", mutates_args=())
def _seeded_noise_op(seed: int, numel: int, device: torch.device) -> torch.Tensor:
    index = torch.arange(numel, device=device, dtype=torch.int64)
    zero = torch.zeros_like(index)
    w0, w1, _, _ = philox4x32(index & UINT32, index >> 32, zero, zero, seed & UINT32, (seed >> 32) & UINT32)
    shift = 32 - UNIFORM_BITS
    u1 = ((w0 >> shift) + 1).to(torch.float32) * 2.0**-UNIFORM_BITS
    u2 = (w1 >> shift).to(torch.float32) * 2.0**-UNIFORM_BITS
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(u2 * (2 * math.pi))


@_seeded_noise_op.register_fake
def _seeded_noise_fake(seed, numel, device):
    return torch.empty(numel, dtype=torch.float32, device=device)


def _per_row_image(t: torch.Tensor, x0: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """Image index of each leading row of x0: ``[N]`` in batch mode, ``[P]`` in packed mode."""
    if offsets is None:
        return torch.arange(t.shape[0], device=x0.device)
    sizes = (offsets[1:] - offsets[:-1]).to(torch.long)
    return torch.repeat_interleave(torch.arange(t.shape[0], device=x0.device), sizes, output_size=x0.shape[0])


def _noise_for(x0: torch.Tensor, noise, seed) -> torch.Tensor:
    if (noise is None) == (seed is None):
        raise ValueError("noise, seed: give exactly one of them")
    return seeded_noise(seed, x0.shape, x0.device) if noise is None else noise


def _broadcast_rows(per_row: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[R]`` -> ``[R, 1, ..., 1]`` to broadcast against ``like`` of shape ``[R, ...]``."""
    return per_row.reshape(per_row.shape + (1,) * (like.ndim - 1))


def add_noise(x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, noise=None, seed=None,
              offsets=None) -> torch.Tensor:
    """``x_t = a[t] * x0 + b[t] * noise`` per image, float32 coefficients; returns x0's dtype.

    Args:
        x0: ``[N, ...]`` with ``t`` ``[N]``, or a patch buffer ``[P, C]`` with ``offsets`` ``[N + 1]``.
        t: ``[N]``, one per image: int timesteps, or float32 times in ``[0, 1]`` with a flow schedule.
        noise: like x0; or ``seed``: int, noise from ``seeded_noise(seed, x0.shape)``.
    Arithmetic runs in float32, or float64 when x0 is float64, autocast or not (it is off inside).
    """
    with autocast_off(x0):
        return _add_noise(x0, t, schedule, noise, seed, offsets)


def _add_noise(x0, t, schedule, noise, seed, offsets):
    noise = _noise_for(x0, noise, seed)
    compute = torch.promote_types(x0.dtype, torch.float32)
    a, b = schedule.coefficients(t)
    rows = _per_row_image(t, x0, offsets)
    a, b = _broadcast_rows(a[rows], x0).to(compute), _broadcast_rows(b[rows], x0).to(compute)
    return (a * x0.to(compute) + b * noise.to(compute)).to(x0.dtype)


def diffusion_loss(pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
                   target: str = "eps", noise=None, seed=None, offsets=None, weights=None,
                   reduction: str = "mean") -> torch.Tensor:
    """Per-image mean squared error between ``pred`` and the ``target`` built from x0 and the noise.

    ``loss_i = weights[i] * mean_over_image_i((pred - target)^2)``; ``reduction="mean"`` returns the
    mean over images (0 when there are none), ``"none"`` the ``[N]`` per-image values. Float32
    (float64 when the inputs are float64), autocast or not (it is off inside); differentiable in
    every tensor argument. ``x0`` is ``[N, ...]`` (``[N]``: one element per image) or a packed
    buffer; an image of no elements has no mean: ``ValueError``.
    """
    target = check_target(target, schedule)
    check_choice("reduction", reduction, REDUCTIONS)
    if t.shape[0] and math.prod(x0.shape[1:]) == 0:
        raise ValueError(f"x0: expected images of at least one element (the loss is a mean over each image), "
                         f"got shape {tuple(x0.shape)}")
    with autocast_off(x0):
        return _diffusion_loss(pred, x0, t, schedule, target, noise, seed, offsets, weights, reduction)


def _diffusion_loss(pred, x0, t, schedule, target, noise, seed, offsets, weights, reduction):
    noise = _noise_for(x0, noise, seed)
    compute = torch.promote_types(torch.promote_types(pred.dtype, x0.dtype), torch.float32)
    a, b = schedule.coefficients(t)
    c_x0, c_noise = target_coefficients(target, a, b)
    rows = _per_row_image(t, x0, offsets)
    c_x0 = _broadcast_rows(c_x0[rows], x0).to(compute)
    c_noise = _broadcast_rows(c_noise[rows], x0).to(compute)
    x0, noise = x0.to(compute), noise.to(compute)
    # A target that does not read x0 (eps) or the noise (x0) must not see their NaNs or infinities
    # through a zero coefficient (0 * nan): the kernels never load them. The gradient stays 0.
    if target == "eps":
        x0 = x0.nan_to_num(0.0, 0.0, 0.0)
    if target == "x0":
        noise = noise.nan_to_num(0.0, 0.0, 0.0)
    goal = c_x0 * x0 + c_noise * noise
    elements_per_row = math.prod(x0.shape[1:])  # 1 for x0 [N]
    sq = (pred.to(compute) - goal).square().reshape(x0.shape[0], elements_per_row).sum(dim=1)  # [rows]
    num_images = t.shape[0]
    per_image_sum = torch.zeros(num_images, dtype=compute, device=pred.device).index_add(0, rows, sq)
    per_image_count = torch.zeros(num_images, dtype=compute, device=pred.device).index_add(
        0, rows, torch.full_like(sq, elements_per_row))
    loss = per_image_sum / per_image_count
    if weights is not None:
        loss = loss * weights.to(compute)
    if reduction == "none":
        return loss
    return loss.sum() / max(num_images, 1)
