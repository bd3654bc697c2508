"""The model's configuration: checks naming the bad field, derived defaults, the package's int check."""

import dataclasses
import json

import pytest
import torch

import tfkernels as tk
import transfusion_core as tc
from transfusion_core.config import is_int, noise_schedule

from .support import tiny_config

UNET_PATCH_3 = dict(image_encoder="unet", patch_size=3, image_size=6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dim=30), r"TransfusionConfig.n_heads: expected a divisor of dim=30"),
        (dict(n_kv_heads=3), r"TransfusionConfig.n_kv_heads: expected a divisor of n_heads=4"),
        (dict(image_encoder="vae"), r"TransfusionConfig.image_encoder: expected one of"),
        (UNET_PATCH_3, r"TransfusionConfig.patch_size: expected a power of 2,"),
        (dict(image_encoder="unet", patch_size=4), r"TransfusionConfig.unet_channels: expected 3 positive ints"),
        (dict(eoi_id=256), r"TransfusionConfig.boi_id: expected bos_id, eos_id, boi_id and eoi_id all different"),
        (dict(vocab_size=100), r"TransfusionConfig.bos_id: expected a token id in \[0, vocab_size=100\)"),
        (dict(diffusion_target="noise"), r"TransfusionConfig.diffusion_target: expected one of"),
        (dict(image_size=5), r"TransfusionConfig.image_size: expected a multiple of patch_size=2"),
    ],
)
def test_bad_config_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_derived_defaults_and_a_json_round_trip():
    config = tc.TransfusionConfig(dim=96, n_heads=4, unet_channels=[8, 16])
    assert config.n_kv_heads == 4 and config.head_dim == 24 and config.patch_dim == 3 * 2 * 2
    assert config.ffn_dim == 256  # 8/3 * 96 = 256, a multiple of 32 already
    assert tc.TransfusionConfig(dim=112, n_heads=4).ffn_dim == 320  # 298.7 rounded up to a multiple of 32
    assert config.unet_channels == (8, 16)  # JSON gives a list: stored as a tuple
    fields = json.loads(json.dumps(dataclasses.asdict(config)))
    assert tc.TransfusionConfig(**fields) == config


@pytest.mark.parametrize("value, low, high, expected", [
    (3, None, None, True), (3, 3, 3, True), (2, 3, None, False), (4, None, 3, False),
    (True, None, None, False), (3.0, None, None, False), ("3", None, None, False), (torch.tensor(3), None, None, False),
])
def test_is_int_takes_ints_only_and_checks_the_bounds(value, low, high, expected):
    assert is_int(value, low, high) is expected


def test_bool_and_float_sizes_are_rejected():
    with pytest.raises(ValueError, match=r"TransfusionConfig.n_layers: expected an int >= 1, got True"):
        tiny_config(n_layers=True)
    with pytest.raises(ValueError, match=r"TransfusionConfig.dim: expected an int >= 1, got 32.0"):
        tiny_config(dim=32.0)


@pytest.mark.parametrize("kind", ["cosine", "linear", "rectified_flow"])
def test_noise_schedule_is_the_one_the_config_names(kind):
    schedule = noise_schedule(tiny_config(noise_schedule=kind, num_timesteps=50))
    expected = getattr(tk.NoiseSchedule, kind)(T=50)
    t = torch.arange(50)
    for got, want in zip(schedule.coefficients(t), expected.coefficients(t)):
        assert torch.equal(got, want)
