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
    with pytest.raises(ValueError, match=r"T: expected an int in \[1, 1048576\], got 0"):
        NoiseSchedule.linear(0)
    # A wrong type is a TypeError (it was a ValueError before the one rule).
    with pytest.raises(TypeError, match=r"T: expected an int in \[1, 1048576\], got 10.0"):
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
    (lambda s: s.sample_timesteps(-1), ValueError, r"n: expected an int in \[0, 2147483647\], got -1"),
    (lambda s: s.sample_timesteps(2**62), ValueError, r"n: expected an int in \[0, 2147483647\]"),
    # Wrong types are TypeErrors (they were ValueErrors before the one rule).
    (lambda s: s.sample_timesteps(2.0), TypeError, r"n: expected an int in \[0, 2147483647\], got 2.0"),
    (lambda s: s.sample_timesteps(2, t_max=3.0), TypeError, r"t_max: expected an int in \[0, 9\], got 3.0"),
    (lambda s: s.sample_timesteps(2, t_max=torch.tensor([3.0, 4.0])), TypeError, r"t_max: expected an int tensor \[2\]"),
    (lambda s: s.sample_timesteps(2, t_max=torch.tensor([3, 4, 5])), ValueError,
     r"t_max: expected an int tensor \[2\], got shape \(3,\)"),
    (lambda s: s.sample_timesteps(2, generator=5), TypeError, "generator: expected a torch.Generator or None, got int"),
    (lambda s: s.sample_timesteps(2, device=1.5), TypeError, "device: expected a torch.device, a str or an int"),
    (lambda s: s.sample_timesteps(2, device="bogus"), ValueError, "device: expected a device, got 'bogus'"),
    (lambda s: s.sample_timesteps(2, device=-1), ValueError, "device: expected a device, got -1"),
    (lambda s: s.sample_timesteps(2, device="meta", generator=torch.Generator()), ValueError,
     "device: expected the generator's device type 'cpu', got meta"),
    (lambda s: s.to("bogus"), ValueError, "device: expected a device, got 'bogus'"),
    (lambda s: s.to(None), TypeError, "device: expected a torch.device, a str or an int, got NoneType"),
    # Timesteps that are not integers, in any container: a named TypeError, not torch's own.
    (lambda s: s.coefficients(None), TypeError, "t: expected integer timesteps"),
    (lambda s: s.coefficients("3"), TypeError, "t: expected integer timesteps"),
    (lambda s: s.coefficients([[1], [1, 2]]), TypeError, "t: expected integer timesteps"),
    (lambda s: s.coefficients(torch.tensor([True])), TypeError, "t: expected integer timesteps, got torch.bool"),
    (lambda s: s.coefficients(torch.tensor([1j])), TypeError, "t: expected integer timesteps, got torch.complex64"),
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


# ------------------------------------------------------------------------------ parameters (issue 11, item 6)
@pytest.mark.parametrize("call, error, message", [
    # Betas outside [0, 1] or not finite made tables above 1 or NaN; now a named error.
    (lambda: NoiseSchedule.linear(beta_start=-0.1), ValueError, r"beta_start: expected a finite float in \[0, 1\]"),
    (lambda: NoiseSchedule.linear(beta_end=float("inf")), ValueError, r"beta_end: expected a finite float in \[0, 1\]"),
    (lambda: NoiseSchedule.linear(beta_end=1.5), ValueError, r"beta_end: expected a finite float in \[0, 1\]"),
    (lambda: NoiseSchedule.linear(beta_start=float("nan")), ValueError, "beta_start: expected a finite float"),
    (lambda: NoiseSchedule.linear(beta_start="0.1"), TypeError, "beta_start: expected a finite float"),
    (lambda: NoiseSchedule.linear(beta_end=True), TypeError, "beta_end: expected a finite float"),
    (lambda: NoiseSchedule.cosine(max_beta=-1), ValueError, r"max_beta: expected a float in \(0, 1\], got -1"),
    (lambda: NoiseSchedule.cosine(max_beta=0.0), ValueError, r"max_beta: expected a float in \(0, 1\], got 0.0"),
    (lambda: NoiseSchedule.cosine(max_beta=1.01), ValueError, r"max_beta: expected a float in \(0, 1\]"),
    (lambda: NoiseSchedule.cosine(max_beta=None), TypeError, r"max_beta: expected a float in \(0, 1\]"),
    # T: a table the kernels index with int32, and that builds in a second at most.
    (lambda: NoiseSchedule.cosine(2**21), ValueError, r"T: expected an int in \[1, 1048576\]"),
    (lambda: NoiseSchedule.rectified_flow(2**40), ValueError, r"T: expected an int in \[1, 1048576\]"),
    (lambda: NoiseSchedule.rectified_flow(True), TypeError, "T: expected an int"),
])
def test_constructor_parameters_are_checked(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_extreme_valid_parameters_give_tables_in_range():
    for schedule in (NoiseSchedule.linear(5, 0.0, 1.0), NoiseSchedule.linear(3, 1.0, 0.0), NoiseSchedule.linear(1),
                     NoiseSchedule.cosine(1), NoiseSchedule.cosine(7, max_beta=1.0), NoiseSchedule.rectified_flow(1)):
        for table in (schedule.signal_scale, schedule.noise_scale):
            assert table.dtype == torch.float32 and torch.isfinite(table).all()
            assert ((table >= 0) & (table <= 1)).all()


def _tables(T=4):
    flow = NoiseSchedule.rectified_flow(T)
    return flow.signal_scale, flow.noise_scale


@pytest.mark.parametrize("args, error, message", [
    (("diffusion", *_tables()), ValueError, r"kind: expected one of \('cosine', 'linear', 'scaled_linear', 'flow'\), got 'diffusion'"),
    ((None, *_tables()), TypeError, "kind: expected a str"),
    (("flow", _tables()[0], _tables(5)[1]), ValueError, r"noise_scale: expected shape \(4,\) on cpu \(as signal_scale\)"),
    (("flow", [1.0, 0.5], torch.ones(2)), TypeError, r"signal_scale: expected a float32 tensor \[T\], got list"),
    (("flow", _tables()[0].double(), _tables()[1]), TypeError, "signal_scale: expected a float32 tensor .T., got torch.float64"),
    (("flow", torch.ones(2, 2), torch.ones(2, 2)), ValueError, r"signal_scale: expected a float32 tensor .T. with 1 <= T"),
    (("flow", torch.ones(0), torch.ones(0)), ValueError, r"signal_scale: expected a float32 tensor .T. with 1 <= T"),
    (("flow", torch.tensor([1.0, 2.0]), torch.ones(2)), ValueError, r"signal_scale: expected values in \[0, 1\], got signal_scale\[1\] = 2.0"),
    (("flow", torch.ones(2), torch.tensor([0.5, float("nan")])), ValueError, r"noise_scale\[1\] = nan"),
    (("flow", torch.ones(2), torch.tensor([-0.5, 0.5])), ValueError, r"noise_scale\[0\] = -0.5"),
    (("flow", *_tables(), torch.ones(4)), ValueError, "alphas_cumprod: expected None for a 'flow' schedule"),
    (("cosine", *_tables()), ValueError, "alphas_cumprod: expected a float32 tensor .T. for a 'cosine' schedule, got None"),
    (("linear", *_tables(), torch.ones(3)), ValueError, r"alphas_cumprod: expected shape \(4,\)"),
])
def test_raw_constructor_checks_kind_and_tables(args, error, message):
    with pytest.raises(error, match=message):
        NoiseSchedule(*args)


def test_raw_constructor_accepts_a_valid_schedule_s_tables():
    for schedule in (NoiseSchedule.cosine(20), NoiseSchedule.linear(20), NoiseSchedule.rectified_flow(20)):
        again = NoiseSchedule(schedule.kind, schedule.signal_scale, schedule.noise_scale, schedule.alphas_cumprod)
        assert again.num_timesteps == 20 and again.kind == schedule.kind
        assert torch.equal(again.coefficients([0, 19])[1], schedule.coefficients([0, 19])[1])
