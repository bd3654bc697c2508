"""Noise schedules and diffusion targets: ``NoiseSchedule`` (``tk.NoiseSchedule``), the target names
``TARGETS`` and each target's coefficients. Shared by the kernels (``tfkernels.diffusion``) and the
eager reference (``tfkernels.reference.diffusion``).

A schedule maps an integer timestep ``t`` in ``[0, T)`` to two float32 coefficients,

    x_t = signal_scale[t] * x0 + noise_scale[t] * noise,

kept as float32 tables whatever the data dtype: eager code that computes them in bfloat16 rounds
``alphas_cumprod`` to 1 for small ``t`` and leaves those images un-noised.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_choice, check_float, check_int, is_int_dtype

__all__ = ["KINDS", "MAX_TIMESTEPS", "TARGETS", "NoiseSchedule", "check_target", "target_coefficients"]

# What the model predicts; each target is c_x0 * x0 + c_noise * noise (see ``target_coefficients``).
TARGETS = ("eps", "v", "x0", "flow")
# The kinds of schedule: the two DDPM beta schedules and the rectified-flow path.
KINDS = ("cosine", "linear", "flow")
# The most timesteps a schedule has: far beyond any use (the paper's T is 1000), and small enough that
# the cosine table (a Python loop, for bit-equality with diffusers) builds in about a second.
MAX_TIMESTEPS = 2**20


def _check_table(name: str, table, like: torch.Tensor | None) -> None:
    """A coefficient table: float32 ``[T]`` (``1 <= T <= MAX_TIMESTEPS``), like ``like`` in length and
    device, every value finite and in ``[0, 1]`` (one host sync)."""
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"{name}: expected a float32 tensor [T], got {type(table).__name__}")
    if table.dtype != torch.float32:
        raise TypeError(f"{name}: expected a float32 tensor [T], got {table.dtype}")
    if table.ndim != 1 or not 1 <= table.shape[0] <= MAX_TIMESTEPS:
        raise ValueError(f"{name}: expected a float32 tensor [T] with 1 <= T <= {MAX_TIMESTEPS}, "
                         f"got shape {tuple(table.shape)}")
    if like is not None and (table.shape != like.shape or table.device != like.device):
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} on {like.device} (as signal_scale), "
                         f"got {tuple(table.shape)} on {table.device}")
    bad = ~((table >= 0) & (table <= 1))  # NaN fails both comparisons
    if bool(bad.any()):
        index = int(bad.int().argmax())
        raise ValueError(f"{name}: expected values in [0, 1], got {name}[{index}] = {table[index].item()}")


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
        """A schedule from its tables; the constructors below are the usual way to get one.

        Raises ``ValueError`` for an unknown ``kind``, tables of different lengths or devices,
        values outside ``[0, 1]`` or not finite, ``alphas_cumprod`` missing for a DDPM kind or
        given for ``"flow"``; ``TypeError`` for tables that are not float32 tensors.
        """
        check_choice("kind", kind, KINDS)
        _check_table("signal_scale", signal_scale, None)
        _check_table("noise_scale", noise_scale, signal_scale)
        if kind == "flow" and alphas_cumprod is not None:
            raise ValueError("alphas_cumprod: expected None for a 'flow' schedule (it has no ᾱ), got a tensor")
        if kind != "flow":
            if alphas_cumprod is None:
                raise ValueError(f"alphas_cumprod: expected a float32 tensor [T] for a {kind!r} schedule, got None")
            _check_table("alphas_cumprod", alphas_cumprod, signal_scale)
        self._set(kind, signal_scale, noise_scale, alphas_cumprod)

    def _set(self, kind, signal_scale, noise_scale, alphas_cumprod) -> None:
        self.kind = kind
        self.signal_scale = signal_scale
        self.noise_scale = noise_scale
        self.alphas_cumprod = alphas_cumprod
        self.num_timesteps = signal_scale.shape[0]

    @classmethod
    def _from_tables(cls, kind, signal_scale, noise_scale, alphas_cumprod=None) -> NoiseSchedule:
        """Tables valid by construction (the constructors', or a valid schedule's moved): no checks."""
        schedule = cls.__new__(cls)
        schedule._set(kind, signal_scale, noise_scale, alphas_cumprod)
        return schedule

    @classmethod
    def cosine(cls, T: int = 1000, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal's cosine schedule, the Transfusion paper's; equals diffusers'
        ``squaredcos_cap_v2``: betas from ``ᾱ(s) = cos²((s + 0.008) / 1.008 · π/2)`` clipped at
        ``max_beta`` (the last step is clipped), their float32 cumulative product.

        ``T``: an int in ``[1, MAX_TIMESTEPS]``; ``max_beta``: a float in ``(0, 1]``."""
        check_int("T", T, 1, MAX_TIMESTEPS)
        check_float("max_beta", max_beta, 0, 1, what="a float in (0, 1]")
        if max_beta == 0:  # every beta 0: nothing is ever noised
            raise ValueError(f"max_beta: expected a float in (0, 1], got {max_beta!r}")

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
        return cls._ddpm("cosine", torch.tensor(betas, dtype=torch.float32))

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """DDPM's linear betas (diffusers' ``linear``): float32 ``linspace(beta_start, beta_end, T)``.

        ``T``: an int in ``[1, MAX_TIMESTEPS]``; ``beta_start``, ``beta_end``: floats in ``[0, 1]``."""
        check_int("T", T, 1, MAX_TIMESTEPS)
        check_float("beta_start", beta_start, 0, 1)
        check_float("beta_end", beta_end, 0, 1)
        return cls._ddpm("linear", torch.linspace(beta_start, beta_end, T, dtype=torch.float32))

    @classmethod
    def rectified_flow(cls, T: int = 1000) -> NoiseSchedule:
        """Straight path ``x_t = (1 - s) x0 + s noise`` with ``s = (t + 1) / T``; ``T`` in ``[1, MAX_TIMESTEPS]``."""
        check_int("T", T, 1, MAX_TIMESTEPS)
        s = torch.arange(1, T + 1, dtype=torch.float64) / T
        return cls._from_tables("flow", (1 - s).to(torch.float32), s.to(torch.float32))

    @classmethod
    def _ddpm(cls, kind: str, betas: torch.Tensor) -> NoiseSchedule:
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float32, as diffusers does
        # The square roots are taken in float64 and rounded once to float32.
        acp = alphas_cumprod.double()
        return cls._from_tables(kind, acp.sqrt().float(), (1 - acp).sqrt().float(), alphas_cumprod)

    def to(self, device) -> NoiseSchedule:
        """The same schedule with its tables on ``device`` (a torch.device, a str or an int)."""
        device = _as_device(device)
        alphas_cumprod = None if self.alphas_cumprod is None else self.alphas_cumprod.to(device)
        return NoiseSchedule._from_tables(self.kind, self.signal_scale.to(device), self.noise_scale.to(device),
                                          alphas_cumprod)

    @property
    def device(self) -> torch.device:
        return self.signal_scale.device

    def coefficients(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` float32, shaped like ``t``, with ``x_t = a * x0 + b * noise``."""
        if not isinstance(t, torch.Tensor):
            try:
                t = torch.as_tensor(t, device=self.device)
            except (TypeError, ValueError, RuntimeError):  # None, a str, a ragged list...
                raise TypeError(f"t: expected integer timesteps (an int, a list of ints or an int tensor), "
                                f"got {type(t).__name__}") from None
        if not is_int_dtype(t.dtype):
            raise TypeError(f"t: expected integer timesteps, got {t.dtype}")
        # Under torch.compile the values are not read (no host sync in a graph): tk's ops check them
        # in an op of their own at run time, and an index out of the tables is torch's IndexError.
        if t.numel() and not torch.compiler.is_compiling() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"t: expected values in [0, {self.num_timesteps - 1}], got "
                             f"min {int(t.min())}, max {int(t.max())}")
        index = t.to(self.device, torch.long)
        return self.signal_scale[index].to(t.device), self.noise_scale[index].to(t.device)

    def sample_timesteps(self, n: int, t_max=None, generator: torch.Generator | None = None,
                         device=None) -> torch.Tensor:
        """``n`` timesteps, int64, each uniform in ``[0, t_max]``.

        ``t_max`` is an int or a per-image int tensor ``[n]`` (the paper caps noise at ``t <= 500``
        for an image that precedes its caption); default ``T - 1``. ``generator``: a
        ``torch.Generator`` or None; ``device``: where the timesteps go (default: ``t_max``'s, the
        generator's, or the schedule's device).
        """
        check_int("n", n, 0, 2**31 - 1)  # one timestep per image: the kernels' grid holds 2**31 - 1 images
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if device is not None:
            device = _as_device(device)
            if generator is not None and generator.device.type != device.type:
                raise ValueError(f"device: expected the generator's device type {generator.device.type!r}, "
                                 f"got {device}")
        last = self.num_timesteps - 1
        if t_max is None:
            t_max = last
        if isinstance(t_max, torch.Tensor):
            if not is_int_dtype(t_max.dtype):
                raise TypeError(f"t_max: expected an int tensor [{n}], got {t_max.dtype}")
            if t_max.shape != (n,):
                raise ValueError(f"t_max: expected an int tensor [{n}], got shape {tuple(t_max.shape)}")
            device = t_max.device if device is None else device
            if n and (int(t_max.min()) < 0 or int(t_max.max()) > last):
                raise ValueError(f"t_max: expected values in [0, {last}], got min {int(t_max.min())}, "
                                 f"max {int(t_max.max())}")
            upper = t_max.to(device, torch.float64)
        else:
            upper = float(check_int("t_max", t_max, 0, last))
        if device is None:
            device = generator.device if generator is not None else self.device
        # float64 uniforms: u * (t_max + 1) < t_max + 1 holds after rounding, unlike float32 at T ~ 1000.
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return torch.floor(u * (upper + 1)).long()

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, num_timesteps={self.num_timesteps}, device={self.device})"


def _as_device(device) -> torch.device:
    """``torch.device(device)`` for a str, an int or a torch.device: ``TypeError`` for other types,
    ``ValueError`` for a bad name or index."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device: expected a torch.device, a str or an int, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device: expected a device, got {device!r} ({error})") from None


def target_coefficients(target: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_x0, c_noise)`` with ``target = c_x0 * x0 + c_noise * noise`` for coefficients ``a, b``.

    eps: the noise. x0: the clean data. v: ``a * noise - b * x0`` (Salimans & Ho). flow: the
    velocity ``d x_t / d s = noise - x0`` of the rectified-flow path.
    """
    ones, zeros = torch.ones_like(a), torch.zeros_like(a)
    coefficients = {"eps": (zeros, ones), "x0": (ones, zeros), "v": (-b, a), "flow": (-ones, ones)}
    return coefficients[check_choice("target", target, TARGETS)]


def check_target(target: str, schedule: NoiseSchedule) -> str:
    """``target`` if it is one of ``TARGETS`` that ``schedule`` supports: the flow velocity is the
    derivative of the straight path only, so it needs a flow schedule."""
    check_choice("target", target, TARGETS)
    if target == "flow" and schedule.kind != "flow":
        raise ValueError(f"target: 'flow' needs NoiseSchedule.rectified_flow(), got a {schedule.kind!r} schedule")
    return target
