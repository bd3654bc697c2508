"""tfkernels.reference diffusion ops against independent formulas and hand-computed values.

Seeded noise: the Box-Muller formula in float64 over the Philox words (the generator itself is
checked against its published known answers in test_philox.py). Noise and loss: per-image loops in
float64 over coefficients from independent sources: diffusers' ᾱ table (hard-coded in
tests.support) for the cosine schedule, ``s = (t + 1) / T`` for rectified flow.
"""

import math

import pytest
import torch

from tests.support import DIFFUSERS_ALPHAS_CUMPROD
from tfkernels._philox import philox4x32
from tfkernels.reference import NoiseSchedule, add_noise, diffusion_loss, seeded_noise
from tfkernels.schedule import TARGETS

T = 1000
# Relative error bound of a float32 cumulative product of T float32 factors, each factor itself
# rounded once: (2T + 2) unit roundoffs.
CUMPROD_RTOL = (2 * T + 2) * 2.0**-24


# ------------------------------------------------------------------------------ seeded noise
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
    acp = DIFFUSERS_ALPHAS_CUMPROD["cosine"][t]
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


@pytest.mark.parametrize("target", TARGETS)
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
    with pytest.raises(ValueError, match=r"reduction: expected one of \('mean', 'none'\)"):
        diffusion_loss(x, x, torch.tensor([1, 2]), NoiseSchedule.cosine(T), noise=x, reduction="sum")
    with pytest.raises(ValueError, match="noise, seed: give exactly one"):
        add_noise(x, torch.tensor([1, 2]), NoiseSchedule.cosine(T), noise=x, seed=3)
