"""Noise schedules, forward noising and the diffusion loss, eagerly: the semantics the kernels match.

A schedule maps an integer timestep ``t`` in ``[0, T)`` to two float32 coefficients,

    x_t = signal_scale[t] * x0 + noise_scale[t] * noise,

kept as float32 tables whatever the data dtype: eager code that computes them in bfloat16 rounds
``alphas_cumprod`` to 1 for small ``t`` and leaves those images un-noised.

Images come either as a batch ``[N, ...]`` (one timestep per leading index) or packed in one flat
patch buffer ``[P, C]`` with ``offsets`` ``[N + 1]`` (image ``i`` owns rows
``offsets[i]:offsets[i + 1]``, like ``cu_seqlens``).

Seeded noise is a counter-based generator, Philox-4x32-10 keyed by the seed and counted by the
element's row-major index in the buffer, followed by Box-Muller. ``seeded_noise`` implements it in
torch bit for bit up to the uniforms; the normals then differ from the Triton kernels' only by the
float32 rounding of ``log``, ``sqrt`` and ``cos`` (1-2 ulp on CPU, GPU approximate instructions a
few ulp).
"""

from __future__ import annotations

import math

import torch

__all__ = ["NoiseSchedule", "TARGETS", "add_noise", "diffusion_loss", "seeded_noise"]

# What the model predicts; each target is c_x0 * x0 + c_noise * noise (see ``target_coefficients``).
TARGETS = ("eps", "v", "x0", "flow")

# Philox-4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
_UINT32 = 0xFFFFFFFF
# Uniforms keep the top 24 bits of a 32-bit draw: exactly representable in float32.
UNIFORM_BITS = 24


class NoiseSchedule:
    """Coefficients of the forward process at each integer timestep ``t in [0, T)``.

    Attributes:
        kind: ``"cosine"``, ``"linear"`` or ``"flow"``.
        num_timesteps: ``T``.
        alphas_cumprod: float32 ``[T]`` (``ᾱ_t``) for the DDPM kinds, ``None`` for flow.
        signal_scale, noise_scale: float32 ``[T]``, ``x_t = signal_scale[t] * x0 +
            noise_scale[t] * noise``. DDPM: ``sqrt(ᾱ_t)``, ``sqrt(1 - ᾱ_t)``. Flow:
            ``1 - s``, ``s`` with ``s = (t + 1) / T``, so ``t = T - 1`` is pure noise and ``t = 0``
            the least noisy level, indexed like DDPM's timesteps.
    """

    def __init__(self, kind: str, signal_scale: torch.Tensor, noise_scale: torch.Tensor,
                 alphas_cumprod: torch.Tensor | None = None):
        self.kind = kind
        self.signal_scale = signal_scale
        self.noise_scale = noise_scale
        self.alphas_cumprod = alphas_cumprod
        self.num_timesteps = signal_scale.shape[0]

    @classmethod
    def cosine(cls, T: int = 1000, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal's cosine schedule, the Transfusion paper's; equals diffusers'
        ``squaredcos_cap_v2``: betas from ``ᾱ(s) = cos²((s + 0.008) / 1.008 · π/2)`` clipped at
        ``max_beta`` (the last step is clipped), their float32 cumulative product."""
        _check_timesteps(T)

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
        return cls._ddpm("cosine", torch.tensor(betas, dtype=torch.float32))

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """DDPM's linear betas (diffusers' ``linear``): float32 ``linspace(beta_start, beta_end, T)``."""
        _check_timesteps(T)
        return cls._ddpm("linear", torch.linspace(beta_start, beta_end, T, dtype=torch.float32))

    @classmethod
    def rectified_flow(cls, T: int = 1000) -> NoiseSchedule:
        """Straight path ``x_t = (1 - s) x0 + s noise`` with ``s = (t + 1) / T``."""
        _check_timesteps(T)
        s = torch.arange(1, T + 1, dtype=torch.float64) / T
        return cls("flow", (1 - s).to(torch.float32), s.to(torch.float32))

    @classmethod
    def _ddpm(cls, kind: str, betas: torch.Tensor) -> NoiseSchedule:
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float32, as diffusers does
        # The square roots are taken in float64 and rounded once to float32.
        acp = alphas_cumprod.double()
        return cls(kind, acp.sqrt().float(), (1 - acp).sqrt().float(), alphas_cumprod)

    def to(self, device) -> NoiseSchedule:
        """The same schedule with its tables on ``device``."""
        alphas_cumprod = None if self.alphas_cumprod is None else self.alphas_cumprod.to(device)
        return NoiseSchedule(self.kind, self.signal_scale.to(device), self.noise_scale.to(device), alphas_cumprod)

    @property
    def device(self) -> torch.device:
        return self.signal_scale.device

    def coefficients(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` float32, shaped like ``t``, with ``x_t = a * x0 + b * noise``."""
        t = torch.as_tensor(t, device=self.device if not isinstance(t, torch.Tensor) else t.device)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"t: expected integer timesteps, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"t: expected values in [0, {self.num_timesteps - 1}], got "
                             f"min {int(t.min())}, max {int(t.max())}")
        index = t.to(self.device, torch.long)
        return self.signal_scale[index].to(t.device), self.noise_scale[index].to(t.device)

    def sample_timesteps(self, n: int, t_max=None, generator: torch.Generator | None = None,
                         device=None) -> torch.Tensor:
        """``n`` timesteps, int64, each uniform in ``[0, t_max]``.

        ``t_max`` is an int or a per-image int tensor ``[n]`` (the paper caps noise at ``t <= 500``
        for an image that precedes its caption); default ``T - 1``.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected an int >= 0, got {n!r}")
        last = self.num_timesteps - 1
        if t_max is None:
            t_max = last
        if isinstance(t_max, torch.Tensor):
            if t_max.shape != (n,) or t_max.dtype.is_floating_point or t_max.dtype == torch.bool:
                raise ValueError(f"t_max: expected an int tensor [{n}], got {t_max.dtype} {tuple(t_max.shape)}")
            device = t_max.device if device is None else torch.device(device)
            if n and (int(t_max.min()) < 0 or int(t_max.max()) > last):
                raise ValueError(f"t_max: expected values in [0, {last}], got min {int(t_max.min())}, "
                                 f"max {int(t_max.max())}")
            upper = t_max.to(device, torch.float64)
        else:
            if isinstance(t_max, bool) or not isinstance(t_max, int) or not 0 <= t_max <= last:
                raise ValueError(f"t_max: expected an int in [0, {last}] or an int tensor [n], got {t_max!r}")
            upper = float(t_max)
        if device is None:
            device = generator.device if generator is not None else self.device
        # float64 uniforms: u * (t_max + 1) < t_max + 1 holds after rounding, unlike float32 at T ~ 1000.
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return torch.floor(u * (upper + 1)).long()

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, num_timesteps={self.num_timesteps}, device={self.device})"


def _check_timesteps(T) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T: expected an int >= 1, got {T!r}")


def target_coefficients(target: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_x0, c_noise)`` with ``target = c_x0 * x0 + c_noise * noise`` for coefficients ``a, b``.

    eps: the noise. x0: the clean data. v: ``a * noise - b * x0`` (Salimans & Ho). flow: the
    velocity ``d x_t / d s = noise - x0`` of the rectified-flow path.
    """
    ones, zeros = torch.ones_like(a), torch.zeros_like(a)
    if target == "eps":
        return zeros, ones
    if target == "x0":
        return ones, zeros
    if target == "v":
        return -b, a
    if target == "flow":
        return -ones, ones
    raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")


def check_target(target: str, schedule: NoiseSchedule) -> None:
    """The flow velocity is the derivative of the straight path only: it needs a flow schedule."""
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
    if target == "flow" and schedule.kind != "flow":
        raise ValueError(f"target: 'flow' needs NoiseSchedule.rectified_flow(), got a {schedule.kind!r} schedule")


def _mul_hi_lo(constant: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``constant * x`` for uint32 values held in int64, without overflow."""
    c_hi, c_lo = constant >> 16, constant & 0xFFFF
    p_lo = x * c_lo  # < 2^48
    p_hi = x * c_hi  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & _UINT32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox-4x32-10 on uint32 counters held in int64 tensors; returns the four output words."""
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mul_hi_lo(PHILOX_ROUND_A, c0)
        hi1, lo1 = _mul_hi_lo(PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_KEY_A) & _UINT32
        k1 = (k1 + PHILOX_KEY_B) & _UINT32
    return c0, c1, c2, c3


def seeded_noise(seed: int, shape, device=None) -> torch.Tensor:
    """Standard normal float32 noise of ``shape``, a pure function of ``seed`` and element index.

    Element ``e`` (row-major index) draws Philox-4x32-10 with counter ``(e mod 2^32, e >> 32, 0, 0)``
    and key ``(seed mod 2^32, seed >> 32)``; words 0 and 1 give the uniforms
    ``u1 = (w0 >> 8) + 1) / 2^24`` in ``(0, 1]`` and ``u2 = (w1 >> 8) / 2^24``, then
    ``sqrt(-2 ln u1) cos(2π u2)`` (Box-Muller; tails are cut at 5.77σ).
    """
    shape = tuple(shape)
    index = torch.arange(math.prod(shape), device=device, dtype=torch.int64)
    zero = torch.zeros_like(index)
    w0, w1, _, _ = philox4x32(index & _UINT32, index >> 32, zero, zero, seed & _UINT32, (seed >> 32) & _UINT32)
    shift = 32 - UNIFORM_BITS
    u1 = ((w0 >> shift) + 1).to(torch.float32) * 2.0**-UNIFORM_BITS
    u2 = (w1 >> shift).to(torch.float32) * 2.0**-UNIFORM_BITS
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(u2 * (2 * math.pi))).reshape(shape)


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
        t: int ``[N]``, one timestep per image.
        noise: like x0; or ``seed``: int, noise from ``seeded_noise(seed, x0.shape)``.
    Arithmetic runs in float32, or float64 when x0 is float64.
    """
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
    (float64 when the inputs are float64); differentiable in every tensor argument.
    """
    check_target(target, schedule)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")
    noise = _noise_for(x0, noise, seed)
    compute = torch.promote_types(torch.promote_types(pred.dtype, x0.dtype), torch.float32)
    a, b = schedule.coefficients(t)
    c_x0, c_noise = target_coefficients(target, a, b)
    rows = _per_row_image(t, x0, offsets)
    c_x0 = _broadcast_rows(c_x0[rows], x0).to(compute)
    c_noise = _broadcast_rows(c_noise[rows], x0).to(compute)
    goal = c_x0 * x0.to(compute) + c_noise * noise.to(compute)
    sq = (pred.to(compute) - goal).square().flatten(1).sum(dim=1)  # [rows] (flatten: rows may be 0)
    num_images = t.shape[0]
    per_image_sum = torch.zeros(num_images, dtype=compute, device=pred.device).index_add(0, rows, sq)
    elements_per_row = math.prod(x0.shape[1:])
    per_image_count = torch.zeros(num_images, dtype=compute, device=pred.device).index_add(
        0, rows, torch.full_like(sq, elements_per_row))
    loss = per_image_sum / per_image_count
    if weights is not None:
        loss = loss * weights.to(compute)
    if reduction == "none":
        return loss
    return loss.sum() / max(num_images, 1)
