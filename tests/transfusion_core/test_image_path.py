"""The image path's layers: where each image's patches lie, and encoders that keep images apart."""

import pytest
import torch

import transfusion_core as tc
from transfusion_core.image_path import (
    ImageLayout,
    LinearPatches,
    TimestepEmbedding,
    UNetPatches,
    patch_position_embedding,
)

# Three images: a 2x2, a 1x2 and another 2x2 patch grid, packed in one buffer of 10 patches.
LAYOUT = ImageLayout(torch.tensor([0, 4, 6, 10]), torch.tensor([[2, 2], [1, 2], [2, 2]]))


def test_layout_knows_each_patch_image_and_groups_images_by_grid():
    assert LAYOUT.num_images == 3
    assert LAYOUT.patch_image_index().tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    groups = {grid: (images.tolist(), patches.tolist()) for grid, images, patches in LAYOUT.groups_by_grid()}
    assert groups == {(1, 2): ([1], [[4, 5]]), (2, 2): ([0, 2], [[0, 1, 2, 3], [6, 7, 8, 9]])}


def test_patch_position_embedding_depends_on_row_and_column_only():
    emb = patch_position_embedding(LAYOUT, 16)  # [P, D]
    assert emb.shape == (10, 16)
    torch.testing.assert_close(emb[0:4], emb[6:10])  # same grid, same positions
    torch.testing.assert_close(emb[4:6], emb[0:2])  # row 0 of a 1x2 grid = row 0 of a 2x2 grid
    assert not torch.allclose(emb[0], emb[1]) and not torch.allclose(emb[0], emb[2])
    quarter = 16 // 4
    assert (emb[0, :quarter] == 0).all() and (emb[0, quarter : 2 * quarter] == 1).all()  # row 0: sin 0, cos 0


@pytest.mark.parametrize("encoder", [LinearPatches, UNetPatches])
def test_encoders_keep_images_apart_and_restore_the_patch_shape(encoder):
    torch.manual_seed(0)
    config = tc.TransfusionConfig(dim=32, n_layers=1, n_heads=4, image_size=4, patch_size=2,
                                  image_encoder="unet" if encoder is UNetPatches else "linear", unet_channels=(8, 16))
    layers, time_embedding = encoder(config), TimestepEmbedding(config.dim)
    x_t = torch.randn(10, config.patch_dim)  # [P, C*p*p]
    time_emb = time_embedding(torch.tensor([3, 500, 999]))  # [N, D]
    tokens, skips = layers.encode(x_t, time_emb, LAYOUT)
    out = layers.decode(tokens, time_emb, LAYOUT, skips)
    assert tokens.shape == (10, config.dim) and out.shape == x_t.shape
    # Image 1 alone gives the same tokens and outputs as inside the packed buffer.
    alone = ImageLayout(torch.tensor([0, 2]), torch.tensor([[1, 2]]))
    tokens_1, skips_1 = layers.encode(x_t[4:6], time_emb[1:2], alone)
    torch.testing.assert_close(tokens_1, tokens[4:6])
    torch.testing.assert_close(layers.decode(tokens[4:6], time_emb[1:2], alone, skips_1), out[4:6])
    # Changing another image's patches changes nothing of image 1.
    x_other = x_t.clone()
    x_other[0:4] += 1
    tokens_other, _ = layers.encode(x_other, time_emb, LAYOUT)
    torch.testing.assert_close(tokens_other[4:], tokens[4:])
    assert not torch.allclose(tokens_other[:4], tokens[:4])


def test_timestep_embedding_of_float_times_is_that_of_the_scaled_step():
    """A continuous-time model embeds t in [0, 1] as t * T: t = 0.25 with T = 1000 is step 250's
    embedding, so the frequencies span the same range as the integer steps'."""
    torch.manual_seed(0)
    by_step = TimestepEmbedding(16)
    by_time = TimestepEmbedding(16, time_scale=1000.0)
    by_time.load_state_dict(by_step.state_dict())
    steps = torch.tensor([0, 250, 999])
    torch.testing.assert_close(by_time(torch.tensor([0.0, 0.25, 0.999])), by_step(steps), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(by_time(torch.tensor([0.25])), by_time(torch.tensor([0.2501])), atol=1e-7)
    model = tc.Transfusion(tc.TransfusionConfig(dim=32, n_heads=4, noise_schedule="flow", diffusion_target="flow",
                                                num_timesteps=500))
    assert model.time_embedding.time_scale == 500
    assert tc.Transfusion(tc.TransfusionConfig(dim=32, n_heads=4)).time_embedding.time_scale == 1.0
