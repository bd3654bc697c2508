"""Training on VAE latents: a tiny diffusers AutoencoderKL from a local directory, latents cached."""

import pytest
import torch

from transfusion_core import codec, evaluate, train
from transfusion_core.datasets import ShapesDataset

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()  # the runs below set one thread
    yield
    torch.set_num_threads(threads)


pytestmark = pytest.mark.usefixtures("reference_path")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A randomly initialised 2-level AutoencoderKL (16x16 RGB -> 4x8x8), saved the diffusers way."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


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
    with pytest.raises(FileNotFoundError, match="path"):
        codec.VAECodec(tmp_path)


def test_training_and_evaluation_on_vae_latents(vae_dir, tmp_path):
    out = tmp_path / "run"
    train.main(["--out", str(out), "--vae", str(vae_dir), "--patch-size", "2", "--train-samples", "16",
                "--heldout-samples", "2", "--dim", "32", "--n-layers", "2", "--n-heads", "2", "--batch-size", "4",
                "--steps", "2", "--no-plots", "--threads", "1"])
    state = evaluate.read_train_state(out / "checkpoint")
    assert state["codec"] == {"kind": "vae", "path": str(vae_dir.resolve())}
    assert len(list((out / "latents").glob("latents-*.safetensors"))) == 1
    results = evaluate.main([str(out / "checkpoint"), "--image-steps", "2", "--threads", "1"])
    assert results["samples"] == 2 and 0 <= results["text_to_image"]["exact"] <= 1
