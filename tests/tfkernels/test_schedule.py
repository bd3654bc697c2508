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
from tfkernels.schedule import (
    TARGET_ALIASES,
    TARGETS,
    NoiseSchedule,
    canonical_target,
    check_target,
    target_coefficients,
)

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


# ------------------------------------------------------------------------------ parameters
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


# ------------------------------------------------------------------------------ diffusers' names
def test_diffusers_target_names_are_aliases():
    a, b = torch.tensor([0.6, 0.8]), torch.tensor([0.8, 0.6])
    for alias, target in TARGET_ALIASES.items():
        assert canonical_target(alias) == target == check_target(alias, NoiseSchedule.cosine(4))
        for got, want in zip(target_coefficients(alias, a, b), target_coefficients(target, a, b)):
            assert torch.equal(got, want)
    assert set(TARGET_ALIASES) == {"epsilon", "v_prediction", "sample"}
    with pytest.raises(ValueError, match=r"target: expected one of \('eps', 'v', 'x0', 'flow', 'epsilon'"):
        canonical_target("velocity")


DIFFUSERS_CONFIGS = [
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),  # Stable Diffusion's
    dict(beta_schedule="scaled_linear"),  # diffusers' default betas
    dict(beta_schedule="linear", beta_start=0.0015, beta_end=0.0195, num_train_timesteps=50),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True, num_train_timesteps=7),
    dict(beta_schedule="linear", num_train_timesteps=2, rescale_betas_zero_snr=True),
    dict(),  # every default: linear, 1000 steps
]


@pytest.mark.parametrize("scheduler_class", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("options", DIFFUSERS_CONFIGS)
def test_from_diffusers_gives_diffusers_table_bit_for_bit(scheduler_class, options):
    diffusers = pytest.importorskip("diffusers")  # in the test extra
    scheduler = getattr(diffusers, scheduler_class)(**options)
    for source in (scheduler.config, scheduler, dict(scheduler.config)):
        schedule = NoiseSchedule.from_diffusers(source)
        assert torch.equal(schedule.alphas_cumprod, scheduler.alphas_cumprod), source
        assert schedule.num_timesteps == scheduler.config.num_train_timesteps
    kind = {"squaredcos_cap_v2": "cosine"}.get(scheduler.config.beta_schedule, scheduler.config.beta_schedule)
    assert schedule.kind == kind
    acp = scheduler.alphas_cumprod.double()
    torch.testing.assert_close(schedule.signal_scale, acp.sqrt().float(), rtol=0, atol=0)
    torch.testing.assert_close(schedule.noise_scale, (1 - acp).sqrt().float(), rtol=0, atol=0)
    if options.get("rescale_betas_zero_snr"):
        assert schedule.signal_scale[-1].item() == 0.0 and schedule.noise_scale[-1].item() == 1.0


def test_scaled_linear_constructor_is_diffusers_formula():
    """Independent of diffusers: betas are the squares of float32 linspace of the square roots."""
    schedule = NoiseSchedule.scaled_linear(10, 0.00085, 0.012)
    roots = [math.sqrt(0.00085) + k * (math.sqrt(0.012) - math.sqrt(0.00085)) / 9 for k in range(10)]
    expected = 1.0
    for k, root in enumerate(roots):
        expected *= 1 - root**2
        assert schedule.alphas_cumprod[k].item() == pytest.approx(expected, rel=24 * 2.0**-24)
    assert schedule.kind == "scaled_linear" and tk.NoiseSchedule.scaled_linear().num_timesteps == 1000


@pytest.mark.parametrize("config, error, message", [
    (dict(beta_schedule="sigmoid"), ValueError,
     r"scheduler_config\['beta_schedule'\]: expected one of \('squaredcos_cap_v2', 'linear', 'scaled_linear'\), "
     r"got 'sigmoid'"),
    (dict(trained_betas=[0.1, 0.2]), ValueError, "scheduler_config: trained_betas: expected None"),
    (dict(num_train_timesteps=0), ValueError, r"scheduler_config\['num_train_timesteps'\]: expected an int in \[1, "),
    (dict(num_train_timesteps=10.0), TypeError, r"scheduler_config\['num_train_timesteps'\]: expected an int"),
    (dict(beta_start=-1.0), ValueError, r"scheduler_config\['beta_start'\]: expected a finite float in \[0, 1\]"),
    (dict(beta_end="0.02"), TypeError, r"scheduler_config\['beta_end'\]: expected a finite float"),
    (dict(rescale_betas_zero_snr=1), TypeError, r"scheduler_config\['rescale_betas_zero_snr'\]: expected a bool"),
    (dict(num_train_timesteps=1, rescale_betas_zero_snr=True), ValueError,
     r"scheduler_config\['num_train_timesteps'\]: expected at least 2 with rescale_betas_zero_snr, got 1"),
])
def test_from_diffusers_bad_configs_are_named(config, error, message):
    with pytest.raises(error, match=message):
        NoiseSchedule.from_diffusers(config)


@pytest.mark.parametrize("source", [
    dict(_class_name="FlowMatchEulerDiscreteScheduler", _diffusers_version="0.30.0", num_train_timesteps=1000,
         shift=3.0),  # SD3's scheduler_config.json
    dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),  # a FlowMatch config without its name
])
def test_from_diffusers_refuses_flow_matching_configs(source):
    """A FlowMatch scheduler's config has no beta_schedule: it must not become diffusers' default linear DDPM
    table (a silently wrong schedule), but name rectified_flow."""
    with pytest.raises(ValueError, match=r"scheduler_config: a flow-matching scheduler.* NoiseSchedule.rectified_flow\(\)"):
        NoiseSchedule.from_diffusers(source)


def test_from_diffusers_refuses_a_flow_matching_scheduler():
    diffusers = pytest.importorskip("diffusers")  # in the test extra
    for scheduler in (diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), diffusers.FlowMatchHeunDiscreteScheduler()):
        for source in (scheduler, scheduler.config):
            with pytest.raises(ValueError, match="flow-matching scheduler"):
                NoiseSchedule.from_diffusers(source)


def test_from_diffusers_needs_a_config():
    with pytest.raises(TypeError, match="scheduler_config: expected a diffusers scheduler or its config .a dict., got str"):
        NoiseSchedule.from_diffusers("scheduler_config.json")


# ------------------------------------------------------------------------------ continuous flow times
FLOW = NoiseSchedule.rectified_flow(T)
EDGE_TIMES = [0.0, 1e-6, 0.5, 1 - 1e-6, 1.0]


def test_float_times_give_float32_coefficients_computed_from_t():
    t = torch.tensor(EDGE_TIMES + [0.3, 0.7], dtype=torch.float32)
    a, b = FLOW.coefficients(t)
    assert a.dtype == b.dtype == torch.float32 and a.shape == t.shape
    t64 = t.double()
    # One float32 rounding of the exact 1 - t (t itself is exact): within half an ulp of 1.
    assert ((a.double() - (1 - t64)).abs() <= 2.0**-25).all()
    assert torch.equal(b, t)
    assert (a[0], b[0], a[4], b[4]) == (1.0, 0.0, 0.0, 1.0), "t = 0 is x0, t = 1 the noise, exactly"
    assert a[1].item() < 1.0 and b[1].item() > 0.0, "t = 1e-6 still noises (float32, not bfloat16)"
    # The integer grid keeps its meaning: step k is s = (k + 1) / T.
    a_int, b_int = FLOW.coefficients(torch.tensor([499]))
    assert b_int.item() == pytest.approx(0.5, abs=1e-7) and a_int.item() == pytest.approx(0.5, abs=1e-7)


@pytest.mark.parametrize("t, schedule, error, message", [
    (torch.tensor([0.5, 1.5]), FLOW, ValueError, r"t: expected times in \[0, 1\], got t\[1\] = 1.5"),
    (torch.tensor([-1e-7]), FLOW, ValueError, r"t: expected times in \[0, 1\], got t\[0\] = -1"),
    (torch.tensor([0.1, float("nan")]), FLOW, ValueError, r"t: expected times in \[0, 1\], got t\[1\] = nan"),
    (torch.tensor([0.5], dtype=torch.float64), FLOW, TypeError,
     r"t: expected integer timesteps or float32 times in \[0, 1\], got torch.float64"),
    (torch.tensor([0.5], dtype=torch.bfloat16), FLOW, TypeError, "got torch.bfloat16"),
    (torch.tensor([0.5]), NoiseSchedule.cosine(10), TypeError,
     r"t: expected integer timesteps for a 'cosine' schedule \(float32 times in \[0, 1\] need"),
    (0.5, FLOW, TypeError, r"t: expected integer timesteps or a float32 tensor of times in \[0, 1\]"),
])
def test_bad_float_times_are_named(t, schedule, error, message):
    with pytest.raises(error, match=message):
        schedule.coefficients(t)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _closed_form_cdf(t: float, distribution: str, mean=0.0, std=1.0, shift=1.0) -> float:
    """P(T <= t), written out here from the definitions (not the library's flow_time_cdf): undo the
    shift t' = s u / (1 + (s - 1) u), i.e. u = t / (s - (s - 1) t), then the base CDF of u."""
    if t <= 0 or t >= 1:
        return 0.0 if t <= 0 else 1.0
    u = t / (shift - (shift - 1) * t)
    return u if distribution == "uniform" else _normal_cdf((math.log(u / (1 - u)) - mean) / std)


def _ks_statistic(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of ``samples`` and ``cdf``."""
    x = samples.double().sort().values.tolist()
    n = len(x)
    return max(max(abs((k + 1) / n - cdf(v)), abs(k / n - cdf(v))) for k, v in enumerate(x))


# P(sqrt(n) * D > 1.95) ~ 2 exp(-2 * 1.95**2) = 1e-3 under the null: a bound that a wrong CDF fails.
KS_BOUND = 1.95
TIME_CASES = [
    dict(distribution="uniform"),
    dict(distribution="logit_normal"),
    dict(distribution="logit_normal", mean=0.5, std=0.7),
    dict(distribution="uniform", shift=3.0),
    dict(distribution="logit_normal", shift=3.0),
    dict(distribution="logit_normal", mean=-0.3, std=1.4, shift=0.5),
]


@pytest.mark.parametrize("case", TIME_CASES)
def test_sampled_times_follow_their_closed_form_cdf(case):
    n = 4000
    t = FLOW.sample_timesteps(n, generator=torch.Generator().manual_seed(11), **case)
    assert t.dtype == torch.float32 and t.shape == (n,) and ((t >= 0) & (t <= 1)).all()
    assert _ks_statistic(t, lambda v: _closed_form_cdf(v, **case)) < KS_BOUND / math.sqrt(n)
    # The test has power: the same samples fail against another case's CDF.
    for other in TIME_CASES:
        if other != case:
            assert _ks_statistic(t, lambda v, other=other: _closed_form_cdf(v, **other)) > KS_BOUND / math.sqrt(n), \
                other
    # The library's CDF is the closed form, and its quantile function inverts it.
    grid = torch.linspace(0, 1, 101, dtype=torch.float64)
    library = tk.schedule.flow_time_cdf(grid, **case)
    expected = torch.tensor([_closed_form_cdf(v, **case) for v in grid.tolist()], dtype=torch.float64)
    torch.testing.assert_close(library, expected, rtol=0, atol=1e-12)
    # (Where the CDF is below 1e-9 its float64 value no longer pins t down to 1e-9.)
    inner = (library > 1e-9) & (library < 1 - 1e-9)
    torch.testing.assert_close(tk.schedule.flow_time_quantile(library, **case)[inner], grid[inner], rtol=0, atol=1e-9)


def test_per_image_caps_draw_from_the_truncated_distribution():
    """t <= t_max per image, distributed as the CDF conditioned on it: F(t) / F(t_max), not clamped."""
    case = dict(distribution="logit_normal", shift=2.0)
    caps = torch.tensor([0.3, 1.0, 0.75]).repeat(3000)
    t = FLOW.sample_timesteps(caps.shape[0], t_max=caps, generator=torch.Generator().manual_seed(5), **case)
    assert (t <= caps).all() and (t >= 0).all()
    for cap in (0.3, 1.0, 0.75):
        capped = t[caps == cap]
        truncated = lambda v, cap=cap: min(1.0, _closed_form_cdf(v, **case) / _closed_form_cdf(cap, **case))  # noqa: E731
        assert _ks_statistic(capped, truncated) < KS_BOUND / math.sqrt(capped.numel())
        assert capped.max() > 0.97 * cap, "mass reaches up to the cap"
    scalar = FLOW.sample_timesteps(500, t_max=0.2, generator=torch.Generator().manual_seed(5), distribution="uniform")
    assert scalar.max() <= 0.2 and scalar.max() > 0.19
    assert torch.equal(FLOW.sample_timesteps(3, t_max=0.0, distribution="uniform"), torch.zeros(3))


@pytest.mark.parametrize("t_max", [0.2, torch.tensor([0.2, 0.3], dtype=torch.float64)])
def test_float32_rounding_never_lifts_a_time_above_its_cap(t_max, monkeypatch):
    """A float64 draw just under a cap that float32 cannot hold (0.2) must not round up past it."""
    monkeypatch.setattr(torch, "rand", lambda n, **kwargs: torch.full((n,), 1 - 2.0**-40, dtype=torch.float64))
    t = FLOW.sample_timesteps(2, t_max=t_max, distribution="uniform")
    caps = torch.as_tensor(t_max, dtype=torch.float64)
    assert (t.double() <= caps).all() and (t.double() > caps - 1e-7).all(), (t.tolist(), caps)


def test_sampled_times_are_seeded_and_the_shift_maps_them():
    def draw(seed, **kwargs):
        return FLOW.sample_timesteps(64, generator=torch.Generator().manual_seed(seed), distribution="logit_normal",
                                     **kwargs)

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    base, shifted = draw(3).double(), draw(3, shift=3.0).double()
    torch.testing.assert_close(shifted, 3 * base / (1 + 2 * base), rtol=0, atol=2e-7)  # SD3's shift, per sample
    assert (shifted >= base).all(), "a shift > 1 noises more"


@pytest.mark.parametrize("call, error, message", [
    (lambda: NoiseSchedule.cosine(10).sample_timesteps(2, distribution="uniform"), ValueError,
     "distribution: continuous times need a flow schedule .NoiseSchedule.rectified_flow..., got a 'cosine' schedule"),
    (lambda: FLOW.sample_timesteps(2, distribution="beta"), ValueError,
     r"distribution: expected one of \('uniform', 'logit_normal'\), got 'beta'"),
    (lambda: FLOW.sample_timesteps(2, distribution="logit_normal", std=0.0), ValueError,
     "std: expected a finite float > 0, got 0.0"),
    (lambda: FLOW.sample_timesteps(2, distribution="logit_normal", shift=-1.0), ValueError,
     "shift: expected a finite float > 0, got -1.0"),
    (lambda: FLOW.sample_timesteps(2, distribution="logit_normal", mean=float("nan")), ValueError,
     "mean: expected a finite float"),
    (lambda: FLOW.sample_timesteps(2, distribution="logit_normal", mean="0"), TypeError, "mean: expected a finite float"),
    (lambda: FLOW.sample_timesteps(2, distribution="uniform", mean=0.5), ValueError,
     "mean, std: expected their defaults with distribution='uniform'"),
    (lambda: FLOW.sample_timesteps(2, shift=3.0), ValueError,
     "mean, std, shift: expected their defaults for integer timesteps"),
    (lambda: FLOW.sample_timesteps(2, t_max=1.5, distribution="uniform"), ValueError,
     r"t_max: expected a finite float in \[0, 1\], got 1.5"),
    (lambda: FLOW.sample_timesteps(2, t_max=torch.tensor([1, 0]), distribution="uniform"), TypeError,
     r"t_max: expected a float in \[0, 1\] or a float tensor \[2\] for continuous times, got torch.int64"),
    (lambda: FLOW.sample_timesteps(2, t_max=torch.tensor([0.5, float("nan")]), distribution="uniform"), ValueError,
     r"t_max: expected values in \[0, 1\], got t_max\[1\] = nan"),
    (lambda: FLOW.sample_timesteps(2, t_max=torch.tensor([0.5]), distribution="uniform"), ValueError,
     r"t_max: expected a float tensor \[2\], got shape \(1,\)"),
])
def test_bad_time_sampling_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()
