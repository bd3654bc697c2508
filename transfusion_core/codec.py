"""Image codecs: what the model sees as an image's latent.

- ``PixelCodec`` (the default): the pixels themselves, ``[3, H, W]`` in [-1, 1]. Nothing to
  download or encode, and generated latents can be clipped to [-1, 1] while sampling.
- ``VAECodec``: a ``diffusers`` ``AutoencoderKL`` loaded from a local directory (the extra
  ``pip install 'tfkernels[vae]'``). Images are encoded once, to the posterior mean scaled by
  the VAE's ``scaling_factor``, and cached on disk (``encode_dataset``).

A codec has ``latent_channels``, ``downsample`` (image side / latent side), ``clip_x0`` (the
bound to clip predicted latents to while sampling, or ``None``), ``encode(images [N, 3, H, W])``,
``decode(latents [N, C, h, w])`` and ``describe()`` (a JSON-able record to rebuild it with
``codec_from_description``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class PixelCodec:
    """Pixel space as the latent: encode and decode are the identity."""

    latent_channels = 3
    downsample = 1
    clip_x0 = 1.0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)

    def describe(self) -> dict:
        return {"kind": "pixels"}


class VAECodec:
    """A ``diffusers.AutoencoderKL`` from a local directory (``save_pretrained`` layout).

    Args:
        path: the VAE directory (``config.json`` and weights); nothing is downloaded.
        device: where the VAE runs.
        batch_size: images per encode/decode call.
    """

    clip_x0 = None  # latents are unbounded

    def __init__(self, path, *, device="cpu", batch_size: int = 32):
        try:
            from diffusers import AutoencoderKL
        except ImportError as error:
            raise ImportError("VAECodec needs diffusers: pip install 'tfkernels[vae]'") from error
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"path: {self.path} is not a diffusers AutoencoderKL directory (no config.json)")
        self.vae = AutoencoderKL.from_pretrained(str(self.path), local_files_only=True).to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [-1, 1] -> latents ``[N, C, H/f, W/f]`` float32 on the CPU."""
        chunks = [
            self.vae.encode(chunk.to(self.device, self.vae.dtype)).latent_dist.mean * self.scaling_factor
            for chunk in images.split(self.batch_size)
        ]
        return torch.cat(chunks).float().cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, C, h, w]`` -> images ``[N, 3, h*f, w*f]`` in [-1, 1], float32 on the CPU."""
        chunks = [
            self.vae.decode(chunk.to(self.device, self.vae.dtype) / self.scaling_factor).sample
            for chunk in latents.split(self.batch_size)
        ]
        return torch.cat(chunks).float().clamp(-1, 1).cpu()

    def describe(self) -> dict:
        return {"kind": "vae", "path": str(self.path.resolve())}

    def fingerprint(self) -> str:
        """Changes when the VAE's files change (config text, weight file names, sizes, times)."""
        digest = hashlib.sha256((self.path / "config.json").read_bytes())
        for weights in sorted(self.path.glob("*.safetensors")) + sorted(self.path.glob("*.bin")):
            stat = weights.stat()
            digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:16]


def codec_from_description(description: dict | None, *, device="cpu"):
    """The codec a ``describe()`` record names (``None``: pixels)."""
    if description is None or description.get("kind") == "pixels":
        return PixelCodec()
    if description.get("kind") == "vae":
        return VAECodec(description["path"], device=device)
    raise ValueError(f"codec: unknown description {description!r}")


def encode_dataset(codec: VAECodec, dataset, cache_dir, *, log=print) -> torch.Tensor:
    """Latents ``[N, C, h, w]`` of every image of ``dataset``, encoded once and cached.

    The cache file is named by a hash of the VAE's files and of the images' pixels, so a changed
    data set or VAE is encoded again and an unchanged one is read back.
    """
    images = torch.stack([dataset[i].image for i in range(len(dataset))])  # [N, 3, H, W]
    digest = hashlib.sha256(codec.fingerprint().encode())
    digest.update(images.numpy().tobytes())  # numpy: a diffusers dependency
    cache = Path(cache_dir) / f"latents-{digest.hexdigest()[:24]}.safetensors"
    if cache.is_file():
        log(f"latents: read {len(images)} cached from {cache}")
        return load_file(str(cache))["latents"]
    latents = []
    for start in range(0, len(images), codec.batch_size):
        latents.append(codec.encode(images[start:start + codec.batch_size]))
        log(f"latents: encoded {min(start + codec.batch_size, len(images))}/{len(images)} images with the VAE")
    latents = torch.cat(latents)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial")
    save_file({"latents": latents.contiguous()}, str(partial))
    partial.replace(cache)  # a reader never sees a half-written cache
    return latents


__all__ = ["PixelCodec", "VAECodec", "codec_from_description", "encode_dataset"]
