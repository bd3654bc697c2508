"""tfkernels.schedule: NoiseSchedule against values from independent sources, and the targets.

Independent values: ᾱ_t of the paper's closed forms evaluated with mpmath at 30 digits (cosine:
Nichol & Dhariwal's ᾱ(t) = f(t)/f(0); linear: the product of DDPM's betas), and diffusers' own
float32 tables, hard-coded here (and, where diffusers is installed, compared in full).
"""

import math

import pytest
import torch

import tfkernels as tk
from tests.support import DIFFUSERS_ALPHAS_CUMPROD
from tfkernels import reference
from tfkernels.schedule import TARGETS, NoiseSchedule, check_target, target_coefficients

T = 1000
# Relative error bound of a float32 cumulative product of T float32 factors, each factor itself
# rounded once: (2T + 2) unit roundoffs.
CUMPROD_RTOL = (2 * T + 2) * 2.0**-24
# ᾱ_t from the paper's formulas, evaluated with mpmath at 30 digits (rounded to 12).
COSINE_HAND = {0: 0.999958715775, 1: 0.999912575927, 499: 0.493843590441, 999: 2.42876690703e-9}
LINEAR_HAND = {0: 0.9999, 1: 0.999780092072, 499: 0.0785872428818, 999: 4.03582976538e-5}


def test_one_class_everywhere():
    assert tk.NoiseSchedule is NoiseSchedule is reference.NoiseSchedule
    assert TARGETS == ("eps", "v", "x0", "flow")


@pytest.mark.parametrize("t", [0, 1, 499, 999])
def test_cosine_schedule_values(t):
    schedule = NoiseSchedule.cosine(T)
    acp = schedule.alphas_cumprod
    assert acp.dtype == torch.float32 and acp.shape == (T,)
    assert acp[t].item() == pytest.approx(COSINE_HAND[t], rel=CUMPROD_RTOL)
    a, b = schedule.coefficients(torch.tensor([t]))
    assert a.dtype == b.dtype == torch.float32
    assert a.item() == pytest.approx(math.sqrt(COSINE_HAND[t]), rel=CUMPROD_RTOL)
    # b comes from the float32 ᾱ table (as in diffusers): 1 - ᾱ is exact only to ᾱ's rounding,
    # and b itself is rounded to float32.
    assert b.item() ** 2 == pytest.approx(1 - COSINE_HAND[t], abs=CUMPROD_RTOL * COSINE_HAND[t] + 2.0**-23)
    assert b.item() == pytest.approx(math.sqrt(1 - acp[t].item()), rel=2.0**-23)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_equals_diffusers_float32_table(kind):
    """diffusers' DDPMScheduler tables (hard-coded): float32 betas, float32 cumulative product; the
    cosine's last beta is the one clipped at 0.999 (ᾱ_999 = 0.001 ᾱ_998)."""
    acp = getattr(NoiseSchedule, kind)(T).alphas_cumprod
    for t, expected in DIFFUSERS_ALPHAS_CUMPROD[kind].items():
        assert acp[t].item() == pytest.approx(expected, rel=2.0**-23), t
    if kind == "cosine":
        assert acp[999].item() / acp[998].item() == pytest.approx(0.001, rel=1e-4), "the last step is the clipped one"


@pytest.mark.parametrize("kind, beta_schedule", [("cosine", "squaredcos_cap_v2"), ("linear", "linear")])
def test_schedule_matches_installed_diffusers(kind, beta_schedule):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule)
    torch.testing.assert_close(getattr(NoiseSchedule, kind)(T).alphas_cumprod, scheduler.alphas_cumprod,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [0, 1, 499, 999])
def test_linear_schedule_values(t):
    schedule = NoiseSchedule.linear(T)
    acp = schedule.alphas_cumprod[t].item()
    assert acp == pytest.approx(LINEAR_HAND[t], rel=CUMPROD_RTOL)
    a, b = schedule.coefficients(torch.tensor([t]))
    assert a.item() ** 2 + b.item() ** 2 == pytest.approx(1.0, abs=4e-7)


@pytest.mark.parametrize("t, s", [(0, 0.001), (1, 0.002), (499, 0.5), (999, 1.0)])
def test_rectified_flow_schedule_values(t, s):
    schedule = NoiseSchedule.rectified_flow(T)
    assert schedule.kind == "flow" and schedule.alphas_cumprod is None and schedule.num_timesteps == T
    a, b = schedule.coefficients(torch.tensor([t]))
    assert a.item() == pytest.approx(1 - s, abs=1e-7) and b.item() == pytest.approx(s, abs=1e-7)


def test_schedule_to_device_and_coefficient_shapes():
    schedule = NoiseSchedule.cosine(50).to("cpu")
    assert schedule.device == torch.device("cpu") and schedule.alphas_cumprod.device.type == "cpu"
    a, b = schedule.coefficients(torch.tensor([[3, 4], [5, 49]]))
    assert a.shape == b.shape == (2, 2)
    with pytest.raises(ValueError, match=r"t: expected values in \[0, 49\]"):
        schedule.coefficients(torch.tensor([50]))
    with pytest.raises(TypeError, match="t: expected integer timesteps"):
        schedule.coefficients(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="T: expected an int >= 1"):
        NoiseSchedule.linear(0)
    # A wrong type is a TypeError (it was a ValueError before the one rule).
    with pytest.raises(TypeError, match="T: expected an int >= 1, got 10.0"):
        NoiseSchedule.cosine(10.0)
    assert "kind='cosine', num_timesteps=50" in repr(schedule)


def test_sample_timesteps_range_uniformity_and_per_image_cap():
    schedule = NoiseSchedule.cosine(10)
    gen = torch.Generator().manual_seed(0)
    t = schedule.sample_timesteps(20000, generator=gen)
    assert t.dtype == torch.int64 and t.shape == (20000,)
    counts = torch.bincount(t, minlength=10).double()
    assert counts.numel() == 10, "values stay in [0, T - 1]"
    # Chi-square with 9 degrees of freedom: P(X > 40) < 1e-5.
    assert ((counts - 2000) ** 2 / 2000).sum() < 40
    cap = torch.tensor([0, 4, 9] * 3000)
    capped = schedule.sample_timesteps(cap.shape[0], t_max=cap, generator=gen)
    assert (capped <= cap).all() and (capped >= 0).all()
    assert set(capped[cap == 4].tolist()) == set(range(5)), "every value up to the cap occurs"
    assert schedule.sample_timesteps(100, t_max=3).max() <= 3
    again = schedule.sample_timesteps(50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again, schedule.sample_timesteps(50, generator=torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="t_max: expected an int in"):
        schedule.sample_timesteps(4, t_max=10)
    with pytest.raises(ValueError, match=r"t_max: expected values in \[0, 9\]"):
        schedule.sample_timesteps(2, t_max=torch.tensor([3, 12]))


@pytest.mark.parametrize("call, error, message", [
    (lambda s: s.sample_timesteps(-1), ValueError, r"n: expected an int >= 0, got -1"),
    # Wrong types are TypeErrors (they were ValueErrors before the one rule).
    (lambda s: s.sample_timesteps(2.0), TypeError, r"n: expected an int >= 0, got 2.0"),
    (lambda s: s.sample_timesteps(2, t_max=3.0), TypeError, r"t_max: expected an int in \[0, 9\], got 3.0"),
    (lambda s: s.sample_timesteps(2, t_max=torch.tensor([3.0, 4.0])), TypeError, r"t_max: expected an int tensor \[2\]"),
    (lambda s: s.sample_timesteps(2, t_max=torch.tensor([3, 4, 5])), ValueError,
     r"t_max: expected an int tensor \[2\], got shape \(3,\)"),
])
def test_sample_timesteps_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call(NoiseSchedule.cosine(10))


def test_target_coefficients_and_check_target():
    a, b = torch.tensor([0.6, 0.8]), torch.tensor([0.8, 0.6])
    expected = {"eps": ([0, 0], [1, 1]), "x0": ([1, 1], [0, 0]), "v": ([-0.8, -0.6], [0.6, 0.8]),
                "flow": ([-1, -1], [1, 1])}
    for target in TARGETS:
        c_x0, c_noise = target_coefficients(target, a, b)
        torch.testing.assert_close(c_x0, torch.tensor(expected[target][0], dtype=torch.float32))
        torch.testing.assert_close(c_noise, torch.tensor(expected[target][1], dtype=torch.float32))
    with pytest.raises(ValueError, match="target: expected one of"):
        target_coefficients("score", a, b)
    assert check_target("flow", NoiseSchedule.rectified_flow(4)) == "flow"
    with pytest.raises(ValueError, match="target: 'flow' needs NoiseSchedule.rectified_flow"):
        check_target("flow", NoiseSchedule.cosine(4))
    with pytest.raises(TypeError, match="target: expected a str, one of"):
        check_target(None, NoiseSchedule.cosine(4))
