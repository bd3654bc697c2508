"""The model's configuration: checks naming the bad field, derived defaults, the package's int check,
the diffusion modes (continuous-time flow fields, how a flow model reads the packer's integer draws)."""

import dataclasses
import json
import math
import statistics

import pytest
import torch

import tfkernels as tk
import transfusion_core as tc
from tfkernels.schedule import flow_time_cdf
from transfusion_core.config import FLOW_DEFAULTS, continuous_times, is_int, noise_schedule

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
        (dict(diffusion_target="flow"), r"TransfusionConfig.diffusion_target: expected 'eps', 'v' or 'x0' unless"),
        (dict(noise_schedule="flow"), r"TransfusionConfig.diffusion_target: expected 'flow', 'v' or 'x0' with "
                                      r"noise_schedule='flow' \(sampling starts at t = 1"),
        (dict(flow_shift=3.0), r"TransfusionConfig.flow_shift: expected 1.0: the flow_\* fields apply to "
                               r"noise_schedule='flow' only, got 3.0"),
        (dict(flow_time_distribution="uniform"), r"TransfusionConfig.flow_time_distribution: expected 'logit_normal'"),
        (dict(noise_schedule="flow", diffusion_target="flow", flow_time_distribution="uniform", flow_time_std=2.0),
         r"TransfusionConfig.flow_time_std: expected the default with flow_time_distribution='uniform'"),
        (dict(noise_schedule="flow", diffusion_target="flow", flow_shift=0.0),
         r"TransfusionConfig.flow_shift: expected a finite float > 0, got 0.0"),
        (dict(noise_schedule="flow", diffusion_target="flow", flow_time_distribution="beta"),
         r"TransfusionConfig.flow_time_distribution: expected one of \('uniform', 'logit_normal'\)"),
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


@pytest.mark.parametrize("field, value, message", [
    ("n_layers", True, r"TransfusionConfig.n_layers: expected an int in \[1, 2147483647\], got True"),
    ("dim", 32.0, r"TransfusionConfig.dim: expected an int in \[1, 2147483647\], got 32.0"),
    ("vocab_size", "260", r"TransfusionConfig.vocab_size: expected an int"),
    ("n_kv_heads", 2.0, r"TransfusionConfig.n_kv_heads: expected an int in \[1, 2147483647\]"),
    ("ffn_dim", "64", r"TransfusionConfig.ffn_dim: expected an int in \[1, 2147483647\]"),
    ("bos_id", None, r"TransfusionConfig.bos_id: expected an int"),
    ("norm_eps", "1e-5", r"TransfusionConfig.norm_eps: expected a finite float > 0, got '1e-5'"),
    ("rope_theta", None, r"TransfusionConfig.rope_theta: expected a finite float > 0, got None"),
    ("diffusion_loss_weight", "5", r"TransfusionConfig.diffusion_loss_weight: expected a finite float"),
    ("tie_embeddings", 1, r"TransfusionConfig.tie_embeddings: expected a bool, got 1"),
    ("patch_position_embedding", "yes", r"TransfusionConfig.patch_position_embedding: expected a bool, got 'yes'"),
    ("image_encoder", None, r"TransfusionConfig.image_encoder: expected a str"),
    ("noise_schedule", 3, r"TransfusionConfig.noise_schedule: expected a str"),
    ("diffusion_target", ["eps"], r"TransfusionConfig.diffusion_target: expected a str"),
    ("unet_channels", "ab", r"TransfusionConfig.unet_channels: expected a tuple of ints, got 'ab'"),
    ("unet_channels", (8, 16.0), r"TransfusionConfig.unet_channels\[1\]: expected an int in \[1, 2147483647\], got 16.0"),
])
def test_a_field_of_the_wrong_type_raises_type_error_naming_it(field, value, message):
    with pytest.raises(TypeError, match=message):
        tiny_config(**{field: value})


@pytest.mark.parametrize("field, value, message", [
    ("dim", 0, r"TransfusionConfig.dim: expected an int in \[1, 2147483647\], got 0"),
    ("norm_eps", 0.0, r"TransfusionConfig.norm_eps: expected a finite float > 0, got 0.0"),
    ("norm_eps", float("nan"), r"TransfusionConfig.norm_eps: expected a finite float > 0, got nan"),
    ("rope_theta", -1.0, r"TransfusionConfig.rope_theta: expected a finite float > 0"),
    ("diffusion_loss_weight", float("inf"), r"TransfusionConfig.diffusion_loss_weight: expected a finite float >= 0"),
    ("diffusion_loss_weight", -1, r"TransfusionConfig.diffusion_loss_weight: expected a finite float >= 0"),
    ("unet_channels", (8, 0), r"TransfusionConfig.unet_channels\[1\]: expected an int in \[1, 2147483647\], got 0"),
    ("bos_id", -1, r"TransfusionConfig.bos_id: expected a token id in \[0, vocab_size=260\)"),
    ("vocab_size", 2**70, r"TransfusionConfig.vocab_size: expected an int in \[1, 2147483647\]"),
    ("dim", 2**31, r"TransfusionConfig.dim: expected an int in \[1, 2147483647\]"),
    ("num_timesteps", 10**9, r"TransfusionConfig.num_timesteps: expected an int in \[1, 1048576\]"),
])
def test_a_field_out_of_range_raises_value_error_naming_it(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def test_replace_checks_too_and_numbers_are_stored_as_floats():
    config = tiny_config(norm_eps=1, rope_theta=500)
    assert isinstance(config.norm_eps, float) and isinstance(config.rope_theta, float)
    with pytest.raises(TypeError, match="TransfusionConfig.norm_eps"):
        dataclasses.replace(config, norm_eps="1e-5")


@pytest.mark.parametrize("kind", ["cosine", "linear", "scaled_linear", "rectified_flow", "flow"])
def test_noise_schedule_is_the_one_the_config_names(kind):
    target = "flow" if kind == "flow" else "eps"
    schedule = noise_schedule(tiny_config(noise_schedule=kind, num_timesteps=50, diffusion_target=target))
    expected = getattr(tk.NoiseSchedule, "rectified_flow" if kind == "flow" else kind)(T=50)
    t = torch.arange(50)
    for got, want in zip(schedule.coefficients(t), expected.coefficients(t)):
        assert torch.equal(got, want)


def test_flow_config_fields_and_diffusers_target_names():
    config = tiny_config(noise_schedule="flow", diffusion_target="flow", flow_time_distribution="uniform",
                         flow_shift=3)
    assert config.continuous_time and isinstance(config.flow_shift, float) and config.flow_shift == 3.0
    assert not tiny_config().continuous_time and not tiny_config(noise_schedule="rectified_flow").continuous_time
    assert {f: getattr(tiny_config(), f) for f in FLOW_DEFAULTS} == FLOW_DEFAULTS
    fields = json.loads(json.dumps(dataclasses.asdict(config)))
    assert tc.TransfusionConfig(**fields) == config
    for alias, target in (("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0")):
        assert tiny_config(diffusion_target=alias).diffusion_target == target  # stored under our name
    with pytest.raises(TypeError, match="TransfusionConfig.flow_time_mean: expected a finite float"):
        tiny_config(noise_schedule="flow", diffusion_target="v", flow_time_mean="0")


def test_continuous_times_read_integer_draws_as_quantiles():
    """t = F^-1((k + u) / T): uniform integer draws k give exactly the config's time distribution,
    and a cap k <= c keeps t at most the (c + 1) / T quantile."""
    config = tiny_config(noise_schedule="flow", diffusion_target="flow", flow_shift=3.0)
    steps = torch.randint(0, config.num_timesteps, (20000,), generator=torch.Generator().manual_seed(0))
    t = continuous_times(steps, seed=5, config=config)
    assert t.dtype == torch.float32 and ((t >= 0) & (t <= 1)).all()
    assert torch.equal(t, continuous_times(steps, seed=5, config=config))
    assert not torch.equal(t, continuous_times(steps, seed=6, config=config))
    quantile = flow_time_cdf(t.double(), "logit_normal", 0.0, 1.0, 3.0)
    assert ((quantile * config.num_timesteps).floor() == steps).float().mean() > 0.999, "each t in its quantile bin"
    # Kolmogorov-Smirnov against the uniform distribution of the quantiles: P(sqrt(n) D > 1.95) ~ 1e-3.
    sorted_q = quantile.sort().values
    n = sorted_q.numel()
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (ranks - sorted_q).abs().max() < 1.95 / n**0.5
    # Draws k = 500 (the paper's cap): t in [F^-1(0.5), F^-1(0.501)), the shifted logit-normal quantiles.
    capped = continuous_times(torch.full((1000,), 500), seed=1, config=config).double()

    def shifted(u):
        return 3 * u / (1 + 2 * u)

    low, high = shifted(0.5), shifted(1 / (1 + math.exp(-statistics.NormalDist().inv_cdf(0.501))))
    assert capped.min() >= low - 1e-7 and capped.max() < high + 1e-7 and capped.max() > low + 0.9 * (high - low)
