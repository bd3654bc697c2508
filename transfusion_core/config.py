"""The model's configuration: ``TransfusionConfig`` and the constants it is checked against.

Also ``is_int`` (tfkernels' own int check, re-exported for the package) and ``noise_schedule(config)``, the
``tk.NoiseSchedule`` a config names (the packer samples timesteps from it, the model noises with it).
Imports nothing from the rest of ``transfusion_core``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tfkernels as tk
from tfkernels._checks import is_int
from tfkernels.schedule import TARGETS as DIFFUSION_TARGETS

IGNORE_INDEX = -100  # target of a position with no next-token target (PackedBatch.targets)
IMAGE_ENCODERS = ("linear", "unet")
NOISE_SCHEDULES = ("cosine", "linear", "rectified_flow")

__all__ = ["DIFFUSION_TARGETS", "IGNORE_INDEX", "IMAGE_ENCODERS", "NOISE_SCHEDULES", "TransfusionConfig", "is_int",
           "noise_schedule"]


@dataclass
class TransfusionConfig:
    """Every size and choice of the model, checked when built (a ``ValueError`` names the field)."""

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
    num_timesteps: int = 1000
    diffusion_target: str = "eps"
    diffusion_loss_weight: float = 5.0  # the paper's lambda

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 32 * math.ceil(8 * self.dim / 3 / 32)
        self.unet_channels = tuple(self.unet_channels)  # JSON gives a list
        self._validate()

    def _validate(self):
        def fail(name, expected):
            raise ValueError(f"TransfusionConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                     "image_channels", "image_size", "patch_size", "num_timesteps"):
            value = getattr(self, name)
            if not is_int(value, 1):
                fail(name, "an int >= 1")
        specials = ("bos_id", "eos_id", "boi_id", "eoi_id")
        for name in specials:
            value = getattr(self, name)
            if not is_int(value, 0, self.vocab_size - 1):
                fail(name, f"a token id in [0, vocab_size={self.vocab_size})")
        if len({getattr(self, name) for name in specials}) != len(specials):
            fail("boi_id", f"bos_id, eos_id, boi_id and eoi_id all different ({[getattr(self, n) for n in specials]})")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            fail("n_heads", f"a divisor of dim={self.dim} leaving an even head dim")
        if self.n_heads % self.n_kv_heads:
            fail("n_kv_heads", f"a divisor of n_heads={self.n_heads}")
        if self.image_size % self.patch_size:
            fail("image_size", f"a multiple of patch_size={self.patch_size}")
        if self.image_encoder not in IMAGE_ENCODERS:
            fail("image_encoder", f"one of {IMAGE_ENCODERS}")
        if self.image_encoder == "unet":
            levels = self.patch_size.bit_length() - 1
            if self.patch_size != 1 << levels or levels < 1:
                fail("patch_size", "a power of 2, at least 2, with image_encoder='unet'")
            if len(self.unet_channels) != levels + 1 or not all(is_int(c, 1) for c in self.unet_channels):
                fail("unet_channels", f"{levels + 1} positive ints (log2(patch_size) + 1 levels)")
        if self.noise_schedule not in NOISE_SCHEDULES:
            fail("noise_schedule", f"one of {NOISE_SCHEDULES}")
        if self.diffusion_target not in DIFFUSION_TARGETS:
            fail("diffusion_target", f"one of {DIFFUSION_TARGETS}")
        if self.diffusion_target == "flow" and self.noise_schedule != "rectified_flow":
            fail("diffusion_target", "'eps', 'v' or 'x0' unless noise_schedule='rectified_flow' (flow velocity)")
        if not self.diffusion_loss_weight >= 0:
            fail("diffusion_loss_weight", "a number >= 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch: ``C * p * p``."""
        return self.image_channels * self.patch_size**2


def noise_schedule(config: TransfusionConfig) -> tk.NoiseSchedule:
    """The ``tk.NoiseSchedule`` named by the config."""
    if config.noise_schedule == "cosine":
        return tk.NoiseSchedule.cosine(T=config.num_timesteps)
    if config.noise_schedule == "linear":
        return tk.NoiseSchedule.linear(T=config.num_timesteps)
    return tk.NoiseSchedule.rectified_flow(T=config.num_timesteps)
