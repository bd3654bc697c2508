"""The image path of the Transfusion model: the diffusion step embedding, where each image's patches
lie in the packed sequence, and the patch encoders/decoders (a linear layer, or U-Net down and up
blocks with skip connections), as in the paper's section 3.

Shapes: ``N`` images, ``P`` patches of all images, ``D`` model dim, ``C*p*p`` values per patch
(``p`` = patch size), ``n`` images of one grid size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .config import TransfusionConfig
from .data import patchify, unpatchify

__all__ = ["ImageLayout", "LinearPatches", "TimestepEmbedding", "UNetPatches", "patch_position_embedding"]


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of the diffusion step, then an MLP: ``t [N]`` -> ``[N, D]``.

    ``t`` is an integer step or a float time; the features are those of ``t * time_scale``. A
    continuous-time model passes ``time_scale = T`` (``num_timesteps``, 1000), so that ``t`` in
    ``[0, 1]`` spans the frequencies as DDPM's steps ``0..T-1`` do (SD3 and diffusers' flow models
    embed ``1000 t`` likewise): with ``t`` itself, the slowest wavelengths would hardly move.
    """

    def __init__(self, dim: int, frequency_dim: int = 256, time_scale: float = 1.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_scale = time_scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = (t.to(torch.float32) * self.time_scale)[:, None] * freqs  # [N, F/2]
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
