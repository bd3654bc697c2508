"""tk.add_noise and tk.diffusion_loss's Triton kernels against the reference in float64.

On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest), in float32
and float16; bfloat16 runs only on a GPU (the interpreter mishandles it). Every comparison is
anchored to the reference's own error in the same dtype (it computes in float32 and rounds its
outputs to the data dtype, as the kernels do):

    max |ours - ref64| <= 2 * max |ref_lowp - ref64| + 4 * eps(out dtype) * max(1, max |ref64|)

Seeded mode is compared with the reference given the kernel's own noise, read back exactly through
``add_noise`` with ``rectified_flow(T=1)`` (a = 0, b = 1); the generator itself is compared with
``reference.seeded_noise`` separately.
"""

import math
import re

import pytest
import torch

import tfkernels as tk
import tfkernels.diffusion as diffusion_module
from tests.support import CPU_DTYPES, DEVICE, both_paths_fixture, gpu_only, requires_triton
from tfkernels import reference
from tfkernels.schedule import TARGETS, target_coefficients
from tfkernels.testing import assert_anchored, max_error

pytestmark = requires_triton

TIMESTEPS = [0, 1, 20, 499, 999]
# Kernel noise vs reference.seeded_noise: the integer stream and uniforms are exact; log/sqrt/cos
# differ by float32 rounding (interpreter: numpy vs torch, 1-2 ulp; GPU: approximate instructions).
SEEDED_NOISE_ATOL = 1e-5
COSINE = tk.NoiseSchedule.cosine(1000).to(DEVICE)
FLOW = tk.NoiseSchedule.rectified_flow(1000).to(DEVICE)


path = both_paths_fixture(diffusion_module)


@pytest.fixture
def small_blocks(monkeypatch):
    """256-element blocks: the packed layout's large image then spans several blocks per program."""
    monkeypatch.setattr(diffusion_module, "_BLOCK", 256)


def _random(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def _kernel_noise(seed, shape, images=1):
    """The kernels' seeded noise for a buffer of ``shape``: x_t with a = 0, b = 1 is the noise.
    The noise depends on the flat element index only, so the buffer is read as ``images`` rows."""
    zeros = torch.zeros(images, math.prod(shape) // images, device=DEVICE)
    unit = tk.NoiseSchedule.rectified_flow(1).to(DEVICE)
    t = torch.zeros(images, dtype=torch.long, device=DEVICE)
    return tk.add_noise(zeros, t, unit, seed=seed).reshape(shape)


# Layouts: (x0 shape, offsets as image row counts or None for a batch, timesteps).
LAYOUTS = {
    "one_image": ((1, 4, 9, 7), None, [20]),
    "batch": ((5, 3, 11, 13), None, TIMESTEPS),
    "packed": ((232, 12), [1, 37, 3, 120, 9, 2, 60], [0, 1, 20, 499, 999, 20, 0]),
    "packed_one_image": ((50, 16), [50], [499]),
}


def _layout(name, gen):
    shape, sizes, timesteps = LAYOUTS[name]
    offsets = None
    if sizes is not None:
        offsets = torch.tensor([0] + sizes, device=DEVICE).cumsum(0)
    return shape, offsets, torch.tensor(timesteps, device=DEVICE)


# ------------------------------------------------------------------------------ add_noise
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("seeded", [False, True])
def test_add_noise_matches_reference(dtype, layout, seeded, small_blocks):
    gen = torch.Generator().manual_seed(3)
    shape, offsets, t = _layout(layout, gen)
    x0 = _random(shape, dtype, gen)
    noise = _kernel_noise(11, shape) if seeded else _random(shape, dtype, gen)
    ours = tk.add_noise(x0, t, COSINE, offsets=offsets, **({"seed": 11} if seeded else {"noise": noise}))
    assert ours.shape == x0.shape and ours.dtype == dtype
    ref64 = reference.add_noise(x0.double(), t, COSINE, noise=noise.double(), offsets=offsets)
    lowp = reference.add_noise(x0, t, COSINE, noise=noise, offsets=offsets)
    assert_anchored("x_t", ours, ref64, lowp)


@pytest.mark.parametrize("t", TIMESTEPS)
def test_add_noise_every_listed_timestep_one_image(t):
    gen = torch.Generator().manual_seed(t)
    x0, noise = _random((1, 300), torch.float32, gen), _random((1, 300), torch.float32, gen)
    ours = tk.add_noise(x0, torch.tensor([t], device=DEVICE), COSINE, noise=noise)
    a, b = (math.sqrt(v) for v in (COSINE.alphas_cumprod[t].item(), 1 - COSINE.alphas_cumprod[t].item()))
    assert_anchored("x_t", ours, a * x0.double() + b * noise.double(),
                     reference.add_noise(x0, torch.tensor([t], device=DEVICE), COSINE, noise=noise))


def test_add_noise_gradients_for_x0_and_noise():
    gen = torch.Generator().manual_seed(4)
    shape, offsets, t = _layout("packed", gen)
    x0, noise, grad_out = (_random(shape, torch.float32, gen) for _ in range(3))

    def grads(fn, *inputs):
        inputs = [x.detach().requires_grad_() for x in inputs]
        return torch.autograd.grad((fn(*inputs) * grad_out.to(inputs[0].dtype)).sum(), inputs)

    ours = grads(lambda a, n: tk.add_noise(a, t, COSINE, noise=n, offsets=offsets), x0, noise)
    ref64 = grads(lambda a, n: reference.add_noise(a, t, COSINE, noise=n, offsets=offsets), x0.double(), noise.double())
    lowp = grads(lambda a, n: reference.add_noise(a, t, COSINE, noise=n, offsets=offsets), x0, noise)
    for name, a, r, low in zip(("dx0", "dnoise"), ours, ref64, lowp):
        assert_anchored(name, a, r, low)


def test_add_noise_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(5)
    x0 = _random((24, 6), torch.float16, gen).t()  # [6, 24], column-major
    noise = _random((6, 48), torch.float16, gen)[:, ::2]
    t = torch.tensor([0, 5, 1, 20, 2, 999, 3, 499, 4, 1, 5, 7], device=DEVICE)[::2]
    ours = tk.add_noise(x0, t, COSINE, noise=noise)
    assert_anchored("x_t", ours, reference.add_noise(x0.double(), t, COSINE, noise=noise.double()),
                     reference.add_noise(x0, t, COSINE, noise=noise))


# ------------------------------------------------------------------------------ diffusion_loss
def _loss_and_grads(fn, pred, grad_none):
    """Per-image loss, mean loss, and d/dpred of both (random upstream gradients)."""
    pred = pred.detach().requires_grad_()
    per_image = fn(pred, "none")
    (grad_none_pred,) = torch.autograd.grad((per_image * grad_none.to(per_image.dtype)).sum(), pred)
    mean = fn(pred, "mean")
    (grad_mean_pred,) = torch.autograd.grad(mean * grad_none[0].to(mean.dtype), pred)
    return per_image, mean, grad_none_pred, grad_mean_pred


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout, seeded, weighted", [
    ("one_image", False, False), ("batch", True, True), ("packed", False, True), ("packed", True, False),
])
def test_diffusion_loss_matches_reference(dtype, target, layout, seeded, weighted, small_blocks):
    gen = torch.Generator().manual_seed(6)
    schedule = FLOW if target == "flow" else COSINE
    shape, offsets, t = _layout(layout, gen)
    x0, pred = _random(shape, dtype, gen), _random(shape, dtype, gen)
    noise = _kernel_noise(21, shape) if seeded else _random(shape, dtype, gen)
    weights = torch.rand(t.shape[0], generator=gen).to(DEVICE) + 0.5 if weighted else None
    grad_none = torch.randn(t.shape[0], generator=gen).to(DEVICE)
    source = {"seed": 21} if seeded else {"noise": noise}

    def ours_fn(p, reduction):
        return tk.diffusion_loss(p, x0, t, schedule, target=target, offsets=offsets, weights=weights,
                                 reduction=reduction, **source)

    def ref_fn(x0_, noise_, weights_):
        return lambda p, reduction: reference.diffusion_loss(
            p, x0_, t, schedule, target=target, noise=noise_, offsets=offsets, weights=weights_, reduction=reduction)

    ours = _loss_and_grads(ours_fn, pred, grad_none)
    ref64 = _loss_and_grads(ref_fn(x0.double(), noise.double(), None if weights is None else weights.double()),
                            pred.double(), grad_none)
    lowp = _loss_and_grads(ref_fn(x0, noise, weights), pred, grad_none)
    assert ours[0].dtype == ours[1].dtype == torch.float32 and ours[0].shape == t.shape and ours[1].ndim == 0
    assert ours[2].dtype == ours[3].dtype == dtype
    for name, a, r, low in zip(("loss[none]", "loss[mean]", "dpred[none]", "dpred[mean]"), ours, ref64, lowp):
        assert_anchored(name, a, r, low)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("sizes", [None, [256, 1024, 64, 256, 4096, 17, 256, 1024]], ids=["batch", "packed"])
def test_training_sizes_on_gpu(dtype, target, sizes):
    """add_noise, and diffusion_loss with its gradient, at a training batch's sizes in the GPU's dtypes:
    64 latents of 4 x 32 x 32, or a packed buffer of 16-channel patches of eight images of 17-4096 patches."""
    gen = torch.Generator().manual_seed(41)
    schedule = FLOW if target == "flow" else COSINE
    shape, offsets = ((64, 4, 32, 32), None) if sizes is None else \
        ((sum(sizes), 16), torch.tensor([0, *sizes], device=DEVICE).cumsum(0))
    images = shape[0] if sizes is None else len(sizes)
    t = torch.cat([torch.tensor([0, 1, 999]), torch.randint(0, 1000, (images - 3,), generator=gen)]).to(DEVICE)
    x0, noise, pred = (_random(shape, dtype, gen) for _ in range(3))
    grad_none = torch.randn(images, generator=gen).to(DEVICE)
    assert_anchored("x_t", tk.add_noise(x0, t, schedule, noise=noise, offsets=offsets),
                    reference.add_noise(x0.double(), t, schedule, noise=noise.double(), offsets=offsets),
                    reference.add_noise(x0, t, schedule, noise=noise, offsets=offsets))

    def loss(op, x0_, noise_):
        return lambda p, reduction: op(p, x0_, t, schedule, target=target, noise=noise_, offsets=offsets,
                                       reduction=reduction)

    ours = _loss_and_grads(loss(tk.diffusion_loss, x0, noise), pred, grad_none)
    ref64 = _loss_and_grads(loss(reference.diffusion_loss, x0.double(), noise.double()), pred.double(), grad_none)
    lowp = _loss_and_grads(loss(reference.diffusion_loss, x0, noise), pred, grad_none)
    for name, a, r, low in zip(("loss[none]", "loss[mean]", "dpred[none]", "dpred[mean]"), ours, ref64, lowp):
        assert_anchored(name, a, r, low)


def test_diffusion_loss_gradients_for_x0_noise_and_weights():
    gen = torch.Generator().manual_seed(7)
    shape, offsets, t = _layout("packed", gen)
    pred, x0, noise = (_random(shape, torch.float32, gen) for _ in range(3))
    weights = torch.rand(t.shape[0], generator=gen).to(DEVICE)

    def grads(pred_, x0_, noise_, weights_, fn):
        inputs = [x.detach().requires_grad_() for x in (pred_, x0_, noise_, weights_)]
        loss = fn(*inputs[:3], t, COSINE, target="v", noise=inputs[2], offsets=offsets, weights=inputs[3])
        return torch.autograd.grad(loss, inputs)

    ours = grads(pred, x0, noise, weights, lambda p, a, n, *args, **kw: tk.diffusion_loss(p, a, *args, **kw))
    ref64 = grads(pred.double(), x0.double(), noise.double(), weights.double(),
                  lambda p, a, n, *args, **kw: reference.diffusion_loss(p, a, *args, **kw))
    lowp = grads(pred, x0, noise, weights, lambda p, a, n, *args, **kw: reference.diffusion_loss(p, a, *args, **kw))
    for name, a, r, low in zip(("dpred", "dx0", "dnoise", "dweights"), ours, ref64, lowp):
        assert_anchored(name, a, r, low)


def test_diffusion_loss_default_block_size_and_mixed_dtypes():
    """The default 1024-element block (programs loop over the 120-row image), fp16 pred, fp32 x0."""
    gen = torch.Generator().manual_seed(8)
    shape, offsets, t = _layout("packed", gen)
    x0, noise = _random(shape, torch.float32, gen), _random(shape, torch.float32, gen)
    pred = _random(shape, torch.float16, gen)
    ours = tk.diffusion_loss(pred, x0, t, COSINE, target="v", noise=noise, offsets=offsets, reduction="none")
    ref64 = reference.diffusion_loss(pred.double(), x0.double(), t, COSINE, target="v", noise=noise.double(),
                                     offsets=offsets, reduction="none")
    lowp = reference.diffusion_loss(pred, x0, t, COSINE, target="v", noise=noise, offsets=offsets, reduction="none")
    assert_anchored("loss", ours, ref64, lowp)


@pytest.mark.parametrize("shape, packed", [((0, 8), True), ((0, 8), False), ((0, 0), True), ((0, 3, 0), False)])
def test_no_images_gives_empty_output_and_zero_mean(shape, packed, path):
    x0 = torch.zeros(shape, device=DEVICE)
    t = torch.zeros(0, dtype=torch.long, device=DEVICE)
    offsets = torch.zeros(1, dtype=torch.long, device=DEVICE) if packed else None
    assert tk.add_noise(x0, t, COSINE, seed=1, offsets=offsets).shape == shape
    pred = x0.clone().requires_grad_()
    loss = tk.diffusion_loss(pred, x0, t, COSINE, seed=1, offsets=offsets)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert torch.autograd.grad(loss, pred)[0].shape == shape
    assert tk.diffusion_loss(pred, x0, t, COSINE, seed=1, offsets=offsets, reduction="none").shape == (0,)
    assert reference.diffusion_loss(pred, x0, t, COSINE, seed=1, offsets=offsets).item() == 0.0
    assert reference.diffusion_loss(pred, x0, t, COSINE, seed=1, offsets=offsets, reduction="none").shape == (0,)


@pytest.mark.parametrize("shape, sizes", [((3, 0), None), ((3, 2, 0), None), ((4, 0), [1, 1, 2]), ((3, 0, 5), [1, 2])])
def test_images_of_no_elements_are_a_named_error(shape, sizes, path):
    """The per-image mean over no elements is undefined: it was NaN on both paths, now a ValueError
    (add_noise, which has no mean, still takes them)."""
    x0 = torch.zeros(shape, device=DEVICE)
    num_images = shape[0] if sizes is None else len(sizes)
    t = torch.full((num_images,), 5, device=DEVICE)
    offsets = None if sizes is None else torch.tensor([0] + sizes, device=DEVICE).cumsum(0)
    assert tk.add_noise(x0, t, COSINE, seed=1, offsets=offsets).shape == shape
    with pytest.raises(ValueError, match=r"x0: expected images of at least one element .*got shape " + re.escape(str(shape))):
        tk.diffusion_loss(x0, x0, t, COSINE, seed=1, offsets=offsets)
    with pytest.raises(ValueError, match="x0: expected images of at least one element"):
        reference.diffusion_loss(x0, x0, t, COSINE, seed=1, offsets=offsets)


@pytest.mark.parametrize("target, unread", [("eps", "x0"), ("x0", "noise")])
def test_an_input_the_target_does_not_read_cannot_poison_the_loss(target, unread, path):
    """eps reads only the noise, x0 only x0: a NaN or inf in the other input gives the same loss and
    zero gradients on both paths (the kernels never load it; the reference must not compute 0 * nan)."""
    gen = torch.Generator().manual_seed(16)
    x0, noise = _random((3, 5), torch.float32, gen), _random((3, 5), torch.float32, gen)
    pred = _random((3, 5), torch.float32, gen)
    t = torch.tensor([1, 500, 999], device=DEVICE)
    clean = tk.diffusion_loss(pred, x0, t, COSINE, target=target, noise=noise, reduction="none")
    inputs = {"x0": x0.clone(), "noise": noise.clone()}
    inputs[unread][0, 1], inputs[unread][2, 4] = float("nan"), float("inf")
    inputs = {name: x.requires_grad_() for name, x in inputs.items()}
    loss = tk.diffusion_loss(pred, inputs["x0"], t, COSINE, target=target, noise=inputs["noise"], reduction="none")
    torch.testing.assert_close(loss, clean, rtol=1e-6, atol=0)
    loss.sum().backward()
    assert torch.equal(inputs[unread].grad, torch.zeros_like(x0))


@pytest.mark.parametrize("target", ["eps", "v", "x0"])
def test_one_element_per_image_batch_of_shape_n(target, path):
    """x0 [N]: each image is one value; the reference crashed on it while the kernels took it."""
    gen = torch.Generator().manual_seed(15)
    x0, pred, noise = (_random((5,), torch.float32, gen) for _ in range(3))
    t = torch.tensor(TIMESTEPS, device=DEVICE)
    x_t = tk.add_noise(x0, t, COSINE, noise=noise)
    a, b = COSINE.coefficients(t)
    torch.testing.assert_close(x_t, a * x0 + b * noise)
    loss = tk.diffusion_loss(pred, x0, t, COSINE, target=target, noise=noise, reduction="none")
    c_x0, c_noise = target_coefficients(target, a, b)
    torch.testing.assert_close(loss, (pred - c_x0 * x0 - c_noise * noise).square())
    as_rows = tk.diffusion_loss(pred[:, None], x0[:, None], t, COSINE, target=target, seed=4)
    torch.testing.assert_close(tk.diffusion_loss(pred, x0, t, COSINE, target=target, seed=4), as_rows,
                               rtol=1e-6, atol=1e-6)  # seeded noise: the kernels' and torch's differ by ulps


# ------------------------------------------------------------------------------ seeded noise
def test_kernel_noise_equals_reference_generator_and_is_reproducible():
    noise = _kernel_noise(1234, (3, 500))
    assert torch.equal(noise, _kernel_noise(1234, (3, 500))), "identical across calls"
    expected = reference.seeded_noise(1234, (3, 500), DEVICE)
    assert max_error(noise, expected) <= SEEDED_NOISE_ATOL
    assert torch.equal(_kernel_noise(1234, (3, 500), images=3), noise), "a function of the flat index only"
    assert not torch.equal(_kernel_noise(1235, (3, 500)), noise)
    large_seed = (7 << 40) + 5
    assert max_error(_kernel_noise(large_seed, (2, 64)), reference.seeded_noise(large_seed, (2, 64), DEVICE)) \
        <= SEEDED_NOISE_ATOL


@gpu_only
def test_kernel_noise_on_gpu():
    """The GPU's approximate log, sqrt and cos keep the kernels' noise within SEEDED_NOISE_ATOL of the generator's."""
    noise = _kernel_noise(1234, (64, 4096), images=64)
    assert max_error(noise, reference.seeded_noise(1234, (64, 4096), DEVICE)) <= SEEDED_NOISE_ATOL


def test_kernel_noise_statistics_over_a_large_buffer(monkeypatch):
    monkeypatch.setattr(diffusion_module, "_BLOCK", 1 << 15)  # few, large interpreted programs
    noise = _kernel_noise(99, (16, 1 << 16), images=16).flatten().double()
    n = noise.numel()
    assert abs(noise.mean().item()) < 5 / math.sqrt(n)
    assert abs(noise.std().item() - 1) < 5 / math.sqrt(2 * n)
    assert abs((noise.abs() < 1).double().mean().item() - 0.682689) < 5 * math.sqrt(0.2166 / n)
    assert abs(torch.corrcoef(torch.stack([noise[:-1], noise[1:]]))[0, 1].item()) < 5 / math.sqrt(n)


def test_seeded_noise_is_the_same_in_add_noise_and_diffusion_loss(small_blocks):
    gen = torch.Generator().manual_seed(9)
    shape, offsets, t = _layout("packed", gen)
    x0 = _random(shape, torch.float32, gen)
    noise = _kernel_noise(77, shape)
    assert torch.equal(tk.add_noise(x0, t, COSINE, seed=77, offsets=offsets),
                       tk.add_noise(x0, t, COSINE, noise=noise, offsets=offsets))
    # eps target: predicting the regenerated noise exactly gives exactly zero loss and gradient.
    pred = noise.clone().requires_grad_()
    loss = tk.diffusion_loss(pred, x0, t, COSINE, target="eps", seed=77, offsets=offsets, reduction="none")
    assert torch.equal(loss, torch.zeros_like(loss))
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    assert torch.equal(grad, torch.zeros_like(grad))
    pred = _random(shape, torch.float32, gen)
    for target in ("v", "x0"):
        assert torch.equal(tk.diffusion_loss(pred, x0, t, COSINE, target=target, seed=77, offsets=offsets),
                           tk.diffusion_loss(pred, x0, t, COSINE, target=target, noise=noise, offsets=offsets))


# ------------------------------------------------------------------------------ bf16 coefficients
def _bf16_eager_add_noise(x0, t, schedule, noise):
    """What eager code does when the schedule lives in the data's dtype: ᾱ rounded to bfloat16."""
    acp = schedule.alphas_cumprod.to(torch.bfloat16)[t][:, None]
    return acp.sqrt() * x0 + (1 - acp).sqrt() * noise


@pytest.mark.parametrize("dtype", CPU_DTYPES + [pytest.param(torch.bfloat16, marks=gpu_only)])
def test_bf16_coefficients_leave_small_t_unnoised_ours_do_not(dtype):
    t = torch.arange(20, device=DEVICE)
    gen = torch.Generator().manual_seed(10)
    x0, noise = _random((20, 4096), torch.float32, gen), _random((20, 4096), torch.float32, gen)
    # Eager bf16: 1 - ᾱ_t < 2^-9 for t < 20 rounds ᾱ_t to 1, so x_t is x0 exactly: no noise.
    eager = _bf16_eager_add_noise(x0.bfloat16(), t, COSINE, noise.bfloat16())
    assert torch.equal(eager, x0.bfloat16())
    # Ours: float32 coefficients; the added noise has the schedule's scale b_t >= 0.0064.
    ours = tk.add_noise(x0.to(dtype), t, COSINE, noise=noise.to(dtype))
    a, b = COSINE.coefficients(t)
    assert (b >= 0.0064).all()
    added = (ours.double() - a.double()[:, None] * x0.to(dtype).double()) / b.double()[:, None]
    # bf16 output keeps b * noise only to its rounding of x_t (2^-9 relative): a looser check there.
    tolerance = 0.5 if dtype == torch.bfloat16 else 0.05
    assert ((added.std(dim=1) - 1).abs() < tolerance).all()
    assert (added - noise.double()).abs().mean() < tolerance


# ------------------------------------------------------------------------------ torch.compile
def test_torch_compile_fullgraph_matches_eager(path):
    gen = torch.Generator().manual_seed(12)
    shape, offsets, t = _layout("packed", gen)
    x0 = _random(shape, torch.float32, gen)
    pred = _random(shape, torch.float32, gen).requires_grad_()
    weights = torch.rand(t.shape[0], generator=gen).to(DEVICE)

    def step(pred, x0, t, offsets, weights):
        x_t = tk.add_noise(x0, t, COSINE, seed=5, offsets=offsets)
        return tk.diffusion_loss(pred + 0.1 * x_t, x0, t, COSINE, target="v", seed=5, offsets=offsets,
                                 weights=weights)

    compiled = torch.compile(step, fullgraph=True)
    loss_compiled = compiled(pred, x0, t, offsets, weights)
    (grad_compiled,) = torch.autograd.grad(loss_compiled, pred)
    loss_eager = step(pred, x0, t, offsets, weights)
    (grad_eager,) = torch.autograd.grad(loss_eager, pred)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-5, atol=1e-7)


def test_compiled_calls_check_values_at_run_time(path):
    """A graph compiled on good values still rejects bad ones, with the eager error, on both paths:
    the value checks are ops that run at run time (for the eps target the loss does not read t, and
    the reference path's check would otherwise be dropped as dead code)."""
    x0 = torch.randn(3, 8, device=DEVICE)
    loss = torch.compile(lambda t, w: tk.diffusion_loss(x0, x0, t, COSINE, seed=3, weights=w), fullgraph=True)
    noised = torch.compile(lambda t: tk.add_noise(x0, t, COSINE, seed=3), fullgraph=True)
    good_t, good_w = torch.tensor([1, 2, 3], device=DEVICE), torch.ones(3, device=DEVICE)
    assert torch.isfinite(loss(good_t, good_w)) and noised(good_t).shape == x0.shape
    with pytest.raises(ValueError, match=r"t: expected timesteps in \[0, 999\], got t\[2\] = 1000"):
        loss(torch.tensor([1, 2, 1000], device=DEVICE), good_w)
    with pytest.raises(ValueError, match=r"weights: expected finite values >= 0, got weights\[0\] = nan"):
        loss(good_t, torch.tensor([float("nan"), 1.0, 1.0], device=DEVICE))
    with pytest.raises(ValueError, match=r"t: expected timesteps in \[0, 999\], got t\[0\] = -1"):
        noised(torch.tensor([-1, 2, 3], device=DEVICE))


def test_op_registration_passes_opcheck():
    gen = torch.Generator().manual_seed(13)
    x0, noise = _random((3, 5), torch.float32, gen), _random((3, 5), torch.float32, gen)
    pred = _random((3, 5), torch.float32, gen).requires_grad_()
    t = torch.tensor([0, 20, 999], device=DEVICE)
    offsets = torch.tensor([0, 1, 1, 3], device=DEVICE)
    tables = (COSINE.signal_scale, COSINE.noise_scale)
    torch.library.opcheck(torch.ops.tfkernels.add_noise.default,
                          (x0.requires_grad_(), t, *tables, noise.requires_grad_(), None, None))
    torch.library.opcheck(torch.ops.tfkernels.diffusion_mse.default,
                          (pred, x0, t, *tables, None, None, 8, "v"))
    torch.library.opcheck(torch.ops.tfkernels.diffusion_checked_timesteps.default, (t, offsets, 3, 1000, True))
    torch.library.opcheck(torch.ops.tfkernels.diffusion_checked_weights.default,
                          (torch.rand(3, device=DEVICE).requires_grad_(), t, None, 3, 1000))
    torch.library.opcheck(torch.ops.tfkernels.reference_seeded_noise.default, (7, 12, torch.device(DEVICE)))


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.setattr(diffusion_module, "use_triton", lambda x: False)
    x0, noise = torch.randn(2, 6), torch.randn(2, 6)
    t = torch.tensor([3, 700])
    assert torch.equal(tk.add_noise(x0, t, COSINE.to("cpu"), noise=noise),
                       reference.add_noise(x0, t, COSINE.to("cpu"), noise=noise))
    with pytest.raises(ValueError, match=r"t: expected timesteps in \[0, 999\], got t\[1\] = 1000"):
        tk.add_noise(x0, torch.tensor([3, 1000]), COSINE, noise=noise)


# ------------------------------------------------------------------------------ bad inputs
def _bad_args(**overrides):
    args = dict(pred=torch.randn(10, 4, device=DEVICE), x0=torch.randn(10, 4, device=DEVICE),
                t=torch.tensor([1, 2, 3], device=DEVICE), schedule=COSINE, target="eps",
                noise=torch.randn(10, 4, device=DEVICE), seed=None,
                offsets=torch.tensor([0, 2, 5, 10], device=DEVICE), weights=None, reduction="mean")
    args.update(overrides)
    return args


BAD_INPUTS = [
    (dict(x0=torch.randn(10, 4, device=DEVICE).double()), TypeError, "x0: expected float16, bfloat16 or float32"),
    (dict(x0=[1.0]), TypeError, "x0: expected a torch.Tensor"),
    (dict(pred=torch.randn(10, 5, device=DEVICE)), ValueError, r"pred: expected shape \(10, 4\)"),
    (dict(noise=torch.randn(9, 4, device=DEVICE)), ValueError, r"noise: expected shape \(10, 4\)"),
    # Float times need a flow schedule (and float32).
    (dict(t=torch.tensor([0.1, 0.2, 0.3], device=DEVICE)), TypeError,
     r"t: expected integer timesteps for a 'cosine' schedule \(float32 times in \[0, 1\] need"),
    (dict(t=torch.tensor([[1, 2, 3]], device=DEVICE)), ValueError, r"t: expected an int tensor \[N\]"),
    (dict(t=[1, 2, 3]), TypeError, r"t: expected an int tensor \[N\], got list"),
    (dict(offsets=torch.tensor([0, 5, 10], device=DEVICE)), ValueError, r"offsets: expected shape \[N \+ 1\] = \[4\]"),
    (dict(offsets=None), ValueError, r"t: expected shape \[N = x0.shape\[0\]\] = \[10\]"),
    (dict(offsets=torch.tensor([0, 2, 5, 10], device=DEVICE).float()), TypeError, "offsets: expected dtype int32"),
    (dict(seed=3), ValueError, "noise, seed: expected exactly one of them"),
    (dict(noise=None), ValueError, "noise, seed: expected exactly one of them"),
    # A negative seed is an int of the wrong value: ValueError (it was a TypeError before the one rule).
    (dict(noise=None, seed=-1), ValueError, r"seed: expected an int in \[0, 2\*\*63\)"),
    (dict(noise=None, seed=2**63), ValueError, r"seed: expected an int in \[0, 2\*\*63\)"),
    (dict(noise=None, seed=1.5), TypeError, r"seed: expected an int in \[0, 2\*\*63\)"),
    (dict(schedule="cosine"), TypeError, "schedule: expected a tfkernels.NoiseSchedule"),
    (dict(target="score"), ValueError, "target: expected one of"),
    (dict(target=1), TypeError, "target: expected a str, one of"),
    (dict(target="flow"), ValueError, "target: 'flow' needs NoiseSchedule.rectified_flow"),
    (dict(reduction="sum"), ValueError, r"reduction: expected one of \('mean', 'none'\), got 'sum'"),
    (dict(weights=torch.ones(4, device=DEVICE)), ValueError, r"weights: expected shape \[3\]"),
    (dict(weights=torch.ones(3, dtype=torch.long, device=DEVICE)), TypeError, "weights: expected a float tensor"),
    (dict(t=torch.tensor([1, 1000, 3], device=DEVICE)), ValueError, r"t: expected timesteps in \[0, 999\], got t\[1\] = 1000"),
    (dict(t=torch.tensor([1, 2, -4], device=DEVICE)), ValueError, r"got t\[2\] = -4"),
    (dict(offsets=torch.tensor([1, 2, 5, 10], device=DEVICE)), ValueError, r"offsets: expected offsets\[0\] == 0, got 1"),
    (dict(offsets=torch.tensor([0, 2, 5, 9], device=DEVICE)), ValueError, r"offsets\[-1\] == 10 \(the rows of x0\), got 9"),
    (dict(offsets=torch.tensor([0, 6, 5, 10], device=DEVICE)), ValueError,
     r"offsets: expected increasing .*offsets\[1\] = 6, offsets\[2\] = 5"),
    (dict(offsets=torch.tensor([0, 5, 5, 10], device=DEVICE)), ValueError,
     r"every image needs a row.*offsets\[1\] = 5, offsets\[2\] = 5"),
    (dict(t=torch.tensor([True, False, True], device=DEVICE)), TypeError, "t: expected dtype int32 or int64, got torch.bool"),
    (dict(t=torch.tensor([1j, 2j, 3j], device=DEVICE)), TypeError, "t: expected dtype int32 or int64, got torch.complex64"),
    (dict(t=torch.tensor([1, 2, 3], device=DEVICE, dtype=torch.int16)), TypeError, "t: expected dtype int32 or int64"),
    (dict(offsets=torch.tensor([0, 2, 5, 10], device=DEVICE).bool()), TypeError, "offsets: expected dtype int32"),
    (dict(offsets=[0, 2, 5, 10]), TypeError, "offsets: expected an int tensor"),
    (dict(noise=None, seed=True), TypeError, r"seed: expected an int in \[0, 2\*\*63\)"),
    (dict(noise=None, seed="7"), TypeError, r"seed: expected an int in \[0, 2\*\*63\)"),
    (dict(noise=torch.randn(10, 4, device=DEVICE).double()), TypeError, "noise: expected float16, bfloat16 or float32"),
    (dict(pred=torch.randn(10, 4, device=DEVICE).to(torch.complex64)), TypeError, "pred: expected float16"),
    (dict(reduction=None), TypeError, "reduction: expected a str"),
    (dict(weights=[1.0, 1.0, 1.0]), TypeError, "weights: expected a float tensor"),
    (dict(weights=torch.ones(3, device=DEVICE).bool()), TypeError, "weights: expected a float tensor"),
    # Weights that are not finite, or negative, would give a NaN or negative loss silently.
    (dict(weights=torch.tensor([1.0, float("nan"), 1.0], device=DEVICE)), ValueError,
     r"weights: expected finite values >= 0, got weights\[1\] = nan"),
    (dict(weights=torch.tensor([1.0, 1.0, float("inf")], device=DEVICE)), ValueError, r"got weights\[2\] = inf"),
    (dict(weights=torch.tensor([1.0, -0.5, 1.0], device=DEVICE)), ValueError, r"got weights\[1\] = -0.5"),
    # Two bad values: the same one is named first on both paths (the weights).
    (dict(weights=torch.tensor([1.0, -0.5, 1.0], device=DEVICE), offsets=torch.tensor([0, 2, 5, 9], device=DEVICE)),
     ValueError, r"got weights\[1\] = -0.5"),
    (dict(x0=torch.randn(10, 0, device=DEVICE), pred=torch.randn(10, 0, device=DEVICE),
          noise=torch.randn(10, 0, device=DEVICE)), ValueError, "x0: expected images of at least one element"),
    (dict(x0=torch.tensor(1.0, device=DEVICE)), ValueError, "x0: expected .N, ....* got a 0-d tensor"),
    (dict(schedule=None), TypeError, "schedule: expected a tfkernels.NoiseSchedule, got NoneType"),
]
if DEVICE == "cuda":
    BAD_INPUTS.append((dict(t=torch.tensor([1, 2, 3])), ValueError, "t: expected device cuda"))


@pytest.fixture
def no_launch(monkeypatch):
    """Every kernel launcher and reference op of the diffusion module fails the test if called."""
    def launch(*args, **kwargs):
        raise AssertionError("a kernel or the reference ran on bad input")

    for name in ("_launch_add_noise", "_launch_mse_fwd", "_launch_mse_bwd"):
        monkeypatch.setattr(diffusion_module, name, launch)
    for name in ("add_noise", "diffusion_loss"):
        monkeypatch.setattr(diffusion_module.reference, name, launch)


@pytest.mark.parametrize("overrides, error, message", BAD_INPUTS)
def test_bad_inputs_raise_before_launch(overrides, error, message, path, no_launch):
    with pytest.raises(error, match=message):
        tk.diffusion_loss(**_bad_args(**overrides))


@pytest.mark.parametrize("overrides, error, message", [
    (dict(t=torch.tensor([True, False, True], device=DEVICE)), TypeError, "t: expected dtype int32 or int64"),
    (dict(t=torch.tensor([1, 2, 1000], device=DEVICE)), ValueError, r"t: expected timesteps in \[0, 999\], got t\[2\]"),
    (dict(offsets=torch.tensor([0, 2, 5, 10], device=DEVICE).double()), TypeError, "offsets: expected dtype int32"),
    (dict(offsets=torch.tensor([0, 6, 5, 10], device=DEVICE)), ValueError, "offsets: expected non-decreasing values"),
    (dict(noise=None, seed=2.0), TypeError, r"seed: expected an int in \[0, 2\*\*63\)"),
    (dict(noise=None, seed=-3), ValueError, r"seed: expected an int in \[0, 2\*\*63\)"),
    (dict(noise=torch.randn(10, 4, device=DEVICE).to(torch.complex64)), TypeError, "noise: expected float16"),
    (dict(x0=torch.randn(10, 4, device=DEVICE).int()), TypeError, "x0: expected float16"),
])
def test_add_noise_bad_inputs_raise_before_launch(overrides, error, message, path, no_launch):
    args = _bad_args(**overrides)
    with pytest.raises(error, match=message):
        tk.add_noise(args["x0"], args["t"], args["schedule"], noise=args["noise"], seed=args["seed"],
                     offsets=args["offsets"])


def test_add_noise_allows_empty_images_but_checks_offsets():
    x0 = torch.randn(6, 2, device=DEVICE)
    t = torch.tensor([5, 6, 7], device=DEVICE)
    out = tk.add_noise(x0, t, COSINE, seed=3, offsets=torch.tensor([0, 2, 2, 6], device=DEVICE))
    assert out.shape == x0.shape
    with pytest.raises(ValueError, match=r"offsets: expected non-decreasing values, got offsets\[1\] = 4, offsets\[2\] = 3"):
        tk.add_noise(x0, t, COSINE, seed=3, offsets=torch.tensor([0, 4, 3, 6], device=DEVICE))


# ------------------------------------------------------------------------------ continuous time
EDGE_TIMES = [0.0, 1e-6, 0.5, 1 - 1e-6, 1.0]
# Float32 times per layout: every edge time, in batch and packed layouts.
FLOAT_TIMES = {"one_image": [0.5], "batch": EDGE_TIMES, "packed": EDGE_TIMES + [0.25, 0.75],
               "packed_one_image": [1e-6]}


def _float_layout(name, gen):
    shape, offsets, _ = _layout(name, gen)
    return shape, offsets, torch.tensor(FLOAT_TIMES[name], dtype=torch.float32, device=DEVICE)


def _flow_formula(x0, noise, t, offsets, target=None):
    """x_t = (1 - t) x0 + t noise (or a target) per image, in float64 from the float32 times."""
    t64 = t.double()
    if offsets is not None:
        t64 = torch.repeat_interleave(t64, (offsets[1:] - offsets[:-1]).long())
    t64 = t64.reshape(-1, *([1] * (x0.ndim - 1)))
    x0, noise = x0.double(), noise.double()
    if target is None:
        return (1 - t64) * x0 + t64 * noise
    return {"eps": noise, "x0": x0, "v": (1 - t64) * noise - t64 * x0, "flow": noise - x0}[target]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("seeded", [False, True])
def test_add_noise_float_times_match_the_formula(dtype, layout, seeded, small_blocks, path):
    gen = torch.Generator().manual_seed(31)
    shape, offsets, t = _float_layout(layout, gen)
    x0 = _random(shape, dtype, gen)
    noise = _kernel_noise(13, shape) if seeded else _random(shape, dtype, gen)
    source = {"seed": 13} if seeded else {"noise": noise}
    ours = tk.add_noise(x0, t, FLOW, offsets=offsets, **source)
    assert ours.shape == x0.shape and ours.dtype == dtype
    lowp = reference.add_noise(x0, t, FLOW, noise=noise.to(dtype), offsets=offsets)
    assert_anchored("x_t", ours, _flow_formula(x0, noise, t, offsets), lowp)


def test_float_times_zero_and_one_are_x0_and_the_noise_exactly(path):
    gen = torch.Generator().manual_seed(32)
    x0, noise = _random((4, 300), torch.float32, gen), _random((4, 300), torch.float32, gen)
    x_t = tk.add_noise(x0, torch.tensor([0.0, 1.0, 0.0, 1.0], device=DEVICE), FLOW, noise=noise)
    assert torch.equal(x_t[0::2], x0[0::2]) and torch.equal(x_t[1::2], noise[1::2])
    # The integer grid is a different thing: step 0 is s = 1 / T, not clean.
    assert not torch.equal(tk.add_noise(x0, torch.zeros(4, dtype=torch.long, device=DEVICE), FLOW, noise=noise), x0)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout, seeded, weighted", [("batch", False, True), ("packed", True, False),
                                                      ("packed", False, True)])
def test_diffusion_loss_float_times_match_the_formula(dtype, target, layout, seeded, weighted, small_blocks, path):
    """Loss and d/dpred against per-image float64 means of the closed-form target."""
    gen = torch.Generator().manual_seed(33)
    shape, offsets, t = _float_layout(layout, gen)
    x0, pred = _random(shape, dtype, gen), _random(shape, dtype, gen)
    noise = _kernel_noise(23, shape) if seeded else _random(shape, dtype, gen)  # the path's own seeded noise
    weights = torch.rand(t.shape[0], generator=gen).to(DEVICE) + 0.5 if weighted else None
    grad_none = torch.randn(t.shape[0], generator=gen).to(DEVICE)
    source = {"seed": 23} if seeded else {"noise": noise}

    def ours_fn(p, reduction):
        return tk.diffusion_loss(p, x0, t, FLOW, target=target, offsets=offsets, weights=weights,
                                 reduction=reduction, **source)

    def formula_fn(p, reduction):  # float64, per image, from the closed-form target
        goal = _flow_formula(x0, noise, t, offsets, target)
        sq = (p - goal).square().reshape(shape[0], -1).mean(dim=1)
        sizes = (offsets[1:] - offsets[:-1]) if offsets is not None else torch.ones_like(t, dtype=torch.long)
        per_image = torch.zeros(t.shape[0], dtype=torch.float64, device=DEVICE).index_add(
            0, torch.repeat_interleave(torch.arange(t.shape[0], device=DEVICE), sizes), sq) / sizes
        per_image = per_image * (1 if weights is None else weights.double())
        return per_image if reduction == "none" else per_image.mean()

    def lowp_fn(p, reduction):
        return reference.diffusion_loss(p, x0, t, FLOW, target=target, noise=noise.to(dtype), offsets=offsets,
                                        weights=weights, reduction=reduction)

    ours = _loss_and_grads(ours_fn, pred, grad_none)
    ref64 = _loss_and_grads(formula_fn, pred.double(), grad_none)
    lowp = _loss_and_grads(lowp_fn, pred, grad_none)
    for name, a, r, low in zip(("loss[none]", "loss[mean]", "dpred[none]", "dpred[mean]"), ours, ref64, lowp):
        assert_anchored(name, a, r, low)


@pytest.mark.parametrize("target", TARGETS)
def test_float_time_gradients_for_x0_noise_and_weights(target, path):
    gen = torch.Generator().manual_seed(34)
    shape, offsets, t = _float_layout("packed", gen)
    pred, x0, noise = (_random(shape, torch.float32, gen) for _ in range(3))
    weights = torch.rand(t.shape[0], generator=gen).to(DEVICE)
    grad_out = _random(shape, torch.float32, gen)

    def loss_grads(fn, *inputs):
        inputs = [x.detach().requires_grad_() for x in inputs]
        loss = fn(inputs[0], inputs[1], t, FLOW, target=target, noise=inputs[2], offsets=offsets, weights=inputs[3])
        return torch.autograd.grad(loss, inputs)

    def noise_grads(fn, *inputs):
        inputs = [x.detach().requires_grad_() for x in inputs]
        return torch.autograd.grad((fn(inputs[0], t, FLOW, noise=inputs[1], offsets=offsets)
                                    * grad_out.to(inputs[0].dtype)).sum(), inputs)

    as64 = [x.double() for x in (pred, x0, noise, weights)]
    ours = loss_grads(tk.diffusion_loss, pred, x0, noise, weights)
    ref64 = loss_grads(reference.diffusion_loss, *as64)
    lowp = loss_grads(reference.diffusion_loss, pred, x0, noise, weights)
    for name, a, r, low in zip(("dpred", "dx0", "dnoise", "dweights"), ours, ref64, lowp):
        assert_anchored(name, a, r, low)
    ours = noise_grads(tk.add_noise, x0, noise)
    # d x_t / d x0 = 1 - t, d x_t / d noise = t: the formula's gradients in float64.
    per_row = _flow_formula(torch.ones_like(x0), torch.zeros_like(noise), t, offsets)
    expected = (per_row * grad_out.double(), (1 - per_row) * grad_out.double())
    lowp = noise_grads(reference.add_noise, x0, noise)
    for name, a, r, low in zip(("dx0", "dnoise"), ours, expected, lowp):
        assert_anchored(name, a, r, low)


def test_kernel_equals_reference_for_float_times(small_blocks):
    """The interpreted kernels and the eager reference agree to float32 rounding on the same noise."""
    gen = torch.Generator().manual_seed(35)
    shape, offsets, t = _float_layout("packed", gen)
    x0, noise, pred = (_random(shape, torch.float32, gen) for _ in range(3))
    expected = reference.add_noise(x0, t, FLOW, noise=noise, offsets=offsets)
    # Float32 rounding at the largest value: a compiled kernel may fuse a * x0 + b * noise into an FMA,
    # whose correctly rounded result can be an ulp from eager's three roundings; the tolerance admits it.
    atol = 2 * torch.finfo(torch.float32).eps * expected.abs().max().item()
    torch.testing.assert_close(_flow_formula(x0, noise, t, offsets).float(), expected, rtol=0, atol=atol)
    torch.testing.assert_close(tk.add_noise(x0, t, FLOW, noise=noise, offsets=offsets), expected, rtol=0, atol=atol)
    for target in TARGETS:
        torch.testing.assert_close(
            tk.diffusion_loss(pred, x0, t, FLOW, target=target, noise=noise, offsets=offsets, reduction="none"),
            reference.diffusion_loss(pred, x0, t, FLOW, target=target, noise=noise, offsets=offsets, reduction="none"),
            rtol=1e-6, atol=0)
    assert torch.equal(tk.add_noise(x0, t, FLOW, seed=3, offsets=offsets), tk.add_noise(x0, t, FLOW, seed=3, offsets=offsets))


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=gpu_only)])
def test_low_precision_inputs_keep_float32_coefficients_for_float_times(dtype):
    """bf16/fp16 data with t = 1e-3: coefficients stay float32 on both paths (bf16 would round 1 - t to 1)."""
    gen = torch.Generator().manual_seed(36)
    x0, noise = _random((3, 2048), torch.float32, gen), _random((3, 2048), torch.float32, gen)
    t = torch.tensor([1e-3, 0.5, 1 - 1e-3], dtype=torch.float32, device=DEVICE)
    expected = ((1 - t)[:, None] * x0.to(dtype).float() + t[:, None] * noise.to(dtype).float()).to(dtype)
    assert torch.equal(reference.add_noise(x0.to(dtype), t, FLOW, noise=noise.to(dtype)), expected)
    assert (1 - t.to(torch.bfloat16))[0].item() == 1.0, "eager bf16 arithmetic would leave t = 1e-3 un-noised"
    ours = tk.add_noise(x0.to(dtype), t, FLOW, noise=noise.to(dtype))
    assert max_error(ours, expected) <= torch.finfo(dtype).eps * expected.abs().max().item()


def test_diffusers_target_names_give_the_same_loss(path):
    gen = torch.Generator().manual_seed(37)
    x0, pred = _random((3, 40), torch.float32, gen), _random((3, 40), torch.float32, gen)
    t = torch.tensor([3, 400, 990], device=DEVICE)
    for alias, target in (("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0")):
        assert torch.equal(tk.diffusion_loss(pred, x0, t, COSINE, target=alias, seed=4, reduction="none"),
                           tk.diffusion_loss(pred, x0, t, COSINE, target=target, seed=4, reduction="none"))


def test_torch_compile_float_times_match_eager_and_check_at_run_time(path):
    gen = torch.Generator().manual_seed(38)
    shape, offsets, t = _float_layout("packed", gen)
    x0 = _random(shape, torch.float32, gen)
    pred = _random(shape, torch.float32, gen).requires_grad_()

    def step(pred, x0, t, offsets):
        x_t = tk.add_noise(x0, t, FLOW, seed=5, offsets=offsets)
        return tk.diffusion_loss(pred + 0.1 * x_t, x0, t, FLOW, target="flow", seed=5, offsets=offsets)

    compiled = torch.compile(step, fullgraph=True)
    loss_compiled = compiled(pred, x0, t, offsets)
    loss_eager = step(pred, x0, t, offsets)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss_compiled, pred)[0], torch.autograd.grad(loss_eager, pred)[0],
                               rtol=1e-5, atol=1e-7)
    bad = t.clone()
    bad[2] = 1.25
    with pytest.raises(ValueError, match=r"t: expected times in \[0, 1\], got t\[2\] = 1.25"):
        compiled(pred, x0, bad, offsets)


def test_op_registration_with_float_times_passes_opcheck():
    gen = torch.Generator().manual_seed(39)
    x0, noise = _random((3, 5), torch.float32, gen), _random((3, 5), torch.float32, gen)
    pred = _random((3, 5), torch.float32, gen).requires_grad_()
    t = torch.tensor([0.0, 0.3, 1.0], device=DEVICE)
    tables = (FLOW.signal_scale, FLOW.noise_scale)
    torch.library.opcheck(torch.ops.tfkernels.add_noise.default,
                          (x0.requires_grad_(), t, *tables, noise.requires_grad_(), None, None))
    torch.library.opcheck(torch.ops.tfkernels.diffusion_mse.default, (pred, x0, t, *tables, None, None, 8, "v"))
    torch.library.opcheck(torch.ops.tfkernels.diffusion_checked_timesteps.default, (t, None, 3, 1000, True))


FLOAT_T = torch.tensor([0.1, 0.5, 0.9], device=DEVICE)
BAD_FLOAT_TIMES = [
    (dict(t=torch.tensor([0.1, 1.5, 0.2], device=DEVICE)), ValueError, r"t: expected times in \[0, 1\], got t\[1\] = 1.5"),
    (dict(t=torch.tensor([0.1, 0.5, -0.25], device=DEVICE)), ValueError, r"t: expected times in \[0, 1\], got t\[2\] = -0.25"),
    (dict(t=torch.tensor([float("nan"), 0.5, 0.2], device=DEVICE)), ValueError, r"got t\[0\] = nan"),
    (dict(t=torch.tensor([0.1, float("inf"), 0.2], device=DEVICE)), ValueError, r"got t\[1\] = inf"),
    (dict(t=FLOAT_T.double()), TypeError, r"t: expected integer timesteps or float32 times in \[0, 1\], got torch.float64"),
    (dict(t=FLOAT_T.half()), TypeError, r"t: expected integer timesteps or float32 times in \[0, 1\], got torch.float16"),
    (dict(t=FLOAT_T[None]), ValueError, r"t: expected an int tensor \[N\] \(float32 times for a flow schedule\), one "
     r"timestep per image, got shape \(1, 3\)"),
    (dict(t=FLOAT_T[:2]), ValueError, r"t: expected shape \[N\] = \[2\]|offsets: expected shape \[N \+ 1\] = \[3\]"),
    (dict(t=FLOAT_T, schedule=COSINE), TypeError, r"t: expected integer timesteps for a 'cosine' schedule"),
]


@pytest.mark.parametrize("overrides, error, message", BAD_FLOAT_TIMES)
def test_bad_float_times_raise_before_launch(overrides, error, message, path, no_launch):
    args = _bad_args(**({"schedule": FLOW} | overrides))
    with pytest.raises(error, match=message):
        tk.diffusion_loss(**args)
    with pytest.raises(error, match=message):
        tk.add_noise(args["x0"], args["t"], args["schedule"], noise=args["noise"], offsets=args["offsets"])
