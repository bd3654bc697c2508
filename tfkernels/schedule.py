"""Noise schedules and diffusion targets: ``NoiseSchedule`` (``tk.NoiseSchedule``), the target names
``TARGETS`` (and diffusers' names for them, ``TARGET_ALIASES``) and each target's coefficients; the
distributions of continuous flow times (``flow_time_cdf``, ``flow_time_quantile``). Shared by the
kernels (``tfkernels.diffusion``) and the eager reference (``tfkernels.reference.diffusion``).

A schedule maps an integer timestep ``t`` in ``[0, T)`` to two float32 coefficients,

    x_t = signal_scale[t] * x0 + noise_scale[t] * noise,

kept as float32 tables whatever the data dtype: eager code that computes them in bfloat16 rounds
``alphas_cumprod`` to 1 for small ``t`` and leaves those images un-noised.

A flow schedule (``NoiseSchedule.rectified_flow()``) also takes continuous times: a float32 ``t`` in
``[0, 1]`` gives ``(a, b) = (1 - t, t)``, computed in float32 from ``t`` (no table), so that
``x_t = (1 - t) x0 + t noise``: ``t = 0`` is the clean image, ``t = 1`` pure noise (the convention
of SD3, lucidrains' transfusion-pytorch uses the opposite direction: ``t -> 1 - t``). Integer
timesteps keep their meaning, the grid ``s = (t + 1) / T``.

Continuous times are drawn by ``sample_timesteps(n, distribution=...)``: ``"uniform"`` or
``"logit_normal"`` (``t = sigmoid(mean + std * z)``, Esser et al. 2024, SD3), then the
resolution-dependent shift ``t' = shift * t / (1 + (shift - 1) * t)`` (SD3's; ``shift > 1`` noisier).
Sampling goes through the closed-form inverse CDF (``flow_time_quantile``), so a per-image cap
``t <= t_max`` draws from the distribution truncated at the cap, not clamped onto it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ._checks import check_choice, check_float, check_int, is_int_dtype

__all__ = ["DIFFUSERS_BETA_SCHEDULES", "KINDS", "MAX_TIMESTEPS", "TARGETS", "TARGET_ALIASES", "TIME_DISTRIBUTIONS",
           "NoiseSchedule", "canonical_target", "check_target", "flow_time_cdf", "flow_time_quantile",
           "target_coefficients"]

# What the model predicts; each target is c_x0 * x0 + c_noise * noise (see ``target_coefficients``).
TARGETS = ("eps", "v", "x0", "flow")
# diffusers' ``prediction_type`` names, accepted wherever a target is: a scheduler config's value
# can be passed on as it is.
TARGET_ALIASES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# The kinds of schedule: the DDPM beta schedules and the rectified-flow path.
KINDS = ("cosine", "linear", "scaled_linear", "flow")
# diffusers' ``beta_schedule`` names that ``NoiseSchedule.from_diffusers`` builds, and our kind for each.
DIFFUSERS_BETA_SCHEDULES = {"squaredcos_cap_v2": "cosine", "linear": "linear", "scaled_linear": "scaled_linear"}
# How continuous flow times are distributed before the shift (``sample_timesteps``).
TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
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
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> NoiseSchedule:
        """Latent diffusion's betas (diffusers' ``scaled_linear``): float32
        ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``; the defaults are Stable Diffusion's.

        ``T``: an int in ``[1, MAX_TIMESTEPS]``; ``beta_start``, ``beta_end``: floats in ``[0, 1]``."""
        check_int("T", T, 1, MAX_TIMESTEPS)
        check_float("beta_start", beta_start, 0, 1)
        check_float("beta_end", beta_end, 0, 1)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
        return cls._ddpm("scaled_linear", betas)

    @classmethod
    def from_diffusers(cls, scheduler_config) -> NoiseSchedule:
        """The schedule of a diffusers DDPM-family scheduler, with its float32 ``alphas_cumprod`` table
        bit for bit (``DDPMScheduler``, ``DDIMScheduler``, ... share it).

        ``scheduler_config``: a scheduler's ``config`` (a dict such as a ``scheduler_config.json``'s
        contents) or the scheduler itself. Read: ``num_train_timesteps`` (1000), ``beta_schedule``
        (``"linear"``; also ``"scaled_linear"`` and ``"squaredcos_cap_v2"``, our ``cosine``),
        ``beta_start`` (0.0001), ``beta_end`` (0.02) and ``rescale_betas_zero_snr`` (False; True
        rescales the betas to a zero terminal SNR, Lin et al. 2024, as diffusers does), with
        diffusers' defaults in brackets. ``prediction_type`` and ``timestep_spacing`` are not part of
        the schedule: pass them on as ``target=`` (diffusers' names are accepted) and to the sampler.
        ``trained_betas``, other beta schedules and flow-matching schedulers (``FlowMatch*``, whose config
        has a ``shift`` and no ``beta_schedule``: use ``rectified_flow()`` and ``sample_timesteps(...,
        shift=)``) raise ``ValueError``.
        """
        config = getattr(scheduler_config, "config", scheduler_config)
        if not isinstance(config, Mapping):
            raise TypeError(f"scheduler_config: expected a diffusers scheduler or its config (a dict), "
                            f"got {type(scheduler_config).__name__}")
        # A json config names its class; a scheduler object is its class.
        class_name = config.get("_class_name") or ("" if scheduler_config is config else
                                                   type(scheduler_config).__name__)
        if "FlowMatch" in str(class_name) or ("shift" in config and "beta_schedule" not in config):
            # Without this the missing beta_schedule would default to diffusers' "linear": a DDPM table.
            named = f" ({class_name})" if class_name else ""
            raise ValueError(f"scheduler_config: a flow-matching scheduler{named} has no beta table: use "
                             f"NoiseSchedule.rectified_flow() with float32 times (sample_timesteps(n, "
                             f"distribution=..., shift={config.get('shift', 1.0)!r}))")
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler_config: trained_betas: expected None (build NoiseSchedule(kind, signal_scale, "
                             "noise_scale, alphas_cumprod) from trained betas), got a table")
        T = config.get("num_train_timesteps", 1000)
        check_int("scheduler_config['num_train_timesteps']", T, 1, MAX_TIMESTEPS)
        beta_schedule = config.get("beta_schedule", "linear")
        check_choice("scheduler_config['beta_schedule']", beta_schedule, tuple(DIFFUSERS_BETA_SCHEDULES))
        kind = DIFFUSERS_BETA_SCHEDULES[beta_schedule]
        if kind == "cosine":
            schedule = cls.cosine(T)
        else:
            beta_start = check_float("scheduler_config['beta_start']", config.get("beta_start", 0.0001), 0, 1)
            beta_end = check_float("scheduler_config['beta_end']", config.get("beta_end", 0.02), 0, 1)
            schedule = getattr(cls, kind)(T, beta_start, beta_end)
        rescale = config.get("rescale_betas_zero_snr", False)
        if not isinstance(rescale, bool):
            raise TypeError(f"scheduler_config['rescale_betas_zero_snr']: expected a bool, got {rescale!r}")
        if rescale:
            if T < 2:  # the rescaling maps the first and last step apart: it needs two
                raise ValueError(f"scheduler_config['num_train_timesteps']: expected at least 2 with "
                                 f"rescale_betas_zero_snr, got {T}")
            schedule = cls._ddpm(kind, _rescale_zero_terminal_snr(schedule.alphas_cumprod))
        return schedule

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
        """``(a, b)`` float32, shaped like ``t``, with ``x_t = a * x0 + b * noise``.

        ``t``: integer timesteps in ``[0, T)`` (an int, a list or an int tensor), table lookups; or,
        for a flow schedule, a float32 tensor of continuous times in ``[0, 1]``: ``(1 - t, t)``
        computed in float32. Float times need a flow schedule and float32 (a float64 ``t`` would
        round differently from the kernels, a bfloat16 one is too coarse): ``TypeError`` otherwise.
        """
        if not isinstance(t, torch.Tensor):
            try:
                t = torch.as_tensor(t, device=self.device)
            except (TypeError, ValueError, RuntimeError):  # None, a str, a ragged list...
                raise TypeError(f"t: expected integer timesteps (an int, a list of ints or an int tensor), "
                                f"got {type(t).__name__}") from None
            if t.dtype.is_floating_point:  # a Python float: continuous time is a float32 tensor
                raise TypeError(f"t: expected integer timesteps or a float32 tensor of times in [0, 1], got {t.dtype}")
        if t.dtype.is_floating_point:
            self.check_times(t)
            # Under torch.compile the values are not read (no host sync in a graph): tk's ops check them
            # in an op of their own at run time.
            if t.numel() and not torch.compiler.is_compiling():
                bad = ~((t >= 0) & (t <= 1))  # NaN fails both comparisons
                if bool(bad.any()):
                    index = int(bad.flatten().int().argmax())
                    raise ValueError(f"t: expected times in [0, 1], got t[{index}] = {t.flatten()[index].item()}")
            return 1 - t, t.clone()
        if not is_int_dtype(t.dtype):
            raise TypeError(f"t: expected integer timesteps, got {t.dtype}")
        # Under torch.compile the values are not read (no host sync in a graph): tk's ops check them
        # in an op of their own at run time, and an index out of the tables is torch's IndexError.
        if t.numel() and not torch.compiler.is_compiling() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"t: expected values in [0, {self.num_timesteps - 1}], got "
                             f"min {int(t.min())}, max {int(t.max())}")
        index = t.to(self.device, torch.long)
        return self.signal_scale[index].to(t.device), self.noise_scale[index].to(t.device)

    def check_times(self, t: torch.Tensor) -> None:
        """The type rule of a float ``t`` (values are checked where they are read): float32, and a
        flow schedule, ``TypeError`` otherwise."""
        if t.dtype != torch.float32:
            raise TypeError(f"t: expected integer timesteps or float32 times in [0, 1], got {t.dtype}")
        if self.kind != "flow":
            raise TypeError(f"t: expected integer timesteps for a {self.kind!r} schedule (float32 times in [0, 1] "
                            f"need NoiseSchedule.rectified_flow()), got {t.dtype}")

    def sample_timesteps(self, n: int, t_max=None, generator: torch.Generator | None = None, device=None, *,
                         distribution: str | None = None, mean: float = 0.0, std: float = 1.0,
                         shift: float = 1.0) -> torch.Tensor:
        """``n`` timesteps: int64, each uniform in ``[0, t_max]``; or, with ``distribution``, float32
        continuous times in ``[0, 1]`` for a flow schedule.

        ``t_max`` is an int or a per-image int tensor ``[n]`` (the paper caps noise at ``t <= 500``
        for an image that precedes its caption); default ``T - 1``. ``generator``: a
        ``torch.Generator`` or None; ``device``: where the timesteps go (default: ``t_max``'s, the
        generator's, or the schedule's device).

        Continuous times (``distribution`` ``"uniform"`` or ``"logit_normal"``, flow schedules only):
        ``t = flow_time_quantile(u, ...)`` for ``u`` uniform in ``[0, flow_time_cdf(t_max))``, i.e.
        the distribution (``mean`` and ``std`` of the logit-normal's normal, then ``shift``)
        conditioned on ``t <= t_max``. ``t_max``: a float in ``[0, 1]`` or a per-image float tensor
        ``[n]``; default 1. Drawn in float64, rounded once to float32.
        """
        check_int("n", n, 0, 2**31 - 1)  # one timestep per image: the kernels' grid holds 2**31 - 1 images
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if device is not None:
            device = _as_device(device)
            if generator is not None and generator.device.type != device.type:
                raise ValueError(f"device: expected the generator's device type {generator.device.type!r}, "
                                 f"got {device}")
        if distribution is not None:
            return self._sample_times(n, t_max, generator, device, distribution, mean, std, shift)
        if (mean, std, shift) != (0.0, 1.0, 1.0):
            raise ValueError(f"mean, std, shift: expected their defaults for integer timesteps (they shape continuous "
                             f"times: pass distribution=), got {mean!r}, {std!r}, {shift!r}")
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

    def _sample_times(self, n, t_max, generator, device, distribution, mean, std, shift) -> torch.Tensor:
        """``sample_timesteps``' continuous times (its arguments checked but for these)."""
        if self.kind != "flow":
            raise ValueError(f"distribution: continuous times need a flow schedule (NoiseSchedule.rectified_flow()), "
                             f"got a {self.kind!r} schedule")
        _check_time_distribution(distribution, mean, std, shift)
        if t_max is None:
            t_max = 1.0
        if isinstance(t_max, torch.Tensor):
            if not t_max.dtype.is_floating_point:
                raise TypeError(f"t_max: expected a float in [0, 1] or a float tensor [{n}] for continuous times, "
                                f"got {t_max.dtype}")
            if t_max.shape != (n,):
                raise ValueError(f"t_max: expected a float tensor [{n}], got shape {tuple(t_max.shape)}")
            device = t_max.device if device is None else device
            bad = ~((t_max >= 0) & (t_max <= 1))
            if bool(bad.any()):
                index = int(bad.int().argmax())
                raise ValueError(f"t_max: expected values in [0, 1], got t_max[{index}] = {t_max[index].item()}")
            upper = t_max.to(device, torch.float64)
        else:
            upper = torch.tensor(check_float("t_max", t_max, 0, 1), dtype=torch.float64)
        if device is None:
            device = generator.device if generator is not None else self.device
        upper = upper.to(device)
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        cap = flow_time_cdf(upper, distribution, mean, std, shift)
        # The quantile of the cap's CDF can exceed the cap by a float64 rounding: clamped back.
        t = torch.minimum(flow_time_quantile(u * cap, distribution, mean, std, shift), upper)
        # Rounding to float32 can lift a time just under a cap that float32 cannot hold (0.2) above it:
        # such a time takes the float32 value below instead.
        rounded = t.to(torch.float32)
        return torch.where(rounded.double() > upper, torch.nextafter(rounded, torch.zeros_like(rounded)), rounded)

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, num_timesteps={self.num_timesteps}, device={self.device})"


def _rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Betas whose cumulative product reaches 0 at the last step, the first kept (Lin et al., "Common
    diffusion noise schedules and sample steps are flawed", 2024, Algorithm 1), in float32 with
    diffusers' order of operations, so the table is diffusers' bit for bit."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    squared = root**2
    return 1 - torch.cat([squared[:1], squared[1:] / squared[:-1]])


def _as_device(device) -> torch.device:
    """``torch.device(device)`` for a str, an int or a torch.device: ``TypeError`` for other types,
    ``ValueError`` for a bad name or index."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device: expected a torch.device, a str or an int, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device: expected a device, got {device!r} ({error})") from None


def canonical_target(target: str) -> str:
    """``target``, one of ``TARGETS`` or a diffusers name for one (``TARGET_ALIASES``), as ``TARGETS`` names it."""
    check_choice("target", target, TARGETS + tuple(TARGET_ALIASES))
    return TARGET_ALIASES.get(target, target)


def target_coefficients(target: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_x0, c_noise)`` with ``target = c_x0 * x0 + c_noise * noise`` for coefficients ``a, b``.

    eps: the noise. x0: the clean data. v: ``a * noise - b * x0`` (Salimans & Ho). flow: the
    velocity ``d x_t / d s = noise - x0`` of the rectified-flow path. diffusers' names
    (``TARGET_ALIASES``) are accepted.
    """
    ones, zeros = torch.ones_like(a), torch.zeros_like(a)
    coefficients = {"eps": (zeros, ones), "x0": (ones, zeros), "v": (-b, a), "flow": (-ones, ones)}
    return coefficients[canonical_target(target)]


def check_target(target: str, schedule: NoiseSchedule) -> str:
    """``target`` as ``TARGETS`` names it (diffusers' names accepted), if ``schedule`` supports it: the
    flow velocity is the derivative of the straight path only, so it needs a flow schedule."""
    target = canonical_target(target)
    if target == "flow" and schedule.kind != "flow":
        raise ValueError(f"target: 'flow' needs NoiseSchedule.rectified_flow(), got a {schedule.kind!r} schedule")
    return target


# ----------------------------------------------------------------------------------------------
# Continuous flow times
# ----------------------------------------------------------------------------------------------
def _check_time_distribution(distribution: str, mean, std, shift) -> None:
    check_choice("distribution", distribution, TIME_DISTRIBUTIONS)
    check_float("mean", mean)
    if check_float("std", std, what="a finite float > 0") <= 0:
        raise ValueError(f"std: expected a finite float > 0, got {std!r}")
    if check_float("shift", shift, what="a finite float > 0") <= 0:
        raise ValueError(f"shift: expected a finite float > 0, got {shift!r}")
    if distribution == "uniform" and (mean, std) != (0.0, 1.0):
        raise ValueError(f"mean, std: expected their defaults with distribution='uniform' (they shape "
                         f"'logit_normal'), got {mean!r}, {std!r}")


def flow_time_cdf(t: torch.Tensor, distribution: str = "uniform", mean: float = 0.0, std: float = 1.0,
                  shift: float = 1.0) -> torch.Tensor:
    """``P(T <= t)`` for the flow times of ``sample_timesteps``, elementwise over a float tensor ``t`` in
    ``[0, 1]`` (computed in ``t``'s dtype: pass float64 for tests).

    With ``u = t / (shift - (shift - 1) t)`` (the shift undone): uniform ``u``; logit-normal
    ``Phi((logit(u) - mean) / std)``.
    """
    _check_time_distribution(distribution, mean, std, shift)
    unshifted = t / (shift - (shift - 1) * t)
    if distribution == "uniform":
        return unshifted.clamp(0, 1)
    return torch.special.ndtr((torch.logit(unshifted) - mean) / std)


def flow_time_quantile(u: torch.Tensor, distribution: str = "uniform", mean: float = 0.0, std: float = 1.0,
                       shift: float = 1.0) -> torch.Tensor:
    """The inverse of ``flow_time_cdf``: the time ``t`` with ``P(T <= t) = u``, elementwise over ``u`` in
    ``[0, 1]``: ``sigmoid(mean + std * Phi^-1(u))`` (logit-normal) or ``u`` (uniform), then shifted,
    ``shift * t / (1 + (shift - 1) * t)``. Maps 0 to 0 and 1 to 1."""
    _check_time_distribution(distribution, mean, std, shift)
    t = u if distribution == "uniform" else torch.sigmoid(mean + std * torch.special.ndtri(u))
    return shift * t / (1 + (shift - 1) * t)
