"""The model's configuration: ``TransfusionConfig`` and the constants it is checked against.

Also ``is_int`` (tfkernels' own int check, re-exported for the package), ``noise_schedule(config)``, the
``tk.NoiseSchedule`` a config names (the packer samples timesteps from it, the model noises with it),
and ``continuous_times``, how a continuous-time (flow) model reads the packer's integer draws.
Imports nothing from the rest of ``transfusion_core``.

Diffusion modes (``noise_schedule``): the DDPM kinds (``"cosine"``, the paper's, ``"linear"``,
``"scaled_linear"``) and ``"rectified_flow"`` index ``num_timesteps`` integer steps; ``"flow"`` is
continuous-time rectified flow, ``x_t = (1 - t) x0 + t noise`` for float ``t`` in ``[0, 1]``, with
``flow_time_*`` and ``flow_shift`` saying how training draws ``t`` (and the shift generation uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import tfkernels as tk
from tfkernels._checks import check_choice, check_float, check_int, is_int
from tfkernels.schedule import MAX_TIMESTEPS, TARGET_ALIASES, TIME_DISTRIBUTIONS, canonical_target, flow_time_quantile
from tfkernels.schedule import TARGETS as DIFFUSION_TARGETS

IGNORE_INDEX = -100  # target of a position with no next-token target (PackedBatch.targets)
MAX_SIZE = 2**31 - 1  # every size of the model fits int32, the kernels' index type
IMAGE_ENCODERS = ("linear", "unet")
NOISE_SCHEDULES = ("cosine", "linear", "scaled_linear", "rectified_flow", "flow")
# Defaults of the continuous-time fields: SD3's logit-normal(0, 1) times, no shift (the tiny images
# of this project have few patches; SD3 shifts by 3 at 1024 px).
FLOW_DEFAULTS = dict(flow_time_distribution="logit_normal", flow_time_mean=0.0, flow_time_std=1.0, flow_shift=1.0)

__all__ = ["DIFFUSION_TARGETS", "FLOW_DEFAULTS", "IGNORE_INDEX", "IMAGE_ENCODERS", "MAX_SIZE", "NOISE_SCHEDULES",
           "TransfusionConfig", "continuous_times", "is_int", "noise_schedule"]


@dataclass
class TransfusionConfig:
    """Every size and choice of the model, checked when built (``dataclasses.replace`` too).

    A field of the wrong type raises ``TypeError`` (``norm_eps="1e-5"``, ``dim=32.0``,
    ``tie_embeddings=1``), a value out of range or inconsistent with another field ``ValueError``;
    the message starts with ``TransfusionConfig.<field>``. A bool is never an int here. Sizes are
    at most ``MAX_SIZE`` (int32), ``num_timesteps`` at most ``tk.NoiseSchedule``'s ``MAX_TIMESTEPS``.
    """

    # Text. The defaults fit transfusion_core.ByteTokenizer: bytes 0..255, then the specials.
    vocab_size: int = 260
    bos_id: int = 256
    eos_id: int = 257
    boi_id: int = 258  # begin of image
    eoi_id: int = 259  # end of image
    tie_embeddings: bool = False
    # Transformer
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (no GQA)
    ffn_dim: int | None = None  # None: SwiGLU's 8/3 * dim, rounded up to a multiple of 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Images: latents [image_channels, H, W] with H and W multiples of patch_size
    image_channels: int = 3
    image_size: int = 16  # side of generated images when generate() is not told otherwise
    patch_size: int = 2
    image_encoder: str = "linear"  # "linear" or "unet"
    unet_channels: tuple[int, ...] = (32, 64)  # U-Net: one level per halving, log2(patch_size) + 1
    # Add a fixed 2-D sine-cosine embedding of each patch's (row, column) to its token, as DiT
    # does: with RoPE alone a patch knows its distance to other positions but not where in its
    # image it lies, which a linear patch layer then has to learn slowly.
    patch_position_embedding: bool = False
    # Diffusion
    noise_schedule: str = "cosine"
    num_timesteps: int = 1000  # "flow": the packer's grid of integer draws, and t's scale in the embedding
    diffusion_target: str = "eps"  # diffusers' names ("epsilon", "v_prediction", "sample") are read too
    diffusion_loss_weight: float = 5.0  # the paper's lambda
    # Continuous time (noise_schedule="flow" only): the distribution training draws t from (before
    # the shift), "uniform" or "logit_normal" (mean and std of its normal), and the SD3 shift
    # t' = s t / (1 + (s - 1) t), which generation applies to its time grid too.
    flow_time_distribution: str = FLOW_DEFAULTS["flow_time_distribution"]
    flow_time_mean: float = FLOW_DEFAULTS["flow_time_mean"]
    flow_time_std: float = FLOW_DEFAULTS["flow_time_std"]
    flow_shift: float = FLOW_DEFAULTS["flow_shift"]

    def __post_init__(self):
        self._check_types()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 32 * math.ceil(8 * self.dim / 3 / 32)
        self.unet_channels = tuple(self.unet_channels)  # JSON gives a list
        self._validate()

    def _check_types(self):
        """Each field on its own: ``TypeError`` for a value of the wrong type, ``ValueError`` for one
        out of its range, the message naming the field (tfkernels' ``check_*`` rule)."""
        def name(field):
            return f"TransfusionConfig.{field}"

        for field in ("vocab_size", "dim", "n_layers", "n_heads", "image_channels", "image_size", "patch_size"):
            check_int(name(field), getattr(self, field), 1, MAX_SIZE)
        check_int(name("num_timesteps"), self.num_timesteps, 1, MAX_TIMESTEPS)  # tk.NoiseSchedule's bound
        for field in ("n_kv_heads", "ffn_dim"):
            if getattr(self, field) is not None:
                check_int(name(field), getattr(self, field), 1, MAX_SIZE)
        for field in ("bos_id", "eos_id", "boi_id", "eoi_id"):
            check_int(name(field), getattr(self, field))  # the range is checked against vocab_size below
        for field in ("tie_embeddings", "patch_position_embedding"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{name(field)}: expected a bool, got {getattr(self, field)!r}")
        for field in ("norm_eps", "rope_theta"):
            value = check_float(name(field), getattr(self, field), what="a finite float > 0")
            if value <= 0:
                raise ValueError(f"{name(field)}: expected a finite float > 0, got {getattr(self, field)!r}")
            setattr(self, field, value)
        self.diffusion_loss_weight = check_float(name("diffusion_loss_weight"), self.diffusion_loss_weight, 0)
        check_choice(name("image_encoder"), self.image_encoder, IMAGE_ENCODERS)
        check_choice(name("noise_schedule"), self.noise_schedule, NOISE_SCHEDULES)
        check_choice(name("diffusion_target"), self.diffusion_target, DIFFUSION_TARGETS + tuple(TARGET_ALIASES))
        self.diffusion_target = canonical_target(self.diffusion_target)
        check_choice(name("flow_time_distribution"), self.flow_time_distribution, TIME_DISTRIBUTIONS)
        self.flow_time_mean = check_float(name("flow_time_mean"), self.flow_time_mean)
        for field in ("flow_time_std", "flow_shift"):
            value = check_float(name(field), getattr(self, field), what="a finite float > 0")
            if value <= 0:
                raise ValueError(f"{name(field)}: expected a finite float > 0, got {getattr(self, field)!r}")
            setattr(self, field, value)
        if not isinstance(self.unet_channels, (list, tuple)):
            raise TypeError(f"{name('unet_channels')}: expected a tuple of ints, got {self.unet_channels!r}")
        for i, channels in enumerate(self.unet_channels):
            check_int(f"{name('unet_channels')}[{i}]", channels, 1, MAX_SIZE)

    def _validate(self):
        """The fields against each other (their types and ranges are ``_check_types``')."""
        def fail(name, expected):
            raise ValueError(f"TransfusionConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        specials = ("bos_id", "eos_id", "boi_id", "eoi_id")
        for name in specials:
            if not is_int(getattr(self, name), 0, self.vocab_size - 1):
                fail(name, f"a token id in [0, vocab_size={self.vocab_size})")
        if len({getattr(self, name) for name in specials}) != len(specials):
            fail("boi_id", f"bos_id, eos_id, boi_id and eoi_id all different ({[getattr(self, n) for n in specials]})")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            fail("n_heads", f"a divisor of dim={self.dim} leaving an even head dim")
        if self.n_heads % self.n_kv_heads:
            fail("n_kv_heads", f"a divisor of n_heads={self.n_heads}")
        if self.image_size % self.patch_size:
            fail("image_size", f"a multiple of patch_size={self.patch_size}")
        if self.image_encoder == "unet":
            levels = self.patch_size.bit_length() - 1
            if self.patch_size != 1 << levels or levels < 1:
                fail("patch_size", "a power of 2, at least 2, with image_encoder='unet'")
            if len(self.unet_channels) != levels + 1:
                fail("unet_channels", f"{levels + 1} positive ints (log2(patch_size) + 1 levels)")
        if self.diffusion_target == "flow" and self.noise_schedule not in ("rectified_flow", "flow"):
            fail("diffusion_target", "'eps', 'v' or 'x0' unless noise_schedule is 'rectified_flow' or 'flow' "
                                     "(flow velocity)")
        if self.noise_schedule == "flow" and self.diffusion_target == "eps":
            # At t = 1, x_t is the noise itself: a noise prediction says nothing of x0 there, and the
            # ODE cannot take its first step.
            fail("diffusion_target", "'flow', 'v' or 'x0' with noise_schedule='flow' (sampling starts at t = 1, "
                                     "where eps does not determine x0)")
        if self.noise_schedule != "flow":
            changed = [f for f, default in FLOW_DEFAULTS.items() if getattr(self, f) != default]
            if changed:
                fail(changed[0], f"{FLOW_DEFAULTS[changed[0]]!r}: the flow_* fields apply to "
                                 f"noise_schedule='flow' only")
        elif self.flow_time_distribution == "uniform" and (self.flow_time_mean, self.flow_time_std) != (0.0, 1.0):
            fail("flow_time_mean" if self.flow_time_mean != 0.0 else "flow_time_std",
                 "the default with flow_time_distribution='uniform' (mean and std shape 'logit_normal')")

    @property
    def continuous_time(self) -> bool:
        """Whether images take float times ``t`` in ``[0, 1]`` (``noise_schedule="flow"``), not integer steps."""
        return self.noise_schedule == "flow"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch: ``C * p * p``."""
        return self.image_channels * self.patch_size**2


def noise_schedule(config: TransfusionConfig) -> tk.NoiseSchedule:
    """The ``tk.NoiseSchedule`` named by the config (``"flow"``: ``rectified_flow``, which takes float times)."""
    if config.noise_schedule in ("cosine", "linear", "scaled_linear"):
        return getattr(tk.NoiseSchedule, config.noise_schedule)(T=config.num_timesteps)
    return tk.NoiseSchedule.rectified_flow(T=config.num_timesteps)


def continuous_times(steps: torch.Tensor, seed: int, config: TransfusionConfig) -> torch.Tensor:
    """Float32 times ``[N]`` in ``[0, 1]`` for a flow model from the packer's integer draws ``steps`` ``[N]``.

    The packer draws ``k`` uniform in ``[0, cap]`` on the grid of ``T = num_timesteps`` steps (``cap``
    is ``T - 1``, or ``image_first_t_max`` for an image that precedes its caption). A flow model
    reads ``k`` as the quantile interval ``[k / T, (k + 1) / T)`` of its time distribution: ``t =
    flow_time_quantile((k + u) / T)`` with ``u`` uniform in ``[0, 1)`` from ``seed`` (a batch's noise
    seed). So ``t`` follows the config's distribution and shift exactly, and a cap keeps the same
    share of it: the paper's ``t <= 500`` of 1000 becomes ``t`` at most the 0.501 quantile, ``t <=
    0.501`` for uniform times, about ``0.5`` for logit-normal(0, 1), and noisier under a shift > 1
    (``s * 0.5 / (1 + (s - 1) * 0.5)``). ``u`` is drawn on the CPU (the same values on every device)
    and copied to ``steps``' device, where the rest is computed in float64: no device-to-host copy, so
    no host sync in the training step.
    """
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(steps.shape[0], generator=generator, dtype=torch.float64).to(steps.device)
    quantile = (steps.detach().to(torch.float64) + u) / config.num_timesteps
    t = flow_time_quantile(quantile.clamp(0, 1), config.flow_time_distribution, config.flow_time_mean,
                           config.flow_time_std, config.flow_shift)
    return t.to(torch.float32)
