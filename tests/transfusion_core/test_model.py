"""Transfusion model: loss, gradients, kernel path vs reference path, training, the patch position hook,
continuous-time flow mode."""

import dataclasses

import pytest
import torch

import transfusion_core as tc
from transfusion_core.datasets import ShapesDataset

from .support import documents, packed, tiny_config

pytestmark = pytest.mark.usefixtures("reference_path")


@pytest.mark.parametrize("image_encoder", ["linear", "unet"])
@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_loss_is_finite_and_gradients_reach_every_parameter(image_encoder, tie_embeddings):
    torch.manual_seed(0)
    model = tc.Transfusion(tiny_config(image_encoder=image_encoder, tie_embeddings=tie_embeddings))
    batch = packed()
    assert batch.tokens.shape[0] >= 2 and len(set(map(tuple, batch.image_grids.tolist()))) == 3
    out = model(batch)
    assert torch.isfinite(out.loss) and out.lm_loss > 0 and out.diffusion_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 5.0 * out.diffusion_loss)
    out.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_text_only_batch_has_zero_diffusion_loss():
    model = tc.Transfusion(tiny_config())
    batch = tc.Packer(model.config, 32)([[[1, 2, 3]], [[4, 5]]])
    out = model(batch)
    assert out.diffusion_loss == 0 and torch.isfinite(out.lm_loss) and out.lm_loss > 0


def test_the_loss_reads_only_text_targets():
    """The token ids at image and padding positions are never read."""
    torch.manual_seed(0)
    model = tc.Transfusion(tiny_config())
    batch = packed()
    noise = torch.randn_like(batch.patches)
    before = model(batch, noise=noise)
    not_text = (batch.image_ids != 0) | (batch.doc_ids < 0)
    scrambled = dataclasses.replace(batch, tokens=torch.where(not_text, 7, batch.tokens))
    torch.testing.assert_close(model(scrambled, noise=noise), before, rtol=0, atol=0)


FLOW = dict(noise_schedule="flow", diffusion_target="flow")


@pytest.mark.parametrize("image_encoder, mode", [("linear", {}), ("unet", {}), ("linear", FLOW)])
def test_kernel_path_matches_reference_path(image_encoder, mode, monkeypatch):
    """Triton kernels (in the interpreter on CPU) and the eager reference: same loss, same grads."""
    torch.manual_seed(0)
    model = tc.Transfusion(tiny_config(image_encoder=image_encoder, **mode))
    with torch.no_grad():  # unit-gain weights: attention far from uniform, errors show downstream
        for parameter in model.parameters():
            parameter.normal_(0.0, 1.0 / max(parameter.shape[-1], 1) ** 0.5 if parameter.ndim > 1 else 0.5)
    batch = packed(seq_len=40)
    results = {}
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        model.zero_grad()
        out = model(batch)  # seeded noise: generated in-kernel on one path, eagerly on the other
        out.loss.backward()
        results[interpret] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (ref_out, ref_grads), (kernel_out, kernel_grads) = results["0"], results["1"]
    torch.testing.assert_close(kernel_out, ref_out, rtol=1e-4, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(kernel_grads[name], grad, rtol=1e-3, atol=1e-5, msg=f"gradient of {name}")


@pytest.mark.parametrize("image_encoder, mode", [("linear", {}), ("unet", {}), ("linear", FLOW)])
def test_training_steps_reduce_the_loss(image_encoder, mode):
    torch.manual_seed(0)
    model = tc.Transfusion(tiny_config(image_encoder=image_encoder, **mode))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = packed()
    losses = []
    for _ in range(12):
        out = model(batch)  # the same batch, timesteps and noise seed: the loss must fall
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append((out.loss.item(), out.lm_loss.item(), out.diffusion_loss.item()))
    first, last = losses[0], losses[-1]
    assert last[0] < 0.7 * first[0], losses
    assert last[1] < first[1] and last[2] < first[2], losses


def test_predict_rejects_a_patch_buffer_of_the_wrong_size():
    model = tc.Transfusion(tiny_config())
    batch = packed()
    with pytest.raises(ValueError, match=r"x_t: expected \d+ patches"):
        model.predict(batch, batch.patches[:-1])


def test_patch_position_embedding_is_the_same_in_training_and_in_cached_generation():
    """The model hook the training script turns on: the image predictions of a packed batch
    equal those of the KV-cache path (prompt, then the noised image), and the hook matters."""
    torch.manual_seed(0)
    config = tc.TransfusionConfig(dim=32, n_layers=2, n_heads=2, patch_size=4, image_size=16,
                                  patch_position_embedding=True)
    model = tc.Transfusion(config).eval()
    tokens = tc.ByteTokenizer().encode("a red circle at the top left")
    image = ShapesDataset(1)[0].image
    batch = tc.Packer(config, 64, seed=0)([[tokens, image]])
    x_t = torch.randn_like(batch.patches)
    with torch.no_grad():
        _, from_batch = model.predict(batch, x_t)
        cache = model.new_cache()
        model.extend_text(cache, torch.tensor([[config.bos_id, *tokens, config.boi_id]]))
        cached = model.extend_image(cache, x_t[None], batch.timesteps, (4, 4), commit=False)[0]
        torch.testing.assert_close(cached, from_batch, rtol=1e-4, atol=1e-5)
        model.config.patch_position_embedding = False
        _, without = model.predict(batch, x_t)
    assert not torch.allclose(without, from_batch, atol=1e-3)


# ------------------------------------------------------------------------------ continuous-time flow
def test_flow_loss_is_the_velocity_regression_at_continuous_times():
    """model(batch) of a flow model: the packer's integer draws become float times (config.continuous_times),
    x_t = (1 - t) x0 + t noise, and the diffusion loss is the per-image MSE against noise - x0."""
    torch.manual_seed(0)
    config = tiny_config(**FLOW)
    model = tc.Transfusion(config)
    batch = tc.Packer(config, 48, seed=0)(documents())
    assert batch.timesteps.dtype == torch.int64  # the packer's draws
    noise = torch.randn_like(batch.patches)
    out = model(batch, noise=noise)
    t = tc.config.continuous_times(batch.timesteps, batch.noise_seed, config)
    timed = dataclasses.replace(batch, timesteps=t)
    torch.testing.assert_close(model(timed, noise=noise), out, rtol=0, atol=0)  # float times are taken as given
    per_patch_t = torch.repeat_interleave(t, batch.patch_offsets.diff())[:, None]
    x_t = (1 - per_patch_t) * batch.patches + per_patch_t * noise
    _, pred = model.predict(timed, x_t)
    errors = ((pred - (noise - batch.patches)) ** 2).mean(dim=1)
    per_image = torch.stack([errors[a:b].mean() for a, b in zip(batch.patch_offsets[:-1], batch.patch_offsets[1:])])
    torch.testing.assert_close(out.diffusion_loss, per_image.mean(), rtol=1e-5, atol=1e-7)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_flow_model_takes_float_times_and_names_the_others():
    model = tc.Transfusion(tiny_config(**FLOW))
    batch = packed()  # integer timesteps
    with pytest.raises(TypeError, match=r"batch.timesteps: expected float32 times in \[0, 1\] \(noise_schedule='flow'\) "
                                        r"\[N = 4\], got torch.int64"):
        model.predict(batch, batch.patches)
    bad = dataclasses.replace(batch, timesteps=torch.tensor([0.0, 0.5, 1.0, 1.5]))
    with pytest.raises(ValueError, match=r"t: expected times in \[0, 1\], got t\[3\] = 1.5"):
        model(bad)
    cache = model.new_cache()
    model.extend_text(cache, torch.tensor([[1, model.config.boi_id]]))
    x_t = torch.randn(1, 4, model.config.patch_dim)
    with pytest.raises(ValueError, match=r"t: expected values in \[0, 1\], got t\[0\] = nan"):
        model.extend_image(cache, x_t, torch.tensor([float("nan")]), (2, 2), commit=False)
    with pytest.raises(TypeError, match=r"t: expected float32 times in \[0, 1\] \(noise_schedule='flow'\) \[B = 1\], "
                                        r"got torch.int64"):
        model.extend_image(cache, x_t, torch.tensor([5]), (2, 2), commit=False)
    with pytest.raises(TypeError, match="got torch.float64"):
        model.extend_image(cache, x_t, torch.tensor([0.5], dtype=torch.float64), (2, 2), commit=False)
    assert model.extend_image(cache, x_t, torch.tensor([0.5]), (2, 2), commit=False).shape == (1, 4, 12)


# ------------------------------------------------------------------------------ bad arguments
def _bad_calls():
    model = tc.Transfusion(tiny_config())
    batch = packed()
    dim = model.config.patch_dim
    x_t = torch.randn(1, 4, dim)
    t = torch.tensor([5])

    def image(**overrides):
        args = dict(cache=model.new_cache(), x_t=x_t, t=t, grid=(2, 2), commit=False) | overrides
        return lambda: model.extend_image(**args)

    return [
        (lambda: model(None), TypeError, "batch: expected a transfusion_core.PackedBatch, got NoneType"),
        (lambda: model.predict({"tokens": 1}, batch.patches), TypeError, "batch: expected a transfusion_core.PackedBatch"),
        (lambda: model(batch, noise=torch.randn(3, 4)), ValueError, r"noise: expected shape"),
        (lambda: model.predict(batch, "x"), TypeError, r"x_t: expected a float tensor \[P, 12\], got str"),
        (lambda: model.predict(batch, batch.patches.long()), TypeError, "x_t: expected a float tensor .*int64"),
        (lambda: model.predict(batch, batch.patches[:, :5]), ValueError, r"x_t: expected shape \[P, 12\], got \(17, 5\)"),
        (lambda: model.new_cache(0), ValueError, "batch_size: expected an int >= 1, got 0"),
        (lambda: model.new_cache(1.5), TypeError, "batch_size: expected an int >= 1, got 1.5"),
        (lambda: model.extend_text(model.new_cache(), torch.tensor([[99999]])), ValueError,
         r"tokens: expected values in \[0, 259\], got tokens\[0, 0\] = 99999"),
        (lambda: model.extend_text(model.new_cache(), torch.tensor([[3, -1]])), ValueError, r"got tokens\[0, 1\] = -1"),
        (lambda: model.extend_text(model.new_cache(), torch.tensor([[1.0]])), TypeError, "tokens: expected an int tensor"),
        (lambda: model.extend_text(model.new_cache(), [[1, 2]]), TypeError, "tokens: expected an int tensor .* got list"),
        (lambda: model.extend_text(model.new_cache(2), torch.tensor([[1, 2]])), ValueError,
         r"tokens: expected shape \[B = 2, n\], got \(1, 2\)"),
        (lambda: model.extend_text(model.new_cache(), torch.zeros(1, 0, dtype=torch.long)), ValueError,
         r"tokens: expected at least one token"),
        (lambda: model.extend_text(None, torch.tensor([[1]])), TypeError, "cache: expected a transfusion_core.KVCache"),
        (image(grid=(2, 3)), ValueError, r"x_t: expected shape \[B = 1, h\*w = 6, 12\], got \(1, 4, 12\)"),
        (image(grid=(0, 0), x_t=torch.randn(1, 0, dim)), ValueError, "grid: expected an int >= 1, got 0"),
        (image(grid=(2.0, 2)), TypeError, r"grid: expected a pair of ints \(h, w\)"),
        (image(grid=4), TypeError, r"grid: expected a pair of ints \(h, w\)"),
        (image(x_t=torch.randn(1, 4, dim + 1)), ValueError, r"x_t: expected shape .*got \(1, 4, 13\)"),
        (image(t=torch.tensor([5000])), ValueError, r"t: expected values in \[0, 999\], got t\[0\] = 5000"),
        (image(t=torch.tensor([5.0])), TypeError, r"t: expected an int tensor \[B = 1\], got torch.float32"),
        (image(t=torch.tensor([5, 6])), ValueError, r"t: expected shape \[B = 1\], got \(2,\)"),
        (image(commit="no"), TypeError, "commit: expected a bool, got 'no'"),
        (lambda: model.logits("x"), TypeError, r"hidden: expected a float tensor \[..., D\]"),
        (lambda: model.logits(torch.randn(3, 5)), ValueError, r"hidden: expected shape \[..., 32\], got \(3, 5\)"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_arguments_raise_named_errors(index):
    """Bad arguments of the model's methods: a TypeError or ValueError naming the argument, never an
    AttributeError, IndexError or a shape error from deep inside torch."""
    call, error, message = _bad_calls()[index]
    with pytest.raises(error, match=message):
        call()


# ------------------------------------------------------------------------------ clean image copies
@pytest.mark.parametrize("mode", [{}, FLOW], ids=["cosine", "flow"])
def test_clean_copies_are_read_clean_at_t0_and_have_no_loss(mode):
    """Packer(clean_image_copies=True): the clean copies enter as their latents at t = 0 (no noise), and the
    diffusion loss is the mean over the noisy copies only; the gradients are finite."""
    torch.manual_seed(0)
    config = tiny_config(**mode)
    model = tc.Transfusion(config)
    batch = tc.Packer(config, 64, seed=0, clean_image_copies=True)(documents())
    clean = batch.clean_images
    assert clean.numel() == batch.num_images // 2 > 0
    noise = torch.randn_like(batch.patches)
    out = model(batch, noise=noise)
    t = batch.timesteps
    if config.continuous_time:
        t = tc.config.continuous_times(t, batch.noise_seed, config).index_fill(0, clean, 0.0)
    timed = dataclasses.replace(batch, timesteps=t)
    per_patch = torch.repeat_interleave(torch.arange(batch.num_images), batch.patch_offsets.diff())
    is_clean = torch.isin(per_patch, clean)[:, None]
    schedule = model.schedule
    x_t = torch.where(is_clean, batch.patches, tc.ops.current().add_noise(batch.patches, t, schedule,
                                                                          offsets=batch.patch_offsets, noise=noise))
    _, pred = model.predict(timed, x_t)
    per_image = tc.ops.current().diffusion_loss(pred, batch.patches, t, schedule, target=config.diffusion_target,
                                                offsets=batch.patch_offsets, noise=noise, reduction="none")
    noisy = torch.ones(batch.num_images, dtype=torch.bool).index_fill(0, clean, False)
    torch.testing.assert_close(out.diffusion_loss, per_image[noisy].mean(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(out.diffusion_loss, per_image.mean())
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_clean_copies_train_what_generation_does():
    """A caption, an image and text after it, packed with a clean copy: the noisy copy's predictions are those of a
    denoising step after the cached caption, and the text after the image reads what generation leaves in the
    cache, the image committed clean at t = 0 (same hidden states as the cached path)."""
    torch.manual_seed(0)
    config = tc.TransfusionConfig(dim=32, n_layers=2, n_heads=2, patch_size=4, image_size=16)
    model = tc.Transfusion(config).eval()
    tok = tc.ByteTokenizer()
    caption, after = tok.encode("a red circle"), tok.encode("ok")
    image = ShapesDataset(1)[0].image
    batch = tc.Packer(config, 64, seed=0, clean_image_copies=True)([[caption, image, after]])
    noisy_t = batch.timesteps[:1]
    x_t = torch.cat([torch.randn_like(batch.patches[:16]), batch.patches[16:]])  # the noisy copy, the clean one
    is_text = (batch.image_ids[0] == 0) & (batch.doc_ids[0] >= 0)
    with torch.no_grad():
        hidden, from_batch = model.predict(batch, x_t)
        cache = model.new_cache()
        model.extend_text(cache, torch.tensor([[config.bos_id, *caption, config.boi_id]]))
        denoised = model.extend_image(cache, x_t[None, :16], noisy_t, (4, 4), commit=False)[0]
        model.extend_image(cache, batch.patches[None, 16:], torch.zeros(1, dtype=torch.int64), (4, 4), commit=True)
        logits = model.extend_text(cache, torch.tensor([[config.eoi_id, *after, config.eos_id]]))[0]
    torch.testing.assert_close(denoised, from_batch[:16], rtol=1e-4, atol=1e-5)
    text_after = torch.nonzero(is_text).flatten()[-(len(after) + 2):]  # EOI, the text, EOS
    torch.testing.assert_close(logits, model.logits(hidden[0, text_after]), rtol=1e-4, atol=1e-4)
