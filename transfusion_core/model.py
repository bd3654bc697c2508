"""Transfusion: one transformer that predicts the next text token and denoises image patches.

Zhou et al., "Transfusion: Predict the Next Token and Diffuse Images with One Multi-Modal Model"
(arXiv 2408.11039). A sequence interleaves text tokens and images; an image is

    BOI, patch_1 ... patch_n, EOI

where the patches are the (noised) image latent cut into ``patch_size x patch_size`` squares and
embedded by a linear layer or by U-Net down blocks, plus an embedding of the diffusion step ``t``.
One Llama-style transformer (RMSNorm, RoPE, SwiGLU, GQA) runs over the whole sequence with the
Transfusion mask: causal, bidirectional inside each image, blind across packed documents
(``tk.IntervalMask``, ``tk.attention``). Text positions are trained with next-token prediction,
patches with the diffusion loss; ``loss = lm_loss + diffusion_loss_weight * diffusion_loss``.

Shapes: ``B`` rows, ``S`` positions, ``D`` model dim, ``N`` images, ``P`` patches of all images,
``C*p*p`` values per patch (``p`` = patch size), ``V`` vocabulary, ``H`` heads, ``Dh`` head dim.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file

import tfkernels as tk

from . import ops
from .generate import denoise_step, diffusion_timesteps, sample_token

IGNORE_INDEX = -100
IMAGE_ENCODERS = ("linear", "unet")
NOISE_SCHEDULES = ("cosine", "linear", "rectified_flow")
DIFFUSION_TARGETS = ("eps", "v", "x0", "flow")
SAMPLERS = {"ddpm": 1.0, "ddim": 0.0}  # name -> eta: 1 is DDPM's ancestral step, 0 is DDIM's
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def is_int(value, low=None, high=None) -> bool:
    """``value`` is an int (not a bool) with ``low <= value <= high`` (bounds optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class TransfusionConfig:
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


# ----------------------------------------------------------------------------------------------
# Documents as the model sees them
# ----------------------------------------------------------------------------------------------
def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[..., C, H, W]`` -> ``[..., (H/p)*(W/p), C*p*p]``, patches in raster order."""
    return rearrange(image, "... c (h p) (w q) -> ... (h w) (c p q)", p=patch_size, q=patch_size)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """``[..., h*w, C*p*p]`` -> ``[..., C, h*p, w*p]`` (inverse of ``patchify``)."""
    return rearrange(patches, "... (h w) (c p q) -> ... c (h p) (w q)", h=grid[0], w=grid[1],
                     p=patch_size, q=patch_size)


def document_segments(document, config: TransfusionConfig, *, add_eos: bool = True, name: str = "document"):
    """A document as the model reads it: alternating token runs and images.

    Args:
        document: ordered list of items: text as token ids (list of ints or a 1-D int tensor)
            and images as float latents ``[C, H, W]`` (H, W multiples of ``patch_size``).
        add_eos: end with EOS (training documents do; a generation prompt does not).
        name: how error messages call the document, e.g. ``documents[3]``.

    Returns:
        A list of 1-D int64 token runs (BOS first, BOI/EOI around every image, EOS last) and
        image tensors, e.g. ``[[BOS, *caption, BOI], image, [EOI, EOS]]``.
    """
    if isinstance(document, (str, torch.Tensor)) or not isinstance(document, Sequence):
        raise ValueError(f"{name}: expected a list of token-id lists and image tensors, got {type(document).__name__}")
    segments, run = [], [config.bos_id]
    for j, item in enumerate(document):
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            channels, p = config.image_channels, config.patch_size
            if item.ndim != 3 or item.shape[0] != channels or item.shape[1] < 1 or item.shape[2] < 1:
                raise ValueError(f"{name}[{j}]: expected an image [{channels}, H, W], got shape {tuple(item.shape)}")
            if item.shape[1] % p or item.shape[2] % p:
                raise ValueError(f"{name}[{j}]: image size {tuple(item.shape[1:])} is not a multiple of patch_size={p}")
            segments.append(torch.tensor(run + [config.boi_id]))
            segments.append(item)
            run = [config.eoi_id]
            continue
        tokens = None
        if isinstance(item, (list, tuple)) and all(is_int(i) for i in item):
            tokens = torch.tensor(item, dtype=torch.int64)
        elif isinstance(item, torch.Tensor) and not item.is_floating_point() and item.dtype != torch.bool:
            tokens = item.to(torch.int64)
        if tokens is None or tokens.ndim != 1:
            raise ValueError(
                f"{name}[{j}]: expected token ids (a list of ints or a 1-D int tensor) or a float image "
                f"[C, H, W], got {type(item).__name__}"
            )
        if tokens.numel() and not (int(tokens.min()) >= 0 and int(tokens.max()) < config.vocab_size):
            raise ValueError(f"{name}[{j}]: token ids must lie in [0, vocab_size={config.vocab_size})")
        if bool(torch.isin(tokens, special_tokens(config)).any()):
            raise ValueError(
                f"{name}[{j}]: text contains a special token (BOS/EOS/BOI/EOI ids "
                f"{special_tokens(config).tolist()}); the layout inserts those itself"
            )
        run += tokens.tolist()
    if add_eos:
        run.append(config.eos_id)
    segments.append(torch.tensor(run))
    return segments


def special_tokens(config: TransfusionConfig) -> torch.Tensor:
    """int64 ``[4]``: BOS, EOS, BOI, EOI."""
    return torch.tensor([config.bos_id, config.eos_id, config.boi_id, config.eoi_id])


def segment_length(segment: torch.Tensor, patch_size: int) -> int:
    """Positions a segment of ``document_segments`` takes: its tokens, or its image patches."""
    if segment.is_floating_point():
        return (segment.shape[1] // patch_size) * (segment.shape[2] // patch_size)
    return segment.numel()


# ----------------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------------
def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """RoPE angles for integer positions ``[B, S]`` -> cos, sin ``[B, S, 1, Dh/2]`` float32."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, S, Dh/2]
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, S, H, Dh]`` by the angles, rotating half-dims pairwise (Llama layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim)  # [B, S, H, Dh]
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)  # [B, S, Hkv, Dh]
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, Sk, Hkv, Dh]: cached keys, then these
        out = ops.current().attention(q, k, v, mask)  # [B, S, H, Dh]
        return self.wo(out.reshape(batch, seq_len, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


# ----------------------------------------------------------------------------------------------
# Image path: timestep embedding, patches in and out (linear or U-Net)
# ----------------------------------------------------------------------------------------------
class TimestepEmbedding(nn.Module):
    """Sinusoidal features of the diffusion step, then an MLP: ``t [N]`` -> ``[N, D]``."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.to(torch.float32)[:, None] * freqs  # [N, F/2]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)  # [N, F]
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ImageLayout(NamedTuple):
    """Where the images of a flat patch buffer ``[P, C*p*p]`` lie.

    offsets: int64 ``[N + 1]``, image ``i`` owns patches ``[offsets[i], offsets[i+1])``;
    grids: int64 ``[N, 2]``, its patch grid ``(h, w)`` (the latent is ``h*p x w*p``).
    """

    offsets: torch.Tensor
    grids: torch.Tensor

    @property
    def num_images(self) -> int:
        return self.grids.shape[0]

    def patch_image_index(self) -> torch.Tensor:
        """int64 ``[P]``: the image each patch belongs to."""
        counts = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.num_images, device=counts.device), counts)

    def groups_by_grid(self):
        """Images batched by patch grid: ``[((h, w), image_index [n], patch_index [n, h*w])]``."""
        groups = []
        grids = self.grids.tolist()
        for grid in sorted(set(map(tuple, grids))):
            image_index = torch.tensor([i for i, g in enumerate(grids) if tuple(g) == grid], device=self.offsets.device)
            patches = torch.arange(grid[0] * grid[1], device=self.offsets.device)
            patch_index = self.offsets[image_index][:, None] + patches
            groups.append((grid, image_index, patch_index))
        return groups


def patch_position_embedding(layout: ImageLayout, dim: int) -> torch.Tensor:
    """Sine-cosine features of each patch's row (first half of ``dim``) and column: ``[P, D]``."""
    row_col = []
    for grid in layout.grids.tolist():
        rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        row_col.append(torch.stack([rows.flatten(), cols.flatten()], dim=1))  # raster order
    coords = torch.cat(row_col).to(layout.offsets.device, torch.float32)  # [P, 2]
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=coords.device) / quarter)
    angles = coords[:, :, None] * freqs  # [P, 2, D/4]
    features = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # [P, D] (D % 4 == 0)
    return F.pad(features, (0, dim - features.shape[1]))


class LinearPatches(nn.Module):
    """Each patch in and out through one linear layer."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.patch_in = nn.Linear(config.patch_dim, config.dim)
        self.patch_out = nn.Linear(config.dim, config.patch_dim)

    def encode(self, x_t, time_emb, layout):
        return self.patch_in(x_t), None  # [P, D]; no skip connections

    def decode(self, hidden, time_emb, layout, skips):
        return self.patch_out(hidden)  # [P, C*p*p]


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    """Pre-activation ResNet block conditioned on the timestep embedding."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, time_emb):  # x [n, Cin, H, W], time_emb [n, D] -> [n, Cout, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(time_emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class UNetPatches(nn.Module):
    """U-Net down blocks from the latent to one ``D`` vector per patch, and up blocks back.

    Each level is a ResNet block and a stride-2 convolution, so ``log2(patch_size)`` levels take
    a ``p x p`` patch to one position; the up path mirrors it with skip connections from the
    down path of the same (noised) image. Images of one size are processed together.
    """

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        channels, dim = config.unet_channels, config.dim
        self.patch_size = config.patch_size
        self.conv_in = nn.Conv2d(config.image_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(ResBlock(c, c, dim) for c in channels[:-1])
        self.downsamples = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1) for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.to_model = nn.Linear(channels[-1], dim)
        self.from_model = nn.Linear(dim, channels[-1])
        self.upsamples = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in zip(channels[1:], channels[:-1])
        )
        self.up_blocks = nn.ModuleList(ResBlock(2 * c, c, dim) for c in channels[:-1])
        self.norm_out = _group_norm(channels[0])
        self.conv_out = nn.Conv2d(channels[0], config.image_channels, 3, padding=1)

    def encode(self, x_t, time_emb, layout):
        """x_t ``[P, C*p*p]``, time_emb ``[N, D]`` -> tokens ``[P, D]`` and the skips per group."""
        tokens = x_t.new_zeros(x_t.shape[0], self.to_model.out_features)
        skips = []
        for grid, image_index, patch_index in layout.groups_by_grid():
            x = self.conv_in(unpatchify(x_t[patch_index], grid, self.patch_size))  # [n, C0, H, W]
            emb = time_emb[image_index]  # [n, D]
            group_skips = []
            for block, downsample in zip(self.down_blocks, self.downsamples):
                x = block(x, emb)
                group_skips.append(x)
                x = downsample(x)  # [n, C_next, H/2, W/2]
            group_tokens = self.to_model(rearrange(x, "n c h w -> (n h w) c"))  # [n*h*w, D]
            tokens = tokens.index_copy(0, patch_index.flatten(), group_tokens.to(tokens.dtype))
            skips.append(group_skips)
        return tokens, skips

    def decode(self, hidden, time_emb, layout, skips):
        """hidden ``[P, D]`` -> predictions ``[P, C*p*p]``."""
        out = hidden.new_zeros(hidden.shape[0], self.conv_out.out_channels * self.patch_size**2)
        for (grid, image_index, patch_index), group_skips in zip(layout.groups_by_grid(), skips):
            x = rearrange(self.from_model(hidden[patch_index]), "n (h w) c -> n c h w", h=grid[0])
            emb = time_emb[image_index]
            for upsample, block, skip in zip(
                reversed(self.upsamples), reversed(self.up_blocks), reversed(group_skips)
            ):
                x = upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [n, C, 2h, 2w]
                x = block(torch.cat([x, skip], dim=1), emb)
            x = self.conv_out(F.silu(self.norm_out(x)))  # [n, C, H, W]
            out = out.index_copy(0, patch_index.flatten(), patchify(x, self.patch_size).flatten(0, 1).to(out.dtype))
        return out


# ----------------------------------------------------------------------------------------------
# KV cache for generation
# ----------------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of every layer for the positions generated so far.

    Rows are right-aligned: every row ends at ``length`` and row ``b``'s keys start at
    ``row_start[b]`` (its mask never shows the slots before), so sequences of different lengths,
    like a prompt and the unconditional prefix of classifier-free guidance, share one batch.
    A step writes its keys at ``[length, length + n)``; ``commit(n)`` keeps them, otherwise the
    next step overwrites them (a denoising step's noisy patches).
    """

    def __init__(self, config: TransfusionConfig, batch_size: int, device, dtype, capacity: int = 256):
        shape = (batch_size, capacity, config.n_kv_heads, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0
        self.row_start = torch.zeros(batch_size, dtype=torch.int64, device=device)

    @property
    def batch_size(self) -> int:
        return self.row_start.shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write ``k, v [B, n, Hkv, Dh]`` after the committed keys; return all ``[B, length+n, ...]``."""
        end = self.length + k.shape[1]
        if end > self.keys[layer].shape[1]:
            grow = max(end, 2 * self.keys[layer].shape[1]) - self.keys[layer].shape[1]
            self.keys[layer] = F.pad(self.keys[layer], (0, 0, 0, 0, 0, grow))
            self.values[layer] = F.pad(self.values[layer], (0, 0, 0, 0, 0, grow))
        self.keys[layer][:, self.length:end] = k
        self.values[layer][:, self.length:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def commit(self, n: int) -> None:
        self.length += n

    @staticmethod
    def stack(caches: Sequence[KVCache]) -> KVCache:
        """One cache holding the rows of all ``caches``, right-aligned at the longest length."""
        length = max(c.length for c in caches)
        merged = KVCache.__new__(KVCache)
        merged.length = length
        merged.row_start = torch.cat([c.row_start + (length - c.length) for c in caches])
        merged.keys, merged.values = [], []
        for layer in range(len(caches[0].keys)):
            for store, source in ((merged.keys, "keys"), (merged.values, "values")):
                rows = [F.pad(getattr(c, source)[layer][:, :c.length], (0, 0, 0, 0, length - c.length, 0))
                        for c in caches]
                store.append(torch.cat(rows))
        return merged


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class TransfusionLoss(NamedTuple):
    loss: torch.Tensor  # lm_loss + diffusion_loss_weight * diffusion_loss
    lm_loss: torch.Tensor  # mean cross-entropy over text targets
    diffusion_loss: torch.Tensor  # per-image MSE, mean over images


class Transfusion(nn.Module):
    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.time_embedding = TimestepEmbedding(config.dim)
        self.image_io = LinearPatches(config) if config.image_encoder == "linear" else UNetPatches(config)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.schedule = noise_schedule(config)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # GPT-2's init: with PyTorch's defaults, unit-variance embeddings give huge tied logits.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def output_weight(self) -> torch.Tensor:
        """LM head ``[V, D]`` (the token embedding when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> ``[..., V]`` float32 (training uses the fused loss instead)."""
        return hidden.float() @ self.output_weight.float().T

    # ------------------------------------------------------------------ shared trunk
    def _embed_images(self, x_t, t, layout):
        """Noised patches ``[P, C*p*p]`` at steps ``t [N]`` -> tokens ``[P, D]``, time_emb, skips."""
        time_emb = self.time_embedding(t)  # [N, D]
        tokens, skips = self.image_io.encode(x_t.to(time_emb.dtype), time_emb, layout)
        tokens = tokens + time_emb[layout.patch_image_index()]
        if self.config.patch_position_embedding:
            tokens = tokens + patch_position_embedding(layout, self.config.dim).to(tokens.dtype)
        return tokens, time_emb, skips

    def _transformer(self, h, positions, mask, cache=None):
        """``h [B, S, D]`` at RoPE positions ``[B, S]`` -> final-normed hidden ``[B, S, D]``."""
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        for layer, block in enumerate(self.layers):
            h = block(h, cos, sin, mask, cache, layer)
        return self.norm(h)

    def predict(self, batch, x_t: torch.Tensor):
        """Run a packed batch whose patches are already noised (``x_t [P, C*p*p]``).

        Returns the final hidden states ``[B, S, D]`` (``logits(hidden)`` for next-token
        logits) and the image predictions ``[P, C*p*p]`` (of ``config.diffusion_target``).
        """
        layout = ImageLayout(batch.patch_offsets, batch.image_grids)
        h = self.tok_embeddings(batch.tokens)  # [B, S, D]
        if layout.num_images == 0:
            return self._transformer(h, batch.positions, batch.mask), x_t.new_zeros(0, self.config.patch_dim)
        is_image = batch.image_ids != 0  # [B, S]
        if x_t.shape[0] != int(is_image.sum()):
            raise ValueError(
                f"x_t: expected {int(is_image.sum())} patches (the batch's image positions), got {x_t.shape[0]}"
            )
        patch_tokens, time_emb, skips = self._embed_images(x_t, batch.timesteps, layout)
        # Patches fill the image positions in row-major order, the order of the patch buffer.
        h = h.masked_scatter(is_image[..., None], patch_tokens)
        hidden = self._transformer(h, batch.positions, batch.mask)
        return hidden, self.image_io.decode(hidden[is_image], time_emb, layout, skips)

    def forward(self, batch, noise: torch.Tensor | None = None) -> TransfusionLoss:
        """Training loss of a packed batch (``transfusion_core.PackedBatch``).

        The patches are noised at ``batch.timesteps`` with ``noise`` ``[P, C*p*p]`` if given,
        else with noise generated from ``batch.noise_seed`` (regenerated in the loss, not stored).
        """
        x0 = batch.patches  # [P, C*p*p] clean latents
        noise_args = {"noise": noise} if noise is not None else {"seed": batch.noise_seed}
        schedule = self._schedule_on(x0.device)
        model_ops = ops.current()
        x_t = model_ops.add_noise(x0, batch.timesteps, schedule, offsets=batch.patch_offsets, **noise_args)
        hidden, pred = self.predict(batch, x_t)
        is_target = batch.targets != IGNORE_INDEX  # [B, S]
        text_hidden = hidden[is_target]  # [T, D]: only text positions pay for the LM head
        # Under autocast the head runs in the activations' dtype, as an nn.Linear would.
        lm_head = self.output_weight.to(text_hidden.dtype)
        lm_loss = model_ops.linear_cross_entropy(text_hidden, lm_head, batch.targets[is_target])
        diffusion_loss = lm_loss.new_zeros(())  # a text-only batch
        if batch.num_images:
            diffusion_loss = model_ops.diffusion_loss(
                pred, x0, batch.timesteps, schedule, target=self.config.diffusion_target,
                offsets=batch.patch_offsets, **noise_args,
            )
        return TransfusionLoss(lm_loss + self.config.diffusion_loss_weight * diffusion_loss, lm_loss, diffusion_loss)

    def _schedule_on(self, device) -> tk.NoiseSchedule:
        """The noise schedule with its tables on ``device`` (moved once, not at every step)."""
        if self.schedule.device != torch.device(device):
            self.schedule = self.schedule.to(device)
        return self.schedule

    # ------------------------------------------------------------------ cached steps
    def new_cache(self, batch_size: int = 1) -> KVCache:
        return KVCache(self.config, batch_size, self.device, self.tok_embeddings.weight.dtype)

    def _cached_step(self, cache: KVCache, h: torch.Tensor, bidirectional: bool):
        """Run ``h [B, n, D]`` as the next ``n`` positions of every cache row."""
        batch, n, _ = h.shape
        offsets = torch.arange(n, device=h.device)
        kv_start = cache.row_start[:, None].expand(batch, n)
        if bidirectional:  # an image: every patch sees the whole image
            kv_end = torch.full((batch, n), cache.length + n, device=h.device)
        else:  # text: causal
            kv_end = (cache.length + 1 + offsets).expand(batch, n)
        mask = tk.IntervalMask(
            kv_start.to(torch.int32).contiguous(), kv_end.to(torch.int32).contiguous(), cache.length + n
        )
        positions = cache.length + offsets - cache.row_start[:, None]  # [B, n] position in the document
        return self._transformer(h, positions, mask, cache)

    @torch.no_grad()
    def extend_text(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens ``[B, n]`` to the cache; return their next-token logits ``[B, n, V]``."""
        hidden = self._cached_step(cache, self.tok_embeddings(tokens), bidirectional=False)
        cache.commit(tokens.shape[1])
        return self.logits(hidden)

    @torch.no_grad()
    def extend_image(self, cache: KVCache, x_t: torch.Tensor, t: torch.Tensor, grid: tuple[int, int], commit: bool):
        """Run one image per row, ``x_t [B, h*w, C*p*p]`` at steps ``t [B]``, after the cache.

        Returns the predictions ``[B, h*w, C*p*p]``. ``commit=True`` keeps the patches' keys
        and values (a clean image that later tokens attend to); a denoising step does not.
        """
        batch, n, _ = x_t.shape
        layout = ImageLayout(torch.arange(batch + 1, device=x_t.device) * n,
                             torch.tensor([grid] * batch, device=x_t.device))
        tokens, time_emb, skips = self._embed_images(x_t.flatten(0, 1), t, layout)
        hidden = self._cached_step(cache, tokens.view(batch, n, -1), bidirectional=True)
        if commit:
            cache.commit(n)
        return self.image_io.decode(hidden.flatten(0, 1), time_emb, layout, skips).view(batch, n, -1)

    def _prefill(self, cache: KVCache, segments) -> torch.Tensor:
        """Run a prompt's segments into the cache; return the last position's logits ``[V]``."""
        logits = None
        for segment in segments:
            if segment.is_floating_point():  # a prompt image is clean: t = 0
                grid = (segment.shape[1] // self.config.patch_size, segment.shape[2] // self.config.patch_size)
                patches = patchify(segment.to(self.device, torch.float32), self.config.patch_size)[None]
                clean = torch.zeros(1, dtype=torch.int64, device=self.device)
                self.extend_image(cache, patches, clean, grid, commit=True)
            else:
                logits = self.extend_text(cache, segment.to(self.device)[None])[0, -1]
        return logits

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        prompt,
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        force_image: bool = False,
        image_size: int | tuple[int, int] | None = None,
        image_steps: int = 250,
        sampler: str = "ddpm",
        cfg_scale: float | None = None,
        clip_x0: float | None = None,
        seed: int | None = None,
    ) -> list:
        """Continue a mixed-modal prompt: text in LM mode, images in diffusion mode.

        Args:
            prompt: list of token-id lists and image latents ``[C, H, W]`` (a document without
                EOS). An image in the prompt is read clean (t = 0): captioning.
            max_new_tokens: most text tokens to sample (a sampled BOI counts, a forced one not).
            temperature: softmax temperature; 0 is greedy (argmax).
            top_k, top_p: keep the ``top_k`` likeliest tokens / the smallest set of mass ``top_p``.
            force_image: start with BOI, so that the first thing generated is an image
                (text -> image; with ``max_new_tokens=0`` the image is all that is generated).
            image_size: latent side ``H = W``, or ``(H, W)``; ``config.image_size`` by default.
            image_steps: denoising steps per image (at most ``num_timesteps``).
            sampler: ``"ddpm"`` (ancestral, as in the paper) or ``"ddim"`` (deterministic,
                for fewer steps).
            cfg_scale: classifier-free guidance scale ``s``; the prediction is
                ``cond + (s - 1) * (cond - uncond)`` with ``uncond`` from the prefix ``BOS, BOI``
                batched alongside. ``None``: no guidance (and no unconditional row).
            clip_x0: clamp each step's predicted clean image to ``[-clip_x0, clip_x0]`` (1.0 for
                pixels in [-1, 1], as DDPM samplers do; ``None`` for unbounded latents).
            seed: seed of every random choice (tokens and noise); ``None`` draws one.

        Returns:
            The generated continuation as a list of texts (lists of token ids, without the
            special tokens) and images (``[C, H, W]`` float32), in order. Stops at EOS or
            after ``max_new_tokens``.
        """
        config = self.config
        _check_generate_args(
            max_new_tokens, temperature, top_k, top_p, image_steps, sampler, cfg_scale, clip_x0, config
        )
        image_hw = _image_hw(image_size if image_size is not None else config.image_size, config.patch_size)
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        segments = document_segments(prompt, config, add_eos=False, name="prompt")
        if force_image:
            segments[-1] = torch.cat([segments[-1], torch.tensor([config.boi_id])])
        cache = self.new_cache()
        logits = self._prefill(cache, segments)
        last_token = int(segments[-1][-1])
        never_sampled = torch.tensor([config.bos_id, config.eoi_id], device=self.device)
        outputs, text, sampled = [], [], 0
        while True:
            if last_token == config.boi_id:
                if text:
                    outputs.append(text)
                    text = []
                outputs.append(self._generate_image(cache, image_hw, steps=image_steps, eta=SAMPLERS[sampler],
                                                    cfg_scale=cfg_scale, clip_x0=clip_x0, generator=generator))
                logits = self.extend_text(cache, torch.tensor([[config.eoi_id]], device=self.device))[0, -1]
                last_token = config.eoi_id
                continue
            if sampled == max_new_tokens:
                break
            logits[never_sampled] = float("-inf")
            last_token = sample_token(logits, temperature, top_k, top_p, generator)
            sampled += 1
            if last_token == config.eos_id:
                break
            if last_token != config.boi_id:
                text.append(last_token)
            logits = self.extend_text(cache, torch.tensor([[last_token]], device=self.device))[0, -1]
        if text:
            outputs.append(text)
        return outputs

    def _generate_image(self, cache, image_hw, *, steps, eta, cfg_scale, clip_x0, generator) -> torch.Tensor:
        """Denoise one image after the cache (which ends with BOI), then commit it clean."""
        config = self.config
        grid = (image_hw[0] // config.patch_size, image_hw[1] // config.patch_size)
        n = grid[0] * grid[1]
        rows = cache
        if cfg_scale is not None:
            unconditional = self.new_cache()
            self.extend_text(unconditional, torch.tensor([[config.bos_id, config.boi_id]], device=self.device))
            rows = KVCache.stack([cache, unconditional])  # row 0 conditional, row 1 unconditional
        x = torch.randn(n, config.patch_dim, device=self.device, generator=generator)  # [n, C*p*p] x_T
        schedule = self._schedule_on(self.device)
        timesteps = diffusion_timesteps(config.num_timesteps, steps).tolist()
        for i, t in enumerate(timesteps):
            t_batch = torch.full((rows.batch_size,), t, dtype=torch.int64, device=self.device)
            pred = self.extend_image(rows, x.expand(rows.batch_size, n, -1), t_batch, grid, commit=False).float()
            guided = pred[0]
            if cfg_scale is not None:  # written so that s = 1 gives the conditional prediction exactly
                guided = pred[0] + (cfg_scale - 1.0) * (pred[0] - pred[1])
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
            x = denoise_step(x, guided, t, t_next, schedule, config.diffusion_target,
                             eta=eta, clip_x0=clip_x0, generator=generator)
        self.extend_image(cache, x[None], torch.zeros(1, dtype=torch.int64, device=self.device), grid, commit=True)
        return unpatchify(x, grid, config.patch_size)  # [C, H, W]

    # ------------------------------------------------------------------ checkpoints
    def save(self, path) -> None:
        """Write ``path/model.safetensors`` (weights) and ``path/config.json``; nothing pickled."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file({name: t.contiguous() for name, t in self.state_dict().items()}, str(path / WEIGHTS_FILE))

    @classmethod
    def load(cls, path, device=None) -> Transfusion:
        """Build the model of ``path/config.json`` and load ``path/model.safetensors`` into it."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path}: expected a checkpoint directory with {CONFIG_FILE} and {WEIGHTS_FILE}")
        config_fields = json.loads((path / CONFIG_FILE).read_text())
        unknown = set(config_fields) - {f.name for f in fields(TransfusionConfig)}
        if unknown:
            raise ValueError(f"{path / CONFIG_FILE}: unknown TransfusionConfig fields {sorted(unknown)}")
        model = cls(TransfusionConfig(**config_fields))
        weights = load_file(str(path / WEIGHTS_FILE))
        expected = model.state_dict()
        problems = [f"missing {name}" for name in expected if name not in weights]
        problems += [f"unexpected {name}" for name in weights if name not in expected]
        problems += [
            f"{name}: checkpoint shape {tuple(weights[name].shape)}, config needs {tuple(t.shape)}"
            for name, t in expected.items() if name in weights and weights[name].shape != t.shape
        ]
        if problems:
            raise ValueError(f"{path / WEIGHTS_FILE} does not match {path / CONFIG_FILE}: " + "; ".join(problems))
        model.load_state_dict(weights)
        return model.to(device) if device is not None else model


def _image_hw(image_size, patch_size: int) -> tuple[int, int]:
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(is_int(s, patch_size) and s % patch_size == 0 for s in hw):
        raise ValueError(
            f"image_size: expected an int or (H, W), multiples of patch_size={patch_size}, got {image_size!r}"
        )
    return hw


def _check_generate_args(max_new_tokens, temperature, top_k, top_p, image_steps, sampler, cfg_scale, clip_x0, config):
    if not is_int(max_new_tokens, 0):
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature: expected a number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and not is_int(top_k, 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
    if not is_int(image_steps, 1, config.num_timesteps):
        raise ValueError(
            f"image_steps: expected an int in [1, num_timesteps={config.num_timesteps}], got {image_steps!r}"
        )
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {tuple(SAMPLERS)}, got {sampler!r}")
    if cfg_scale is not None and not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale: expected None or a finite number, got {cfg_scale!r}")
    if clip_x0 is not None and not 0 < clip_x0 < math.inf:
        raise ValueError(f"clip_x0: expected None or a number > 0, got {clip_x0!r}")
