"""diffusers PixArt-alpha: one DiT training step with diffusers' default attention processors and with
tfkernels' (``tfkernels.integrations.diffusers.apply``), part of the ``hf`` suite.

The transformer of PixArt-alpha XL/2 at 512 px (``PixArtTransformer2DModel``: 28 blocks, dim 1152,
16 heads of 72, 2x2 patches of 64x64x4 latents: 1024 image tokens; cross-attention to T5 caption
embeddings of 4096 channels padded to 120 tokens, as the pipeline pads them), B = 8 captions of
20-120 tokens (drawn once, seed 0: the workload's fixed mask), in bf16 on CUDA, AdamW. One step:
the model on noisy latents, timesteps and the padded captions with their ``encoder_attention_mask``,
the MSE of its first 4 output channels (the noise prediction; the other 4 are the learned variance)
against the noise, backward, optimizer step. The same model, inputs and optimizer for both:

- ``tfkernels``: ``apply(model)``: every ``AttnProcessor2_0`` runs ``tk.attention``, the self-attention
  without a mask, the cross-attention with the caption lengths (``IntervalMask.from_key_lengths``,
  converted once per step from the model's padding bias);
- ``default``: diffusers' ``AttnProcessor2_0``, SDPA, the cross-attention with the additive padding
  bias expanded per head (``[B, heads, 1, 120]``).

Quick: 2 blocks of dim 64 (2 heads of 32), 8x8 latents (16 image tokens), captions of 12 channels
padded to 10 tokens, B = 3, float32 on the CPU.

Useful FLOPs per step, as in the e2e suite, ``6 x`` the tokens each weight multiplies: image tokens
x the blocks' image-side weights (self-attention q, k, v, out; cross-attention q, out; the MLP),
caption tokens (padded: both implementations project them) x the cross-attention's k, v and the
caption projection; plus ``3.5 x 4 x visible pairs x head dim x heads x layers`` for attention
(self: B * S^2, cross: S * the captions' tokens). Tokens per step: the image tokens.

diffusers is optional: without it both cases are skipped with the reason (``pip install
'tfkernels[diffusers]'``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import torch
import torch.nn.functional as F

from ..harness import Implementation, InputSet, Work, Workload
from .common import bench_dtype, dtype_name, tfkernels_backend

SUITE = "hf"
MODE = "train_step"
MISSING_DIFFUSERS = "diffusers not installed (pip install 'tfkernels[diffusers]')"
NOISE_CHANNELS = 4  # the output's first channels: the noise prediction (the rest: the learned variance)


@dataclasses.dataclass(frozen=True)
class PixArtShape:
    batch: int
    latent: int  # latent height and width
    patch: int
    layers: int
    heads: int
    head_dim: int
    caption_channels: int
    caption_tokens: int  # captions padded to this many
    caption_range: tuple[int, int]  # caption lengths drawn in this range

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def image_tokens(self) -> int:
        return (self.latent // self.patch) ** 2

    def model_config(self) -> dict:
        return dict(num_attention_heads=self.heads, attention_head_dim=self.head_dim, in_channels=4,
                    out_channels=2 * NOISE_CHANNELS, num_layers=self.layers, cross_attention_dim=self.dim,
                    sample_size=self.latent, patch_size=self.patch, caption_channels=self.caption_channels,
                    num_embeds_ada_norm=1000, norm_type="ada_norm_single", use_additional_conditions=False)

    @functools.cached_property
    def caption_lengths(self) -> list[int]:
        generator = torch.Generator().manual_seed(0)
        low, high = self.caption_range
        return torch.randint(low, high + 1, (self.batch,), generator=generator).tolist()

    @property
    def image_side_params(self) -> int:
        """Per block: self-attention q, k, v, out, cross-attention q, out, and the MLP (dim -> 4 dim -> dim)."""
        return 4 * self.dim**2 + 2 * self.dim**2 + 8 * self.dim**2

    @property
    def caption_side_params(self) -> int:
        """The cross-attention's k and v of every block, and the caption projection (channels -> dim -> dim)."""
        return self.layers * 2 * self.dim**2 + self.caption_channels * self.dim + self.dim**2

    def flops(self) -> float:
        image_tokens = self.batch * self.image_tokens
        caption_tokens = self.batch * self.caption_tokens
        matmuls = 6 * (image_tokens * self.layers * self.image_side_params + caption_tokens * self.caption_side_params)
        pairs = self.batch * self.image_tokens**2 + self.image_tokens * sum(self.caption_lengths)
        return matmuls + 3.5 * 4 * pairs * self.head_dim * self.heads * self.layers

    def describe(self, dtype: torch.dtype) -> str:
        parameters = self.layers * self.image_side_params + self.caption_side_params
        low, high = self.caption_range
        return (f"PixArt-alpha transformer, {parameters / 1e6:.3g}M matmul params ({self.layers} blocks, "
                f"dim {self.dim}, {self.heads} heads of {self.head_dim}), B={self.batch}, {self.image_tokens} "
                f"image tokens ({self.latent}x{self.latent} latents, {self.patch}x{self.patch} patches), captions "
                f"{low}-{high} of {self.caption_channels} channels padded to {self.caption_tokens}, "
                f"{dtype_name(dtype)} weights, AdamW")


def shape_for(quick: bool) -> PixArtShape:
    if quick:
        return PixArtShape(batch=3, latent=8, patch=2, layers=2, heads=2, head_dim=32, caption_channels=12,
                           caption_tokens=10, caption_range=(2, 10))
    return PixArtShape(batch=8, latent=64, patch=2, layers=28, heads=16, head_dim=72, caption_channels=4096,
                       caption_tokens=120, caption_range=(20, 120))


@dataclasses.dataclass
class PixArtBatch:
    noisy: torch.Tensor  # [B, 4, latent, latent]
    noise: torch.Tensor  # the target, same shape
    timesteps: torch.Tensor  # [B] int
    captions: torch.Tensor  # [B, caption_tokens, caption_channels]
    caption_mask: torch.Tensor  # [B, caption_tokens]: 1 for a caption token


def batch(shape: PixArtShape, device: torch.device, seed: int, dtype: torch.dtype) -> PixArtBatch:
    generator = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    latents = (shape.batch, 4, shape.latent, shape.latent)
    lengths = torch.tensor(shape.caption_lengths)
    caption_mask = (torch.arange(shape.caption_tokens) < lengths[:, None]).long()
    return PixArtBatch(randn(*latents), randn(*latents), torch.randint(0, 1000, (shape.batch,), generator=generator)
                       .to(device), randn(shape.batch, shape.caption_tokens, shape.caption_channels),
                       caption_mask.to(device))


def has_diffusers() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def build_model(shape: PixArtShape, processors: str, device: torch.device, dtype: torch.dtype):
    """The seeded model (the same weights for both), with tfkernels' processors or diffusers' defaults."""
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs
        model = diffusers.PixArtTransformer2DModel(**shape.model_config())
    if dtype != torch.float32:
        model = model.to(dtype)
    if processors == "tfkernels":
        from tfkernels.integrations import diffusers as integration

        integration.apply(model)
    return model.train()


def loss(model, data: PixArtBatch) -> torch.Tensor:
    sample = model(data.noisy, encoder_hidden_states=data.captions, encoder_attention_mask=data.caption_mask,
                   timestep=data.timesteps).sample
    return F.mse_loss(sample[:, :NOISE_CHANNELS].float(), data.noise.float())


def training_step(shape: PixArtShape, processors: str):
    def prepare(first: InputSet):
        device = first.data.noisy.device
        model = build_model(shape, processors, device, first.data.noisy.dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(inputs):
            value = loss(model, inputs.data)
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return value

        return step

    return prepare


def unavailable(device: torch.device, mode: str) -> str | None:
    return None if has_diffusers() else MISSING_DIFFUSERS


def workloads(quick: bool, device: torch.device) -> list[Workload]:
    shape = shape_for(quick)
    dtype = bench_dtype(device)

    def setup(device: torch.device, seed: int) -> InputSet:
        return InputSet(batch(shape, device, seed, dtype))

    def work(mode: str) -> Work:
        return Work(flops=shape.flops(), tokens=shape.batch * shape.image_tokens)

    implementations = [
        Implementation("tfkernels", training_step(shape, "tfkernels"), unavailable=unavailable,
                       backend=lambda device: f"diffusers + {tfkernels_backend(device)}"),
        Implementation("default", training_step(shape, "default"), unavailable=unavailable,
                       backend="diffusers AttnProcessor2_0, SDPA, additive padding bias"),
    ]
    return [Workload(suite=SUITE, name="hf_pixart_alpha_train_step", shape=shape.describe(dtype), dtype=dtype,
                     setup=setup, implementations=implementations, modes=(MODE,), work=work)]
