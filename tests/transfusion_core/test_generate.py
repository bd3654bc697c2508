"""Generation: the KV cache against full recomputation, guidance, seeds, samplers (DDPM/DDIM and
their timestep spacings; Euler/Heun for continuous-time flow models, against an analytic ODE)."""

import ast
import dataclasses
import inspect
import math
from pathlib import Path

import pytest
import torch

import tfkernels as tk
import transfusion_core as tc
from transfusion_core import generate
from transfusion_core import model as model_module
from transfusion_core.data import document_segments, unpatchify
from transfusion_core.generate import (
    denoise_step,
    diffusion_timesteps,
    flow_times,
    flow_velocity,
    integrate_flow,
    sample_token,
)

pytestmark = pytest.mark.usefixtures("reference_path")


def tiny_model(image_encoder="linear", seed=0, **config_fields):
    torch.manual_seed(seed)
    config = tc.TransfusionConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, image_size=4,
                                  image_encoder=image_encoder, unet_channels=(8, 16), **config_fields)
    model = tc.Transfusion(config).eval()
    with torch.no_grad():  # weights of unit gain (not the small init) so every input shows downstream
        for parameter in model.parameters():
            parameter.normal_(0.0, 1.0 / max(parameter.shape[-1], 1) ** 0.5 if parameter.ndim > 1 else 0.5)
    return model


def full_forward(model, document, timesteps, x_t=None):
    """Recompute a whole document without a cache: hidden ``[S, D]``, patch predictions, batch."""
    batch = tc.Packer(model.config, 128)([document])
    time_dtype = torch.float32 if model.config.continuous_time else torch.int64
    batch = dataclasses.replace(batch, timesteps=torch.as_tensor(timesteps, dtype=time_dtype))
    with torch.no_grad():
        hidden, pred = model.predict(batch, batch.patches if x_t is None else x_t)
    return hidden[0], pred, batch


def prefill(model, prompt, force_image=False):
    cache = model.new_cache()
    segments = document_segments(prompt, model.config, add_eos=False)
    if force_image:
        segments[-1] = torch.cat([segments[-1], torch.tensor([model.config.boi_id])])
    return cache, generate.prefill(model, cache, segments)


@pytest.mark.parametrize("image_encoder", ["linear", "unet"])
def test_cached_next_token_logits_equal_full_recomputation(image_encoder):
    """Captioning-style prompt (text, image, text), then greedy steps through the cache."""
    model = tiny_model(image_encoder)
    image = torch.randn(3, 4, 6)
    prompt = [[10, 11, 12], image, [20, 21]]
    cache, logits = prefill(model, prompt)
    step_logits, generated = [logits], []
    for _ in range(6):
        token = int(step_logits[-1].argmax())
        generated.append(token)
        step_logits.append(model.extend_text(cache, torch.tensor([[token]]))[0, -1])
    assert cache.length == 1 + 3 + 1 + 6 + 1 + 2 + 6
    hidden, _, _ = full_forward(model, [[10, 11, 12], image, [20, 21] + generated], timesteps=[0])
    full_logits = model.logits(hidden)  # [S, V]
    last_prompt_position = 1 + 3 + 1 + 6 + 1 + 2 - 1
    expected = full_logits[last_prompt_position:last_prompt_position + 7]
    torch.testing.assert_close(torch.stack(step_logits), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("image_encoder", ["linear", "unet"])
def test_cached_denoising_prediction_equals_full_recomputation(image_encoder):
    model = tiny_model(image_encoder)
    prompt = [[30, 31, 32, 33]]
    cache, _ = prefill(model, prompt, force_image=True)
    length_before = cache.length
    grid = (2, 3)
    for t in (900, 250, 0):  # successive steps overwrite the uncommitted patches
        x_t = torch.randn(6, model.config.patch_dim)
        cached = model.extend_image(cache, x_t[None], torch.tensor([t]), grid, commit=False)[0]
        assert cache.length == length_before
        _, full, _ = full_forward(model, prompt + [unpatchify(x_t, grid, 2)], timesteps=[t])
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_stacked_cache_rows_equal_their_own_caches():
    """CFG batches a long conditional row with the short unconditional one, right-aligned."""
    model = tiny_model()
    conditional, _ = prefill(model, [[1, 2, 3, 4, 5, 6]], force_image=True)
    unconditional, _ = prefill(model, [], force_image=True)
    stacked = tc.KVCache.stack([conditional, unconditional])
    assert stacked.length == conditional.length and stacked.row_start.tolist() == [0, conditional.length - 2]
    x_t = torch.randn(4, model.config.patch_dim)
    t = torch.tensor([500, 500])
    both = model.extend_image(stacked, x_t.expand(2, 4, -1), t, (2, 2), commit=False)
    alone = [model.extend_image(c, x_t[None], t[:1], (2, 2), commit=False)[0] for c in (conditional, unconditional)]
    torch.testing.assert_close(both[0], alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[1], alone[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # the prefixes do matter


@pytest.mark.parametrize("image_encoder", ["linear", "unet"])
def test_generate_continues_like_greedy_full_recomputation(image_encoder):
    """text -> image -> text: the text after the image is the argmax of a full forward that
    reads the generated image clean (t = 0), so the cache held that image and EOI."""
    model = tiny_model(image_encoder)
    prompt = [[40, 41, 42]]
    out = model.generate(prompt, force_image=True, max_new_tokens=5, temperature=0, image_steps=4, seed=0)
    assert isinstance(out[0], torch.Tensor) and out[0].shape == (3, 4, 4)
    assert len(out) == 2 and isinstance(out[1], list) and len(out[1]) == 5, "greedy with no BOI/EOS drawn"
    text = out[1]
    hidden, _, _ = full_forward(model, prompt + [out[0], text], timesteps=[0])
    after_eoi = 1 + 3 + 1 + 4 + 1  # BOS, prompt, BOI, patches, EOI
    argmax = model.logits(hidden).argmax(dim=-1)
    assert argmax[after_eoi - 1:after_eoi - 1 + 5].tolist() == text


def test_generated_image_enters_the_cache_clean():
    """After diffusion mode, EOI and the next tokens see the final image at t = 0."""
    model = tiny_model("unet")
    prompt = [[40, 41, 42]]
    cache, _ = prefill(model, prompt, force_image=True)
    image = generate.generate_image(model, cache, (4, 4), steps=3, sampler="ddpm", cfg_scale=None, clip_x0=1.0,
                                    generator=torch.Generator().manual_seed(0))
    assert image.abs().max() <= 1.0 and image.std() > 0.1
    assert cache.length == 1 + 3 + 1 + 4
    logits = [model.extend_text(cache, torch.tensor([[model.config.eoi_id]]))[0, -1]]
    logits.append(model.extend_text(cache, torch.tensor([[50]]))[0, -1])
    hidden, _, _ = full_forward(model, prompt + [image, [50]], timesteps=[0])
    eoi = 1 + 3 + 1 + 4
    torch.testing.assert_close(torch.stack(logits), model.logits(hidden)[eoi:eoi + 2], rtol=1e-5, atol=1e-5)


def test_generation_modes_and_output_structure():
    model = tiny_model()
    image = torch.randn(3, 4, 4)
    caption = model.generate([image], max_new_tokens=4, seed=0)  # image -> text
    assert len(caption) == 1 and isinstance(caption[0], list) and 1 <= len(caption[0]) <= 4
    specials = {model.config.bos_id, model.config.eos_id, model.config.boi_id, model.config.eoi_id}
    assert not specials & set(caption[0])
    text = model.generate([[1, 2, 3]], max_new_tokens=3, temperature=0.8, top_k=20, top_p=0.9, seed=0)
    assert len(text) == 1 and isinstance(text[0], list) and 1 <= len(text[0]) <= 3
    picture = model.generate([[1, 2]], force_image=True, max_new_tokens=0, image_size=(4, 6), image_steps=3,
                             sampler="ddim", seed=0)
    assert len(picture) == 1 and picture[0].shape == (3, 4, 6) and torch.isfinite(picture[0]).all()


def test_fixed_seed_reproduces_generation():
    model = tiny_model("unet")
    kwargs = dict(force_image=True, max_new_tokens=6, image_steps=3, cfg_scale=2.0)
    a = model.generate([[5, 6]], seed=7, **kwargs)
    b = model.generate([[5, 6]], seed=7, **kwargs)
    c = model.generate([[5, 6]], seed=8, **kwargs)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert not torch.equal(a[0], c[0])


def test_cfg_scale_one_equals_the_conditional_prediction():
    model = tiny_model()
    kwargs = dict(force_image=True, max_new_tokens=0, image_steps=4, seed=3)
    unguided = model.generate([[7, 8, 9]], cfg_scale=None, **kwargs)[0]
    scale_one = model.generate([[7, 8, 9]], cfg_scale=1.0, **kwargs)[0]
    guided = model.generate([[7, 8, 9]], cfg_scale=4.0, **kwargs)[0]
    torch.testing.assert_close(scale_one, unguided, rtol=1e-5, atol=1e-5)
    assert (guided - unguided).abs().max() > 1e-2


# ------------------------------------------------------------------ sampling steps
def test_token_sampling_filters():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -1.0])
    g = torch.Generator().manual_seed(0)
    assert sample_token(logits, 0.0, None, None, g) == 1
    assert {sample_token(logits, 1.0, 1, None, g) for _ in range(20)} == {1}
    assert {sample_token(logits, 1.0, None, 1e-6, g) for _ in range(20)} == {1}
    assert {sample_token(logits, 1.0, 2, None, g) for _ in range(200)} == {1, 3}
    # Probabilities 0.024, 0.474, 0.064, 0.429, 0.009: mass 0.95 needs tokens 1, 3 and 2.
    assert {sample_token(logits, 1.0, None, 0.95, g) for _ in range(400)} == {1, 2, 3}
    assert {sample_token(logits, 1.0, None, 0.9, g) for _ in range(400)} == {1, 3}
    counts = torch.bincount(torch.tensor([sample_token(logits, 1.0, None, None, g) for _ in range(4000)]),
                            minlength=5)
    torch.testing.assert_close(counts / 4000, logits.softmax(0), atol=0.03, rtol=0)


@pytest.mark.parametrize(
    "target, kind", [("eps", "cosine"), ("x0", "linear"), ("v", "cosine"), ("flow", "rectified_flow")]
)
def test_denoise_step_with_an_exact_prediction(target, kind):
    """Given the true target, DDIM lands exactly on the forward process at the next step."""
    schedule = {"cosine": tk.NoiseSchedule.cosine, "linear": tk.NoiseSchedule.linear,
                "rectified_flow": tk.NoiseSchedule.rectified_flow}[kind]()
    x0, noise = torch.randn(8, 12, dtype=torch.float64), torch.randn(8, 12, dtype=torch.float64)

    def at(t):
        a, b = schedule.coefficients(torch.tensor([t]))
        return a.double(), b.double()

    t, s = 600, 300
    a_t, b_t = at(t)
    x_t = a_t * x0 + b_t * noise
    truth = {"eps": noise, "x0": x0, "v": a_t * noise - b_t * x0, "flow": noise - x0}[target]
    a_s, b_s = at(s)
    x_s = denoise_step(x_t, truth, t, s, schedule, target, eta=0.0)
    torch.testing.assert_close(x_s, a_s * x0 + b_s * noise)
    torch.testing.assert_close(denoise_step(x_t, truth, t, None, schedule, target, eta=0.0), x0)


def test_ddpm_step_is_the_ancestral_posterior():
    """eta = 1 between consecutive steps: DDPM's posterior mean and variance beta~_t."""
    schedule = tk.NoiseSchedule.cosine()
    ac = schedule.alphas_cumprod.double()
    t = 400
    beta = 1 - ac[t] / ac[t - 1]
    x0, noise = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    x_t = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * noise
    x_prev = denoise_step(x_t, noise, t, t - 1, schedule, "eps", eta=1.0, generator=torch.Generator().manual_seed(1))
    z = torch.randn(4, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mean = (ac[t - 1].sqrt() * beta / (1 - ac[t])) * x0 + ((1 - beta).sqrt() * (1 - ac[t - 1]) / (1 - ac[t])) * x_t
    std = ((1 - ac[t - 1]) / (1 - ac[t]) * beta).sqrt()
    torch.testing.assert_close(x_prev, mean + std * z, rtol=1e-4, atol=1e-5)


def test_diffusion_timesteps_run_down_to_zero():
    assert diffusion_timesteps(1000, 4).tolist() == [999, 666, 333, 0]
    assert diffusion_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), r"temperature: expected a finite float >= 0 \(0 is greedy\)"),
        (dict(temperature=float("inf")), r"temperature: expected a finite float >= 0"),
        (dict(top_k=0), r"top_k: expected an int >= 1"),
        (dict(top_p=0.0), r"top_p: expected None or a float in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p: expected None or a float in \(0, 1\]"),
        (dict(sampler="euler"), r"sampler: expected one of \('ddpm', 'ddim'\)"),
        (dict(image_steps=0), r"image_steps: expected an int in \[1, 1000\]"),
        (dict(image_steps=1001), r"image_steps: expected an int in \[1, 1000\]"),
        (dict(image_size=5), r"image_size: expected an int or \(H, W\), multiples of patch_size=2"),
        (dict(image_size=(4, 4, 4)), r"image_size: expected an int or \(H, W\)"),
        (dict(image_size=2**20), r"image_size: expected an int or \(H, W\)"),
        (dict(max_new_tokens=-1), r"max_new_tokens: expected an int in \[0, 2147483647\]"),
        (dict(max_new_tokens=2**31), r"max_new_tokens: expected an int in \[0, 2147483647\]"),
        (dict(clip_x0=0.0), r"clip_x0: expected None or a finite float > 0"),
        (dict(cfg_scale=float("nan")), r"cfg_scale: expected None or a finite float"),
        (dict(seed=-1), r"seed: expected an int in \[0, 18446744073709551615\]"),
    ],
)
def test_bad_generate_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().generate([[1, 2]], **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature="0"), r"temperature: expected a finite float >= 0"),
        (dict(temperature=None), r"temperature: expected"),
        (dict(top_k=2.0), r"top_k: expected an int >= 1"),
        (dict(top_p="0.9"), r"top_p: expected None or a float"),
        (dict(sampler=1), r"sampler: expected a str"),  # None: the model's default sampler
        (dict(image_steps=2.5), r"image_steps: expected an int"),
        (dict(image_size="16"), r"image_size: expected an int or \(H, W\)"),
        (dict(image_size=(4.0, 4)), r"image_size: expected an int or \(H, W\)"),
        (dict(image_size=True), r"image_size: expected an int or \(H, W\)"),
        (dict(max_new_tokens=2.0), r"max_new_tokens: expected an int in \[0, 2147483647\]"),
        (dict(clip_x0="1"), r"clip_x0: expected None or a finite float > 0"),
        (dict(cfg_scale=True), r"cfg_scale: expected None or a finite float"),
        (dict(seed=1.5), r"seed: expected an int"),
        (dict(force_image=1), r"force_image: expected a bool, got 1"),
    ],
)
def test_generate_arguments_of_the_wrong_type_are_type_errors(kwargs, message):
    with pytest.raises(TypeError, match=message):
        tiny_model().generate([[1, 2]], **kwargs)


def test_generate_needs_a_model_and_checks_its_prompt():
    with pytest.raises(TypeError, match="model: expected a Transfusion, got str"):
        generate.generate("model", [[1]])
    with pytest.raises(TypeError, match=r"prompt\[0\]: expected token ids .*complex64"):
        tiny_model().generate([torch.tensor([1 + 1j])])
    with pytest.raises(ValueError, match=r"prompt\[0\]: image has 48 NaN or infinite values"):
        tiny_model().generate([torch.full((3, 4, 4), float("nan"))])
    with pytest.raises(ValueError, match=r"steps: expected an int in \[1, 10\], got 11"):
        diffusion_timesteps(10, 11)


def test_bad_prompt_item_is_named():
    with pytest.raises(ValueError, match=r"prompt\[1\]: expected an image \[3, H, W\]"):
        tiny_model().generate([[1, 2], torch.randn(1, 4, 4)])


def test_clip_x0_bounds_the_denoised_image():
    schedule = tk.NoiseSchedule.cosine()
    x_t = 3 * torch.randn(4, 12)
    wild = torch.randn(4, 12)  # a prediction whose implied x0 leaves [-1, 1]
    x0 = denoise_step(x_t, wild, 10, None, schedule, "eps", eta=1.0, clip_x0=1.0)
    assert x0.abs().max() <= 1.0 and x0.abs().max() == 1.0
    image = tiny_model().generate([[1]], force_image=True, max_new_tokens=0, image_steps=3, clip_x0=1.0, seed=0)[0]
    assert image.abs().max() <= 1.0


def test_the_generate_method_is_the_generate_function():
    model = tiny_model()
    kwargs = dict(force_image=True, max_new_tokens=2, image_steps=2, seed=5)
    by_method, by_function = model.generate([[3, 4]], **kwargs), generate.generate(model, [[3, 4]], **kwargs)
    assert len(by_method) == len(by_function)
    for x, y in zip(by_method, by_function):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert tc.Transfusion.generate is generate.generate  # one signature, one docstring
    with pytest.raises(TypeError, match="unexpected keyword argument 'steps'"):
        model.generate([[1]], steps=3)


def test_the_generate_method_names_its_options():
    """help() and editors see every option: no ``**kwargs`` hides them."""
    parameters = inspect.signature(tc.Transfusion.generate).parameters
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in parameters.values())
    assert list(inspect.signature(tiny_model().generate).parameters)[:3] == ["prompt", "max_new_tokens", "temperature"]
    assert {"cfg_scale", "timestep_spacing", "retrieved"} <= set(parameters)
    for name in parameters:
        if name != "model":
            assert f"    {name}" in tc.Transfusion.generate.__doc__ or f", {name}:" in tc.Transfusion.generate.__doc__, \
                f"{name} is not documented"


def test_generation_builds_on_the_model_and_never_the_reverse():
    """model.py holds the model and its KV cache; generate.py imports it, and model.py never names generate.py."""
    tree = ast.parse(Path(model_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported |= {node.module or ""} | {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    assert not any(name == "generate" or name.endswith(".generate") for name in imported), imported
    assert generate.KVCache is model_module.KVCache is tc.KVCache
    cache = tiny_model().new_cache(batch_size=3)
    assert isinstance(cache, tc.KVCache) and cache.batch_size == 3 and cache.length == 0


# ------------------------------------------------------------------ timestep spacings
def test_our_even_spacing_and_diffusers_names():
    assert diffusion_timesteps(1000, 4, "even").tolist() == [999, 666, 333, 0]
    assert diffusion_timesteps(1000, 4, "leading").tolist() == [750, 500, 250, 0]
    assert diffusion_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert diffusion_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]
    # Ours rounds a float32 grid laid downwards; diffusers' linspace a float64 one laid upwards.
    assert diffusion_timesteps(1000, 15, "even").tolist()[7] == 499
    assert diffusion_timesteps(1000, 15, "linspace").tolist()[7] == 500
    assert diffusion_timesteps(1000, 1, "even").tolist() == [999]
    with pytest.raises(ValueError, match=r"spacing: expected one of \('even', 'linspace', 'leading', 'trailing'\)"):
        diffusion_timesteps(1000, 4, "uniform")


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_spacings_equal_diffusers_ddim_scheduler(spacing):
    diffusers = pytest.importorskip("diffusers")  # in the test extra
    for num_timesteps in (1000, 999, 50, 7, 1):
        for steps in sorted({1, 2, 3, 7, 10, 15, 25, 50, 250, 333, 999, 1000} & set(range(1, num_timesteps + 1))):
            scheduler = diffusers.DDIMScheduler(num_train_timesteps=num_timesteps, timestep_spacing=spacing)
            scheduler.set_timesteps(steps)
            expected = scheduler.timesteps.tolist()
            assert diffusion_timesteps(num_timesteps, steps, spacing).tolist() == expected[:steps], \
                (num_timesteps, steps)
            # diffusers' trailing spacing has one value too many for some step counts: numpy's -1, no timestep.
            assert expected[steps:] in ([], [-1]), (num_timesteps, steps, expected[steps:])


@pytest.mark.parametrize("scheduler_name", ["DDIMScheduler", "DDPMScheduler"])
def test_linspace_spacing_equals_diffusers_for_every_step_count(scheduler_name):
    diffusers = pytest.importorskip("diffusers", reason="diffusers (the test extra) is the reference")
    for num_timesteps in (1000, 999, 500, 64, 7, 2, 1):
        scheduler = getattr(diffusers, scheduler_name)(num_train_timesteps=num_timesteps, timestep_spacing="linspace")
        for steps in range(1, num_timesteps + 1):
            scheduler.set_timesteps(steps)
            assert diffusion_timesteps(num_timesteps, steps, "linspace").tolist() == scheduler.timesteps.tolist(), \
                (num_timesteps, steps)


def test_linspace_spacing_rounds_numpys_grid():
    """numpy's grid value ``30 * 999 / 60`` is 499.49999999999994 and rounds to 499; a grid filled from
    the stop down, as torch's linspace fills its upper half, has 499.50000000000006 there, rounded to 500."""
    timesteps = diffusion_timesteps(1000, 61, "linspace").tolist()
    assert timesteps[29:32] == [516, 499, 483]
    assert timesteps[0] == 999 and timesteps[-1] == 0
    assert diffusion_timesteps(1, 1, "linspace").tolist() == [0]
    assert diffusion_timesteps(1000, 1, "linspace").tolist() == [0]


@pytest.mark.parametrize("spacing", ["even", "linspace", "leading", "trailing"])
def test_every_spacing_gives_steps_distinct_timesteps_of_the_training_steps(spacing):
    """For every step count: exactly ``steps`` distinct, decreasing timesteps in ``[0, T)``. numpy's
    ``arange(T, 0, -T / steps)``, which diffusers' trailing spacing calls, has one element too many
    for 430 of the 1000 step counts of T = 1000 (61, 103, ...), the extra one -1."""
    for num_timesteps in (1000, 999, 7):
        for steps in range(1, num_timesteps + 1):
            timesteps = diffusion_timesteps(num_timesteps, steps, spacing)
            assert timesteps.shape == (steps,), (num_timesteps, steps)
            assert timesteps.min() >= 0 and timesteps.max() < num_timesteps, (num_timesteps, steps)
            assert (timesteps[1:] < timesteps[:-1]).all(), (num_timesteps, steps)
    if spacing == "trailing":  # diffusers' first 61 values, without its -1
        assert diffusion_timesteps(1000, 61, spacing)[-4:].tolist() == [65, 48, 32, 15]


def test_generate_takes_a_timestep_spacing():
    model = tiny_model()
    kwargs = dict(force_image=True, max_new_tokens=0, image_steps=3, sampler="ddim", seed=1)
    images = {spacing: model.generate([[1, 2]], timestep_spacing=spacing, **kwargs)[0]
              for spacing in ("even", "leading", "trailing")}
    torch.testing.assert_close(images["even"], model.generate([[1, 2]], **kwargs)[0], rtol=0, atol=0)
    assert not torch.allclose(images["even"], images["leading"]) and not torch.allclose(images["even"],
                                                                                         images["trailing"])


# ------------------------------------------------------------------ continuous-time flow
def flow_model(image_encoder="linear", target="flow", **fields):
    return tiny_model(image_encoder, noise_schedule="flow", diffusion_target=target, **fields)


@pytest.mark.parametrize("image_encoder", ["linear", "unet"])
def test_cached_flow_prediction_equals_full_recomputation(image_encoder):
    model = flow_model(image_encoder)
    prompt = [[30, 31, 32, 33]]
    cache, _ = prefill(model, prompt, force_image=True)
    grid = (2, 3)
    for t in (1.0, 0.73, 1e-3, 0.0):  # float times, successive calls overwrite the uncommitted patches
        x_t = torch.randn(6, model.config.patch_dim)
        cached = model.extend_image(cache, x_t[None], torch.tensor([t]), grid, commit=False)[0]
        _, full, _ = full_forward(model, prompt + [unpatchify(x_t, grid, 2)], timesteps=[t])
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_generation_equals_the_integration_of_full_recomputations(sampler):
    """Every model call of the cached sampler equals a full forward of prompt + noisy image: the
    whole run, guidance included, reproduced by integrate_flow over full recomputations."""
    model = flow_model(flow_shift=2.0)
    prompt = [[5, 6, 7]]
    kwargs = dict(force_image=True, max_new_tokens=0, image_steps=3, sampler=sampler, cfg_scale=2.0, seed=4)
    cached = model.generate(prompt, **kwargs)[0]
    x1 = torch.randn(4, model.config.patch_dim, generator=torch.Generator().manual_seed(4))

    def predict(x, t):
        image = unpatchify(x, (2, 2), 2)
        cond = full_forward(model, prompt + [image], timesteps=[t])[1]
        uncond = full_forward(model, [image], timesteps=[t])[1]
        return cond + (2.0 - 1.0) * (cond - uncond)

    full = integrate_flow(x1, predict, steps=3, sampler=sampler, target="flow", shift=2.0)
    torch.testing.assert_close(cached, unpatchify(full, (2, 2), 2), rtol=1e-4, atol=1e-5)


def test_flow_generation_continues_after_the_clean_image():
    """text -> image -> text: the image enters the cache clean (t = 0.0) and EOI follows."""
    model = flow_model("unet")
    prompt = [[40, 41, 42]]
    out = model.generate(prompt, force_image=True, max_new_tokens=5, temperature=0, image_steps=4, seed=0)
    assert isinstance(out[0], torch.Tensor) and out[0].shape == (3, 4, 4) and torch.isfinite(out[0]).all()
    hidden, _, _ = full_forward(model, prompt + [out[0], out[1]], timesteps=[0.0])
    after_eoi = 1 + 3 + 1 + 4 + 1
    assert model.logits(hidden).argmax(dim=-1)[after_eoi - 1:after_eoi - 1 + 5].tolist() == out[1]
    caption = model.generate([out[0]], max_new_tokens=3, temperature=0, seed=0)  # an image prompt, read at t = 0.0
    assert len(caption) == 1 and isinstance(caption[0], list)


def test_flow_generation_is_seeded_and_guidance_one_is_unguided():
    model = flow_model(target="v")
    kwargs = dict(force_image=True, max_new_tokens=0, image_steps=4, seed=3)
    unguided = model.generate([[7, 8, 9]], cfg_scale=None, **kwargs)[0]
    torch.testing.assert_close(model.generate([[7, 8, 9]], cfg_scale=1.0, **kwargs)[0], unguided, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate([[7, 8, 9]], **kwargs)[0], unguided)
    assert (model.generate([[7, 8, 9]], cfg_scale=4.0, **kwargs)[0] - unguided).abs().max() > 1e-2
    assert not torch.equal(model.generate([[7, 8, 9]], **(kwargs | {"seed": 4}))[0], unguided)
    heun = model.generate([[7, 8, 9]], sampler="heun", **kwargs)[0]
    assert torch.isfinite(heun).all() and not torch.allclose(heun, unguided)
    shifted = model.generate([[7, 8, 9]], shift=3.0, **kwargs)[0]  # the shift of the time grid changes the run
    assert not torch.allclose(shifted, unguided)
    clipped = model.generate([[7, 8, 9]], clip_x0=0.05, **kwargs)[0]
    assert clipped.abs().max() <= 0.05 + 1e-6, "the last Euler step lands on the clipped x0"


def test_flow_times_run_from_one_to_zero_with_the_shift():
    assert flow_times(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = flow_times(4, shift=3.0).double()
    even = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(shifted, 3 * even / (1 + 2 * even), rtol=0, atol=1e-7)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and (shifted[1:-1] > even[1:-1]).all()


def test_flow_velocity_of_each_target_and_the_clip():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 8, generator=gen, dtype=torch.float64), torch.randn(3, 8, generator=gen, dtype=torch.float64)
    for t in (1.0, 0.6, 0.01):
        x_t = (1 - t) * x0 + t * noise
        for target, pred in (("flow", noise - x0), ("x0", x0), ("v", (1 - t) * noise - t * x0)):
            torch.testing.assert_close(flow_velocity(pred, x_t, t, target), noise - x0)
        clipped = flow_velocity(noise - x0, x_t, t, "flow", clip_x0=0.5)
        torch.testing.assert_close(x_t - t * clipped, x0.clamp(-0.5, 0.5))  # the implied x0 is clipped


def gaussian_prediction(mean, std, target):
    """The exact (MSE-optimal) prediction of ``target`` when the data are N(mean, std**2) per
    coordinate: x_t = (1 - t) x0 + t eps is Gaussian, so E[x0 | x_t] and E[eps | x_t] are linear."""
    def predict(x, t):
        variance = (1 - t) ** 2 * std**2 + t**2
        centred = x - (1 - t) * mean
        x0 = mean + (1 - t) * std**2 / variance * centred
        eps = t / variance * centred
        return {"flow": eps - x0, "x0": x0, "v": (1 - t) * eps - t * x0}[target]
    return predict


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_and_heun_converge_on_gaussian_data_at_their_orders(shift):
    """The ODE maps x_1 = z to mean + std * z exactly. Euler's error halves with twice the steps
    (order 1), Heun's quarters (order 2), and Heun beats Euler at equal steps; every target
    integrates to the same trajectory."""
    mean = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64)
    std = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    z = torch.randn(2048, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mean + std * z
    errors = {}
    for sampler in ("euler", "heun"):
        for steps in (8, 16, 32, 64, 128):
            x = integrate_flow(z, gaussian_prediction(mean, std, "flow"), steps=steps, sampler=sampler,
                               target="flow", shift=shift)
            errors[sampler, steps] = (x - exact).abs().max().item()
            for target in ("x0", "v"):
                other = integrate_flow(z, gaussian_prediction(mean, std, target), steps=steps, sampler=sampler,
                                       target=target, shift=shift)
                torch.testing.assert_close(other, x, rtol=0, atol=1e-9)
    for steps in (16, 32, 64):  # asymptotic from 16 steps on (shift 3 at 8 steps: Heun's order is 1.76)
        euler_order = math.log2(errors["euler", steps] / errors["euler", 2 * steps])
        heun_order = math.log2(errors["heun", steps] / errors["heun", 2 * steps])
        assert 0.9 < euler_order < 1.1, (steps, euler_order)  # 0.97-0.996 when written
        assert 1.85 < heun_order < 2.15, (steps, heun_order)  # 1.93-2.09 when written
    for steps in (8, 16, 32, 64, 128):
        assert errors["heun", steps] < errors["euler", steps] / 2, steps
    # The samples have the data's distribution (2048 samples: 4 standard errors).
    samples = integrate_flow(z, gaussian_prediction(mean, std, "flow"), steps=64, sampler="heun", target="flow",
                             shift=shift)
    assert ((samples.mean(0) - mean).abs() < 4 * std / math.sqrt(2048)).all()
    assert ((samples.std(0) / std - 1).abs() < 4 / math.sqrt(2 * 2048)).all()


@pytest.mark.parametrize("model_kind, kwargs, error, message", [
    ("flow", dict(sampler="ddim"), ValueError, r"sampler: expected one of \('euler', 'heun'\), got 'ddim'"),
    ("flow", dict(timestep_spacing="leading"), ValueError, "timestep_spacing: expected 'even' with sampler 'euler'"),
    ("flow", dict(shift=0.0), ValueError, "shift: expected None or a finite float > 0, got 0.0"),
    ("flow", dict(shift="2"), TypeError, "shift: expected None or a finite float > 0"),
    ("cosine", dict(sampler="heun"), ValueError,
     r"sampler: expected one of \('ddpm', 'ddim'\) for a model of integer steps \('heun' integrates"),
    ("cosine", dict(shift=2.0), ValueError, "shift: expected None for a model of integer steps"),
    ("cosine", dict(timestep_spacing="middle"), ValueError, r"timestep_spacing: expected one of \('even', 'linspace'"),
])
def test_bad_sampler_arguments_are_named(model_kind, kwargs, error, message):
    model = flow_model() if model_kind == "flow" else tiny_model()
    with pytest.raises(error, match=message):
        model.generate([[1, 2]], force_image=True, max_new_tokens=0, image_steps=2, **kwargs)


# ------------------------------------------------------------------ CM3Leon: text guidance, contrastive decoding
def last_logits(model, document):
    """Next-token logits ``[V]`` after a document (no EOS), from one full forward without a cache, every
    image read clean."""
    images = sum(isinstance(item, torch.Tensor) and item.is_floating_point() for item in document)
    hidden, _, batch = full_forward(model, document, timesteps=[0] * images)
    before_eos = int((batch.doc_ids[0] >= 0).sum()) - 2
    return model.logits(hidden[before_eos])


def record_scores(monkeypatch):
    """The logits each step hands to ``sample_token``, recorded."""
    seen = []
    sample = generate.sample_token

    def recording(logits, *args):
        seen.append(logits.clone())
        return sample(logits, *args)

    monkeypatch.setattr(generate, "sample_token", recording)
    return seen


def samplable(config):
    """bool ``[V]``: the tokens generation may draw (not BOS, not EOI)."""
    keep = torch.ones(config.vocab_size, dtype=torch.bool)
    keep[[config.bos_id, config.eoi_id]] = False
    return keep


def steps_of(out, max_new_tokens, eos):
    """The tokens a text-only generation drew, EOS included when it stopped there."""
    assert len(out) <= 1 and all(isinstance(x, list) for x in out), "text only"
    tokens = out[0] if out else []
    return tokens + ([eos] if len(tokens) < max_new_tokens else [])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_text_cfg_scale_one_equals_plain_sampling(monkeypatch, temperature):
    """w = 1 runs the batched unconditional row and draws exactly what plain sampling draws, for
    captioning (an image prompt) and text generation."""
    model = tiny_model()
    seen = record_scores(monkeypatch)
    for prompt in ([torch.randn(3, 4, 4)], [[60, 61, 62]]):
        kwargs = dict(max_new_tokens=8, temperature=temperature, image_steps=2, seed=4)
        plain = model.generate(prompt, **kwargs)
        plain_scores = torch.stack(seen)
        seen.clear()
        assert model.generate(prompt, text_cfg_scale=1.0, **kwargs) == plain
        torch.testing.assert_close(torch.stack(seen), plain_scores, rtol=1e-5, atol=1e-5)
        seen.clear()


def test_text_cfg_mixes_the_logits_of_two_separate_forward_passes(monkeypatch):
    """At w = 3 each step's logits are l_u + 3 (l_c - l_u), with l_c and l_u from full forwards of the
    prompt and of the unconditional prompt, each followed by the tokens drawn so far."""
    model = tiny_model()
    image = torch.randn(3, 4, 4)
    keep = samplable(model.config)
    seen = record_scores(monkeypatch)
    for prompt, unconditional_prompt in (([image], None), ([[70, 71], image, [72]], [[70, 71]])):
        seen.clear()
        out = model.generate(prompt, text_cfg_scale=3.0, unconditional_prompt=unconditional_prompt,
                             max_new_tokens=6, temperature=1.0, image_steps=2, seed=1)
        tokens = steps_of(out, 6, model.config.eos_id)
        assert len(seen) == len(tokens) >= 2
        for i, scores in enumerate(seen):
            conditional = last_logits(model, prompt + [tokens[:i]])
            unconditional = last_logits(model, (unconditional_prompt or []) + [tokens[:i]])
            expected = unconditional + 3.0 * (conditional - unconditional)
            assert (scores[~keep] == float("-inf")).all()
            torch.testing.assert_close(scores[keep], expected[keep], rtol=1e-4, atol=1e-4)
            assert (scores[keep] - conditional[keep]).abs().max() > 0.1, "guidance moves the logits"


def test_text_cfg_around_a_generated_image(monkeypatch):
    """text -> image -> text with text guidance: the image is the unguided-text run's (it is conditioned
    on the prompt row) and is committed into both rows; the logits after it are the guided logits of full
    forwards that read it clean, and greedy draws their argmax."""
    model = tiny_model()
    prompt, kwargs = [[40, 41, 42]], dict(force_image=True, temperature=0, image_steps=3, seed=0)
    image = model.generate(prompt, max_new_tokens=0, **kwargs)[0]
    seen = record_scores(monkeypatch)
    out = model.generate(prompt, text_cfg_scale=2.0, max_new_tokens=4, **kwargs)
    torch.testing.assert_close(out[0], image, rtol=1e-5, atol=1e-5)
    assert len(out) == 2 and isinstance(out[1], list)
    tokens = out[1] + ([model.config.eos_id] if len(out[1]) < 4 else [])
    assert len(seen) == len(tokens)
    keep = samplable(model.config)
    for i, (token, scores) in enumerate(zip(tokens, seen)):
        conditional = last_logits(model, prompt + [out[0], out[1][:i]])
        unconditional = last_logits(model, [out[0], out[1][:i]])  # BOS, BOI, the image, EOI, the text
        guided = (unconditional + 2.0 * (conditional - unconditional)).masked_fill(~keep, float("-inf"))
        torch.testing.assert_close(scores, guided, rtol=1e-4, atol=1e-4)
        assert int(guided.argmax()) == token, i


def test_contrastive_logits_on_a_hand_computed_example():
    p_c = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    p_u = torch.tensor([0.6, 0.1, 0.1, 0.199, 0.001])
    l_c, l_u = p_c.log() + 2.0, p_u.log() - 1.0  # unnormalised: contrastive_logits takes logits
    inf = float("inf")
    # alpha = 0.1, k = 1: plausible when p_c >= 0.1 * 0.5 = 0.05, tokens 0-3; scores log(p_c / p_u).
    scores = generate.contrastive_logits(l_c, l_u, 0.1)
    expected = torch.tensor([math.log(0.5 / 0.6), math.log(0.3 / 0.1), 0.0, math.log(0.06 / 0.199), -inf])
    torch.testing.assert_close(scores, expected)
    assert int(scores.argmax()) == 1 and int(l_c.argmax()) == 0  # not the likeliest token: the most contrastive
    # alpha = 0.05 admits token 4 (0.04 >= 0.025), whose ratio 40 wins.
    assert int(generate.contrastive_logits(l_c, l_u, 0.05).argmax()) == 4
    # alpha = 0.25: the top probability keeps p_c >= 0.125 (tokens 0, 1); the 2nd (k = 2) p_c >= 0.075 (0, 1, 2).
    assert generate.contrastive_logits(l_c, l_u, 0.25).isfinite().tolist() == [True, True, False, False, False]
    assert generate.contrastive_logits(l_c, l_u, 0.25, k=2).isfinite().tolist() == [True, True, True, False, False]
    # alpha = 1, k = 1 keeps the top token alone: greedy decoding.
    assert generate.contrastive_logits(l_c, l_u, 1.0).isfinite().tolist() == [True, False, False, False, False]
    # A token whose logit is -inf (never sampled) is never plausible, nor NaN, even when k reaches it.
    masked_c, masked_u = l_c.clone(), l_u.clone()
    masked_c[4] = masked_u[4] = -inf
    scores = generate.contrastive_logits(masked_c, masked_u, 0.01, k=5)
    assert not scores.isnan().any() and scores[4] == -inf and scores[:4].isfinite().all()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_contrastive_decoding_ranks_tokens_by_two_separate_forward_passes(monkeypatch, temperature):
    """Captioning with CD-K (alpha = 0.1, k = 2): each step's scores are contrastive_logits of the
    conditional and unconditional logits of full forwards (BOS and EOI excluded); greedy draws their argmax."""
    model = tiny_model()
    prompt = [torch.randn(3, 4, 4)]
    keep = samplable(model.config)
    seen = record_scores(monkeypatch)
    out = model.generate(prompt, contrastive_alpha=0.1, contrastive_k=2, max_new_tokens=6,
                         temperature=temperature, image_steps=2, seed=2)
    tokens = steps_of(out, 6, model.config.eos_id)
    assert len(seen) == len(tokens) >= 2
    for i, scores in enumerate(seen):
        conditional = last_logits(model, prompt + [tokens[:i]]).masked_fill(~keep, float("-inf"))
        unconditional = last_logits(model, [tokens[:i]]).masked_fill(~keep, float("-inf"))
        expected = generate.contrastive_logits(conditional, unconditional, 0.1, k=2)
        assert torch.equal(scores.isfinite(), expected.isfinite())
        torch.testing.assert_close(scores[expected.isfinite()], expected[expected.isfinite()], rtol=1e-4, atol=1e-4)
        if temperature == 0:
            assert tokens[i] == int(expected.argmax())
    if temperature == 0:
        assert out != model.generate(prompt, max_new_tokens=6, temperature=0), "contrastive is not greedy here"


def test_retrieved_documents_precede_the_prompt_as_the_packer_lays_them_out(monkeypatch):
    """generate(retrieved=...) reads the retrieved documents as Packer(retrieval_mask="visible") places
    them: greedy tokens are the argmax of a full forward of that packed batch."""
    model = tiny_model()
    retrieved = [[[80, 81], torch.randn(3, 4, 4)], [[90]]]
    prompt = [[60, 61]]
    seen = record_scores(monkeypatch)
    out = model.generate(prompt, retrieved=retrieved, max_new_tokens=5, temperature=0)
    text = out[0]
    batch = tc.Packer(model.config, 64, retrieval_mask="visible")([prompt + [text]], retrieved=[retrieved])
    batch.timesteps.zero_()  # retrieved images are read clean
    with torch.no_grad():
        hidden, _ = model.predict(batch, batch.patches)
    last_prompt = (1 + 2 + 1 + 4 + 1 + 1) + (1 + 1 + 1) + (1 + 2) - 1
    assert model.logits(hidden[0]).argmax(-1)[last_prompt:last_prompt + len(text)].tolist() == text
    with_retrieval = seen[0]
    seen.clear()
    model.generate(prompt, max_new_tokens=1, temperature=0)
    keep = samplable(model.config)
    assert (with_retrieval[keep] - seen[0][keep]).abs().max() > 0.1, "the retrieved documents matter"


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(text_cfg_scale="2"), TypeError, "text_cfg_scale: expected None or a finite float"),
    (dict(text_cfg_scale=float("inf")), ValueError, "text_cfg_scale: expected None or a finite float"),
    (dict(contrastive_alpha=0.0), ValueError, r"contrastive_alpha: expected None or a float in \(0, 1\]"),
    (dict(contrastive_alpha=1.5), ValueError, r"contrastive_alpha: expected None or a float in \(0, 1\]"),
    (dict(contrastive_alpha="0.1"), TypeError, "contrastive_alpha: expected None or a float"),
    (dict(contrastive_alpha=0.1, contrastive_k=0), ValueError, r"contrastive_k: expected an int in \[1, 258\]"),
    (dict(contrastive_alpha=0.1, contrastive_k=2.0), TypeError, "contrastive_k: expected an int"),
    (dict(contrastive_k=3), ValueError, "contrastive_k: only read with contrastive_alpha, got 3"),
    (dict(contrastive_alpha=0.1, text_cfg_scale=2.0), ValueError, "text_cfg_scale: expected None with contrastive"),
    (dict(unconditional_prompt=[[1]]), ValueError, "unconditional_prompt: only read with text_cfg_scale or"),
    (dict(text_cfg_scale=2.0, unconditional_prompt=[[1, 300]]), ValueError,
     r"unconditional_prompt\[0\]: token ids must lie in"),
    (dict(retrieved="abc"), TypeError, "retrieved: expected None or a list of documents, got str"),
    (dict(retrieved=[[torch.randn(1, 4, 4)]]), ValueError, r"retrieved\[0\]\[0\]: expected an image \[3, H, W\]"),
])
def test_bad_text_guidance_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        tiny_model().generate([[1, 2]], max_new_tokens=1, **kwargs)


def test_readme_cm3leon_snippet_runs():
    """The README's CM3Leon snippet runs as written: packing with a retrieved pair, a guided caption and
    contrastive decoding."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n### CM3Leon: retrieval-augmented, guided decoding\n")[1].split("\n## ")[0]
    code = section.split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
    assert namespace["caption"] and namespace["text"]
