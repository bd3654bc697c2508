"""Fixtures of the transfusion_core tests: a tiny VAE for the codec and the training script."""

import pytest
import torch


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A randomly initialised 2-level AutoencoderKL (16x16 RGB -> 4x8x8), saved the diffusers way."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path
