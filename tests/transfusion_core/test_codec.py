"""Image codecs: pixels as the latent, and a tiny diffusers AutoencoderKL from a local directory with
its latents cached."""

import pytest
import torch

from transfusion_core import codec
from transfusion_core.datasets import ShapesDataset


def test_pixel_codec_is_the_identity_within_the_pixel_range():
    pixels = codec.PixelCodec()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert pixels.encode(images) is images
    assert torch.equal(pixels.decode(images), images)
    assert torch.equal(pixels.decode(torch.tensor([-3.0, 0.5, 2.0])), torch.tensor([-1.0, 0.5, 1.0]))
    assert (pixels.latent_channels, pixels.downsample, pixels.clip_x0) == (3, 1, 1.0)


def test_codec_from_description_rebuilds_the_codec(vae_dir):
    assert isinstance(codec.codec_from_description(None), codec.PixelCodec)
    assert isinstance(codec.codec_from_description(codec.PixelCodec().describe()), codec.PixelCodec)
    vae = codec.codec_from_description(codec.VAECodec(vae_dir).describe())
    assert isinstance(vae, codec.VAECodec) and vae.path == vae_dir.resolve()
    with pytest.raises(ValueError, match="codec: unknown description"):
        codec.codec_from_description({"kind": "jpeg"})


def test_latents_are_encoded_once_then_read_from_the_cache(vae_dir, tmp_path, monkeypatch):
    vae = codec.VAECodec(vae_dir, batch_size=4)
    assert (vae.latent_channels, vae.downsample, vae.clip_x0) == (4, 2, None)
    dataset = ShapesDataset(6, seed=0)
    latents = codec.encode_dataset(vae, dataset, tmp_path, log=lambda line: None)
    assert latents.shape == (6, 4, 8, 8)
    images = torch.stack([dataset[i].image for i in range(6)])
    torch.testing.assert_close(latents, vae.encode(images))
    assert vae.decode(latents).shape == (6, 3, 16, 16)

    def no_encoding(images):
        raise AssertionError("encoded again instead of reading the cache")

    monkeypatch.setattr(vae, "encode", no_encoding)
    lines = []
    assert torch.equal(codec.encode_dataset(vae, dataset, tmp_path, log=lines.append), latents)
    assert lines and "cached" in lines[0]
    other = ShapesDataset(6, seed=1)  # other images: another cache entry, so it must encode
    with pytest.raises(AssertionError, match="encoded again"):
        codec.encode_dataset(vae, other, tmp_path, log=lambda line: None)


def test_a_missing_vae_directory_is_named(tmp_path):
    pytest.importorskip("diffusers")
    with pytest.raises(FileNotFoundError, match="path"):
        codec.VAECodec(tmp_path)
