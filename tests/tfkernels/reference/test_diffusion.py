"""tfkernels.reference diffusion ops against independent formulas and hand-computed values.

Schedules: the paper's closed forms (cosine: Nichol & Dhariwal's ᾱ(t) = f(t)/f(0); linear: the
product of DDPM's betas), values evaluated with mpmath at 30 digits, and diffusers' procedure
rewritten here. Seeded noise: the published Philox-4x32-10 known-answer vectors (Random123) and the
Box-Muller formula in float64. Noise and loss: per-image loops over the closed forms in float64.
"""

import math

import pytest
import torch

from tfkernels.reference import NoiseSchedule, add_noise, diffusion_loss, seeded_noise
from tfkernels.reference.diffusion import philox4x32

T = 1000
# Relative error bound of a float32 cumulative product of T float32 factors, each factor itself
# rounded once: (2T + 2) unit roundoffs.
CUMPROD_RTOL = (2 * T + 2) * 2.0**-24


def _cosine_alpha_bar_closed_form(t: int) -> float:
    """ᾱ_t = f((t + 1) / T) / f(0), f(u) = cos²((u + 0.008) / 1.008 · π/2); the last step's beta is
    clipped at 0.999, so ᾱ_{T-1} = 0.001 · ᾱ_{T-2}."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    if t == T - 1:
        return 0.001 * f((T - 1) / T) / f(0)
    return f((t + 1) / T) / f(0)


def _linear_alpha_bar_closed_form(t: int, beta_start=1e-4, beta_end=0.02) -> float:
    return math.prod(1 - (beta_start + i * (beta_end - beta_start) / (T - 1)) for i in range(t + 1))


# ------------------------------------------------------------------------------ schedules
# ᾱ_t from the paper's formulas, evaluated with mpmath at 30 digits (rounded to 12).
COSINE_HAND = {0: 0.999958715775, 1: 0.999912575927, 499: 0.493843590441, 999: 2.42876690703e-9}
LINEAR_HAND = {0: 0.9999, 1: 0.999780092072, 499: 0.0785872428818, 999: 4.03582976538e-5}


@pytest.mark.parametrize("t", [0, 1, 499, 999])
def test_cosine_schedule_values(t):
    schedule = NoiseSchedule.cosine(T)
    acp = schedule.alphas_cumprod
    assert acp.dtype == torch.float32 and acp.shape == (T,)
    assert acp[t].item() == pytest.approx(_cosine_alpha_bar_closed_form(t), rel=CUMPROD_RTOL)
    assert acp[t].item() == pytest.approx(COSINE_HAND[t], rel=CUMPROD_RTOL)
    a, b = schedule.coefficients(torch.tensor([t]))
    assert a.dtype == b.dtype == torch.float32
    assert a.item() == pytest.approx(math.sqrt(COSINE_HAND[t]), rel=CUMPROD_RTOL)
    # b comes from the float32 ᾱ table (as in diffusers): 1 - ᾱ is exact only to ᾱ's rounding,
    # and b itself is rounded to float32.
    assert b.item() ** 2 == pytest.approx(1 - COSINE_HAND[t], abs=CUMPROD_RTOL * COSINE_HAND[t] + 2.0**-23)
    assert b.item() == pytest.approx(math.sqrt(1 - acp[t].item()), rel=2.0**-23)


def test_cosine_schedule_equals_diffusers_squaredcos_cap_v2_procedure():
    """diffusers: betas_for_alpha_bar(T, max_beta=0.999) as float32, then float32 cumprod of 1 - beta."""
    def alpha_bar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                         dtype=torch.float32)
    expected = torch.cumprod(1.0 - betas, dim=0)
    torch.testing.assert_close(NoiseSchedule.cosine(T).alphas_cumprod, expected, rtol=0, atol=1e-6)
    assert betas[-1].item() == pytest.approx(0.999), "the last step is the clipped one"


def test_cosine_schedule_matches_installed_diffusers():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(NoiseSchedule.cosine(T).alphas_cumprod, scheduler.alphas_cumprod, rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [0, 1, 499, 999])
def test_linear_schedule_values(t):
    schedule = NoiseSchedule.linear(T)
    acp = schedule.alphas_cumprod[t].item()
    assert acp == pytest.approx(_linear_alpha_bar_closed_form(t), rel=CUMPROD_RTOL)
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


# ------------------------------------------------------------------------------ seeded noise
@pytest.mark.parametrize("counter, key, expected", [
    # Random123 kat_vectors, philox4x32 with 10 rounds.
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    words = philox4x32(*(torch.tensor([c]) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


def test_seeded_noise_is_box_muller_of_philox_words():
    seed = (5 << 32) | 123
    index = torch.tensor([0, 1, 77])
    zero = torch.zeros_like(index)
    w0, w1, _, _ = philox4x32(index & 0xFFFFFFFF, index >> 32, zero, zero, 123, 5)
    expected = [math.sqrt(-2 * math.log(((int(a) >> 8) + 1) / 2**24)) * math.cos(2 * math.pi * (int(b) >> 8) / 2**24)
                for a, b in zip(w0, w1)]
    flat = seeded_noise(seed, (80,))
    assert flat[index].tolist() == pytest.approx(expected, abs=2e-6)


def test_seeded_noise_statistics_and_determinism():
    noise = seeded_noise(2024, (1 << 20,))
    n = noise.numel()
    assert abs(noise.mean().item()) < 5 / math.sqrt(n)
    assert abs(noise.std().item() - 1) < 5 / math.sqrt(2 * n)
    assert abs((noise.abs() < 1).double().mean().item() - 0.682689) < 5 * math.sqrt(0.2166 / n)
    neighbours = torch.corrcoef(torch.stack([noise[:-1], noise[1:]]))[0, 1].item()
    assert abs(neighbours) < 5 / math.sqrt(n)
    assert torch.equal(noise, seeded_noise(2024, (1 << 20,)))
    assert torch.equal(seeded_noise(2024, (4, 8)).flatten(), noise[:32]), "a function of the flat index only"
    assert not torch.equal(seeded_noise(2025, (32,)), noise[:32])


# ------------------------------------------------------------------------------ add_noise / loss
def _closed_form_coefficients(kind: str, t: int) -> tuple[float, float]:
    if kind == "flow":
        s = (t + 1) / T
        return 1 - s, s
    acp = _cosine_alpha_bar_closed_form(t)
    return math.sqrt(acp), math.sqrt(1 - acp)


def _closed_form_target(target: str, a: float, b: float, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return {"eps": noise, "x0": x0, "v": a * noise - b * x0, "flow": noise - x0}[target]


TIMESTEPS = [0, 1, 20, 499, 999]


@pytest.mark.parametrize("kind", ["cosine", "flow"])
def test_add_noise_batch_and_packed_against_closed_form(kind):
    schedule = NoiseSchedule.cosine(T) if kind == "cosine" else NoiseSchedule.rectified_flow(T)
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor(TIMESTEPS)
    x0 = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    out = add_noise(x0, t, schedule, noise=noise)
    assert out.dtype == torch.float64
    for i, ti in enumerate(TIMESTEPS):
        a, b = _closed_form_coefficients(kind, ti)
        torch.testing.assert_close(out[i], a * x0[i] + b * noise[i], rtol=CUMPROD_RTOL, atol=1e-7)
    # Packed: images of 1, 7, 2, 11 and 4 rows of 6 channels.
    offsets = torch.tensor([0, 1, 8, 10, 21, 25])
    patches = torch.randn(25, 6, generator=gen, dtype=torch.float64)
    patch_noise = torch.randn(25, 6, generator=gen, dtype=torch.float64)
    packed = add_noise(patches, t, schedule, noise=patch_noise, offsets=offsets)
    for i, ti in enumerate(TIMESTEPS):
        a, b = _closed_form_coefficients(kind, ti)
        rows = slice(offsets[i], offsets[i + 1])
        torch.testing.assert_close(packed[rows], a * patches[rows] + b * patch_noise[rows],
                                   rtol=CUMPROD_RTOL, atol=1e-7)


def test_add_noise_low_precision_uses_float32_coefficients_and_seeded_noise():
    schedule = NoiseSchedule.cosine(T)
    x0 = torch.randn(5, 16).half()
    t = torch.tensor(TIMESTEPS)
    out = add_noise(x0, t, schedule, seed=9)
    assert out.dtype == torch.float16
    a, b = schedule.coefficients(t)
    expected = (a[:, None] * x0.float() + b[:, None] * seeded_noise(9, x0.shape)).half()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("target", ["eps", "v", "x0", "flow"])
@pytest.mark.parametrize("packed", [False, True])
def test_diffusion_loss_against_closed_form(target, packed):
    kind = "flow" if target == "flow" else "cosine"
    schedule = NoiseSchedule.rectified_flow(T) if kind == "flow" else NoiseSchedule.cosine(T)
    gen = torch.Generator().manual_seed(2)
    t = torch.tensor(TIMESTEPS)
    if packed:
        offsets = torch.tensor([0, 3, 4, 12, 14, 20])
        shape = (20, 5)
    else:
        offsets, shape = None, (5, 2, 3, 3)
    x0, noise, pred = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    weights = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    expected = []
    for i, ti in enumerate(TIMESTEPS):
        rows = slice(offsets[i], offsets[i + 1]) if packed else slice(i, i + 1)
        a, b = _closed_form_coefficients(kind, ti)
        goal = _closed_form_target(target, a, b, x0[rows], noise[rows])
        expected.append(weights[i] * ((pred[rows] - goal) ** 2).mean())
    expected = torch.stack(expected)
    kwargs = dict(target=target, noise=noise, offsets=offsets, weights=weights)
    per_image = diffusion_loss(pred, x0, t, schedule, reduction="none", **kwargs)
    torch.testing.assert_close(per_image, expected, rtol=CUMPROD_RTOL, atol=1e-9)
    torch.testing.assert_close(diffusion_loss(pred, x0, t, schedule, **kwargs), expected.mean(),
                               rtol=CUMPROD_RTOL, atol=1e-9)


def test_diffusion_loss_gradient_is_twice_the_error_over_image_size():
    schedule = NoiseSchedule.cosine(T)
    offsets = torch.tensor([0, 2, 7])
    x0, noise = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    pred = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([10, 900])
    loss = diffusion_loss(pred, x0, t, schedule, target="eps", noise=noise, offsets=offsets)
    (grad,) = torch.autograd.grad(loss, pred)
    sizes = torch.tensor([2 * 3] * 2 + [5 * 3] * 5, dtype=torch.float64)[:, None]
    torch.testing.assert_close(grad, 2 * (pred.detach() - noise) / sizes / 2)


def test_flow_target_needs_flow_schedule_and_unknown_target_fails():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="target: 'flow' needs NoiseSchedule.rectified_flow"):
        diffusion_loss(x, x, torch.tensor([1, 2]), NoiseSchedule.cosine(T), target="flow", noise=x)
    with pytest.raises(ValueError, match="target: expected one of"):
        diffusion_loss(x, x, torch.tensor([1, 2]), NoiseSchedule.cosine(T), target="score", noise=x)
    with pytest.raises(ValueError, match="noise, seed: give exactly one"):
        add_noise(x, torch.tensor([1, 2]), NoiseSchedule.cosine(T), noise=x, seed=3)
