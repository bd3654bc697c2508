"""Generation: the sampling steps and the mixed-modal loop ``generate(model, prompt)``, also the model's
method ``model.generate(prompt)``.

This module builds on ``model.py`` (the model and its ``KVCache``), never the reverse. LM mode samples
text tokens through the cache (``sample_token``: temperature, top-k, top-p). At BOI it switches to
diffusion mode: it appends ``(H/p)*(W/p)`` noise patches, denoises them against the cached prefix
(optional classifier-free guidance), writes the clean image into the cache, then EOI, and returns to
LM mode.

CM3Leon's decoding in LM mode: classifier-free guidance on logits (``guided_logits``) and
contrastive top-k decoding (``contrastive_logits``) both read a second, unconditional (or weaker)
row, ``BOS`` alone by default, that rides in the same cache batch as the prompt and receives the
same continuation; retrieved documents can precede the prompt as they do in training
(``Packer(retrieval_mask="visible")``).

Two families of samplers, by the model's diffusion mode:

- integer steps (DDPM kinds, ``rectified_flow``): ``denoise_step``, DDPM's ancestral step or
  DDIM's deterministic one, for any ``tk.NoiseSchedule`` (the forward process is ``x_t = a_t * x0
  + b_t * noise`` with ``(a_t, b_t) = schedule.coefficients(t)``), on the timesteps of
  ``diffusion_timesteps`` (``TIMESTEP_SPACINGS``: ours, and diffusers' three);
- continuous time (``noise_schedule="flow"``): ``integrate_flow`` solves the probability-flow ODE
  ``dx/dt = v(x, t)`` from ``t = 1`` (noise) to ``t = 0`` with Euler or Heun steps on the shifted
  grid of ``flow_times``; ``flow_velocity`` turns any target's prediction into ``v``.

Shapes: ``B`` cache rows, ``n`` new positions, ``V`` vocabulary, ``Hkv`` key/value heads, ``Dh``
head dim, ``C*p*p`` values per patch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tfkernels._checks import check_choice, check_float, check_int

from .config import TransfusionConfig, is_int
from .data import document_segments, patchify, unpatchify
from .model import KVCache, Transfusion

SAMPLERS = {"ddpm": 1.0, "ddim": 0.0}  # name -> eta: 1 is DDPM's ancestral step, 0 is DDIM's
FLOW_SAMPLERS = ("euler", "heun")  # ODE steps of a continuous-time model
# Where the steps of a DDPM/DDIM run fall among the T training steps (``diffusion_timesteps``).
TIMESTEP_SPACINGS = ("even", "linspace", "leading", "trailing")


# ----------------------------------------------------------------------------------------------
# Sampling steps
# ----------------------------------------------------------------------------------------------
def sample_token(logits: torch.Tensor, temperature: float, top_k, top_p, generator: torch.Generator) -> int:
    """One token from logits ``[V]``: greedy when ``temperature == 0``, else softmax sampling
    restricted to the ``top_k`` likeliest tokens and to the smallest set of mass ``top_p``."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth_largest = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the likelier ones already reach top_p (the likeliest always stays).
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def guided_logits(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on next-token logits (CM3Leon, after Gafni et al.'s Make-A-Scene):
    ``l_u + w * (l_c - l_u)`` for ``w = scale``, written ``l_c + (w - 1) * (l_c - l_u)`` so that
    ``w = 1`` gives the conditional logits exactly. Any shape; float32 out."""
    conditional, unconditional = conditional.float(), unconditional.float()
    return conditional + (scale - 1.0) * (conditional - unconditional)


def contrastive_logits(conditional: torch.Tensor, unconditional: torch.Tensor, alpha: float, k: int = 1):
    """Contrastive top-k decoding scores (CM3Leon's CD-K; Li et al.'s contrastive decoding at ``k = 1``).

    From the conditional ("expert") and unconditional or weaker ("amateur") logits ``[V]``: a
    token is plausible when its conditional probability is at least ``alpha`` times the ``k``-th
    largest conditional probability (CD's adaptive plausibility constraint takes the largest;
    CD-K's ``k``-th largest keeps more candidates when the top token is very likely). A plausible
    token scores ``log p_c - log p_u``, any other ``-inf``: float32 ``[V]``, to be maximised
    (greedy) or sampled from as logits. Tokens with ``-inf`` logits are never plausible.
    """
    log_c = conditional.float().log_softmax(dim=-1)
    log_u = unconditional.float().log_softmax(dim=-1)
    threshold = math.log(alpha) + torch.topk(log_c, k).values[-1]  # p_c >= alpha * kth-largest p_c, in logs
    plausible = (log_c >= threshold) & (log_c > float("-inf"))
    return torch.where(plausible, log_c - log_u, float("-inf"))


def diffusion_timesteps(num_timesteps: int, steps: int, spacing: str = "even") -> torch.Tensor:
    """``steps`` distinct timesteps, decreasing, of the ``num_timesteps`` training steps: int64 ``[steps]``.

    ``spacing`` (diffusers' ``timestep_spacing`` names, Lin et al. 2024, table 2, for the last three):

    - ``"even"`` (ours, the default): evenly spaced from ``T - 1`` down to 0, both included,
      rounded (``linspace(T - 1, 0, steps)`` in float32): the run starts from the noisiest step.
    - ``"linspace"``: diffusers' ``linspace``, numpy's ``linspace(0, T - 1, steps)`` (float64
      ``i * (T - 1) / (steps - 1)``, the last value ``T - 1``), rounded half to even, reversed: equal to
      diffusers' for every ``T`` and ``steps``. Equal to ``"even"`` but at rounding ties (137 of the
      step counts of ``T = 1000``; 15 steps: ``..., 571, 500, 428, ...`` where ours has 499) and for
      one step (0, ours ``T - 1``).
    - ``"leading"``: ``k * (T // steps)`` for ``k = steps - 1 .. 0`` (diffusers' DDPM/DDIM default,
      Stable Diffusion's; without its ``steps_offset``): never starts at the noisiest step.
    - ``"trailing"``: ``round(T - k * T / steps) - 1`` for ``k = 0 .. steps - 1``: starts at
      ``T - 1`` and ends at ``T / steps - 1``, not 0.
    """
    check_int("num_timesteps", num_timesteps, 1)
    check_int("steps", steps, 1, num_timesteps)
    check_choice("spacing", spacing, TIMESTEP_SPACINGS)
    if spacing == "even":
        return torch.linspace(num_timesteps - 1, 0, steps).round().to(torch.int64)
    if spacing == "linspace":
        # numpy's linspace, as diffusers calls it: i * step, the last value set to the stop. torch's linspace
        # fills its upper half from the stop down, which rounds differently at .5 ties (T = 1000, 61 steps).
        values = torch.arange(steps, dtype=torch.float64) * ((num_timesteps - 1) / max(steps - 1, 1))
        values[-1] = num_timesteps - 1 if steps > 1 else 0
        return values.round().flip(0).to(torch.int64)
    if spacing == "leading":
        return (torch.arange(steps - 1, -1, -1, dtype=torch.int64) * (num_timesteps // steps))
    # numpy's arange(T, 0, -T / steps), as diffusers calls it: numpy fills T + i * (a[1] - a[0]), whose
    # rounding differs from T - i * T / steps at ties (999 steps of 50: 499.4999... vs 499.5). Its first
    # `steps` values only: for many step counts (430 of 1000 at T = 1000, e.g. 61) rounding makes numpy's
    # length ceil(T / (T / steps)) one more, and the extra value, -1, is no timestep.
    step = -num_timesteps / steps
    values = num_timesteps + torch.arange(steps, dtype=torch.float64) * ((num_timesteps + step) - num_timesteps)
    return values.round().to(torch.int64) - 1


def flow_times(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The time grid of a continuous-time sampler: float32 ``[steps + 1]`` from 1 (noise) down to 0,
    ``shift * s / (1 + (shift - 1) * s)`` of the even grid ``s = 1 - i / steps`` (SD3's shift:
    ``shift > 1`` spends more steps at high noise). Computed in float64, rounded once."""
    check_int("steps", steps, 1)
    if check_float("shift", shift, what="a finite float > 0") <= 0:
        raise ValueError(f"shift: expected a finite float > 0, got {shift!r}")
    even = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return (shift * even / (1 + (shift - 1) * even)).to(torch.float32)


def split_prediction(pred, x_t, a, b, target: str):
    """The model's prediction of ``target`` at ``x_t = a*x0 + b*noise`` -> ``(x0, noise)``."""
    if target == "eps":
        return (x_t - b * pred) / a, pred
    if target == "x0":
        return pred, (x_t - a * pred) / b
    if target == "v":  # v = a*noise - b*x0 (Salimans & Ho); invert [[a, b], [-b, a]]
        norm = a**2 + b**2
        return (a * x_t - b * pred) / norm, (b * x_t + a * pred) / norm
    # "flow": velocity = noise - x0, so x_t = (a + b)*x0 + b*velocity
    x0 = (x_t - b * pred) / (a + b)
    return x0, pred + x0


def denoise_step(x_t, pred, t: int, t_next, schedule, target: str, *, eta: float, clip_x0=None, generator=None):
    """One reverse step from ``t`` to ``t_next < t`` (``None``: to the clean image).

    The step samples ``x_{t_next}`` given the predicted ``x0`` and noise, with posterior standard
    deviation ``eta * sigma``: ``eta = 1`` is DDPM's ancestral step (exactly DDPM's posterior when
    ``t_next = t - 1``), ``eta = 0`` DDIM's deterministic step (Song et al., eq. 12 and 16,
    written with the general coefficients so that any schedule works). ``clip_x0`` clamps the
    predicted ``x0`` and takes the noise that goes with it, as DDPM's posterior mean does.
    """
    device = x_t.device
    a_t, b_t = (c.to(device) for c in schedule.coefficients(torch.tensor([t], device=device)))
    x0, noise = split_prediction(pred, x_t, a_t, b_t, target)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        noise = (x_t - a_t * x0) / b_t
    if t_next is None:
        return x0
    a_s, b_s = (c.to(device) for c in schedule.coefficients(torch.tensor([t_next], device=device)))
    # Posterior variance of x_s given x_t and x0 for x_t = (a_t/a_s) x_s + fresh noise.
    variance = b_s**2 * (b_t**2 - (a_t / a_s) ** 2 * b_s**2).clamp(min=0) / b_t**2
    sigma = eta * variance.sqrt()
    x_s = a_s * x0 + (b_s**2 - sigma**2).clamp(min=0).sqrt() * noise
    if eta > 0:
        x_s = x_s + sigma * torch.randn(x_t.shape, device=device, generator=generator, dtype=x_t.dtype)
    return x_s


def flow_velocity(pred: torch.Tensor, x_t: torch.Tensor, t: float, target: str, clip_x0=None) -> torch.Tensor:
    """The velocity ``v = noise - x0`` at ``x_t = (1 - t) x0 + t noise`` from a prediction of ``target``
    (``t`` in ``(0, 1]``; any target but ``"eps"`` at ``t = 1``, where it does not determine x0).
    ``clip_x0`` clamps the implied x0 and takes the noise that goes with it, as ``denoise_step`` does;
    then ``v = (x_t - x0) / t``."""
    if target == "flow" and clip_x0 is None:
        return pred  # exactly: no round trip through x0 and the noise
    x0, noise = split_prediction(pred, x_t, 1.0 - t, t, target)
    if clip_x0 is None:
        return noise - x0
    return (x_t - x0.clamp(-clip_x0, clip_x0)) / t


def integrate_flow(x: torch.Tensor, predict, *, steps: int, sampler: str, target: str, shift: float = 1.0,
                   clip_x0=None) -> torch.Tensor:
    """Solve ``dx/dt = v(x, t)`` from ``t = 1`` (``x``: the noise) to ``t = 0``: the clean sample.

    ``predict(x, t)`` returns the model's prediction of ``target`` at ``x`` and the float ``t`` (the
    float32 grid value of ``flow_times(steps, shift)``, as a Python float). ``sampler``: ``"euler"``
    (one prediction per step, first order) or ``"heun"`` (Euler's step, then the trapezoid of the
    velocities at both ends: second order, two predictions per step). As in Karras et al. 2022
    (Algorithm 1), Heun's last step, which ends at ``t = 0``, is an Euler step: the velocity at
    ``t = 0`` is not defined for every target; so Heun takes ``2 * steps - 1`` predictions.
    """
    check_choice("sampler", sampler, FLOW_SAMPLERS)
    times = flow_times(steps, shift).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        velocity = flow_velocity(predict(x, t), x, t, target, clip_x0)
        euler = x + (t_next - t) * velocity
        if sampler == "euler" or t_next == 0:
            x = euler
            continue
        velocity_next = flow_velocity(predict(euler, t_next), euler, t_next, target, clip_x0)
        x = x + (t_next - t) * 0.5 * (velocity + velocity_next)
    return x


# ----------------------------------------------------------------------------------------------
# The generation loop
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(
    model: Transfusion,
    prompt,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    force_image: bool = False,
    image_size: int | tuple[int, int] | None = None,
    image_steps: int = 250,
    sampler: str | None = None,
    cfg_scale: float | None = None,
    clip_x0: float | None = None,
    seed: int | None = None,
    timestep_spacing: str = "even",
    shift: float | None = None,
    text_cfg_scale: float | None = None,
    contrastive_alpha: float | None = None,
    contrastive_k: int = 1,
    unconditional_prompt=None,
    retrieved=None,
) -> list:
    """Continue a mixed-modal prompt: text in LM mode, images in diffusion mode.

    Args:
        prompt: list of token-id lists and image latents ``[C, H, W]`` (a document without
            EOS). An image in the prompt is read clean (t = 0): captioning.
        max_new_tokens: most text tokens to sample (a sampled BOI counts, a forced one not).
        temperature: softmax temperature; 0 is greedy (argmax).
        top_k, top_p: keep the ``top_k`` likeliest tokens / the smallest set of mass ``top_p``.
        force_image: start with BOI, so that the first thing generated is an image
            (text -> image; with ``max_new_tokens=0`` the image is all that is generated).
        image_size: latent side ``H = W``, or ``(H, W)``; ``config.image_size`` by default.
        image_steps: denoising steps per image (at most ``num_timesteps``).
        sampler: for a model of integer steps ``"ddpm"`` (ancestral, as in the paper; the default)
            or ``"ddim"`` (deterministic, for fewer steps); for a continuous-time model
            (``noise_schedule="flow"``) ``"euler"`` (the default) or ``"heun"`` (second order, two
            model calls per step but the last).
        cfg_scale: classifier-free guidance scale ``s``; the prediction is
            ``cond + (s - 1) * (cond - uncond)`` with ``uncond`` from the prefix ``BOS, BOI``
            batched alongside. ``None``: no guidance (and no unconditional row).
        clip_x0: clamp each step's predicted clean image to ``[-clip_x0, clip_x0]`` (1.0 for
            pixels in [-1, 1], as DDPM samplers do; ``None`` for unbounded latents).
        seed: seed of every random choice (tokens and noise), an int in ``[0, 2**64)``; ``None``
            draws one.
        timestep_spacing: ddpm/ddim only: where the ``image_steps`` steps fall among the training
            steps, one of ``TIMESTEP_SPACINGS`` (``diffusion_timesteps``): ``"even"`` (ours), or
            diffusers' ``"linspace"``, ``"leading"``, ``"trailing"``.
        shift: euler/heun only: the time shift of the grid (``flow_times``); ``None``: the
            model's ``config.flow_shift``, the shift it was trained with.
        text_cfg_scale: classifier-free guidance on the text logits, scale ``w``: tokens are drawn
            from ``l_u + w * (l_c - l_u)`` (``guided_logits``; ``w = 1`` is plain sampling), with
            ``l_u`` the logits of ``unconditional_prompt`` plus the same continuation, run as a
            second row of the cache batch (its own keys and values). Then temperature, top-k and
            top-p act on the guided logits. For captioning and text generation.
        contrastive_alpha: contrastive top-k decoding (``contrastive_logits``) with plausibility
            threshold ``alpha`` in ``(0, 1]``: tokens are ranked by ``log p_c - log p_u`` among
            those with ``p_c >= alpha * (contrastive_k-th largest p_c)``; greedy at temperature 0,
            else sampled from those scores as logits. The unconditional row is
            ``text_cfg_scale``'s; the two options do not combine.
        contrastive_k: which largest conditional probability the threshold scales (CD-K's
            ``k``; 1 is Li et al.'s contrastive decoding); only with ``contrastive_alpha``.
        unconditional_prompt: the unconditional (or weaker) prompt of ``text_cfg_scale`` and
            ``contrastive_alpha``, a document like ``prompt`` (e.g. the prompt without its image,
            or without the retrieved documents); ``None``: the empty prompt, ``BOS`` alone. Image
            guidance (``cfg_scale``) keeps its own ``BOS, BOI`` prefix.
        retrieved: documents to read before the prompt, as ``Packer(retrieval_mask="visible")``
            lays them out in training (each whole, with BOS and EOS, then the prompt; one causal
            span): retrieval-augmented generation. ``None``: none.

    Returns:
        The generated continuation as a list of texts (lists of token ids, without the
        special tokens) and images (``[C, H, W]`` float32), in order. Stops at EOS or
        after ``max_new_tokens``.

    An argument of the wrong type raises ``TypeError`` (``temperature="0"``, ``seed=1.5``,
    ``force_image=1``), one out of range ``ValueError``, the message naming it; the prompt is
    checked as a document (``data.document_segments``).
    """
    if not isinstance(model, Transfusion):
        raise TypeError(f"model: expected a Transfusion, got {type(model).__name__}")
    config = model.config
    temperature, top_p, cfg_scale, clip_x0 = _check_generate_args(
        max_new_tokens, temperature, top_k, top_p, force_image, image_steps, cfg_scale, clip_x0, seed, config
    )
    sampler, shift = _check_sampler_args(sampler, timestep_spacing, shift, config)
    text_cfg_scale, contrastive_alpha = _check_text_guidance_args(
        text_cfg_scale, contrastive_alpha, contrastive_k, unconditional_prompt, config
    )
    image_hw = _image_hw(image_size if image_size is not None else config.image_size, config.patch_size)
    generator = torch.Generator(device=model.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    segments = _retrieved_segments(retrieved, config) + document_segments(prompt, config, add_eos=False,
                                                                           name="prompt")
    unconditional_segments = None
    if text_cfg_scale is not None or contrastive_alpha is not None:
        unconditional_segments = document_segments([] if unconditional_prompt is None else unconditional_prompt,
                                                   config, add_eos=False, name="unconditional_prompt")
    if force_image:  # the continuation, forced BOI included, follows both prompts
        for runs in [segments] + ([unconditional_segments] if unconditional_segments else []):
            runs[-1] = torch.cat([runs[-1], torch.tensor([config.boi_id])])
    cache = model.new_cache()
    logits = prefill(model, cache, segments)[None]  # [B, V]: row 0 conditional, row 1 unconditional
    if unconditional_segments is not None:
        unconditional = model.new_cache()
        logits = torch.stack([logits[0], prefill(model, unconditional, unconditional_segments)])
        cache = KVCache.stack([cache, unconditional])
    last_token = int(segments[-1][-1])
    never_sampled = torch.tensor([config.bos_id, config.eoi_id], device=model.device)

    def extend(token: int) -> torch.Tensor:  # the token after every row; their next-token logits [B, V]
        tokens = torch.full((cache.batch_size, 1), token, device=model.device)
        return model.extend_text(cache, tokens)[:, -1]

    outputs, text, sampled = [], [], 0
    while True:
        if last_token == config.boi_id:
            if text:
                outputs.append(text)
                text = []
            outputs.append(generate_image(model, cache, image_hw, steps=image_steps, sampler=sampler,
                                          cfg_scale=cfg_scale, clip_x0=clip_x0, generator=generator,
                                          timestep_spacing=timestep_spacing, shift=shift))
            logits = extend(config.eoi_id)
            last_token = config.eoi_id
            continue
        if sampled == max_new_tokens:
            break
        if contrastive_alpha is not None:
            scores = contrastive_logits(*logits.index_fill(1, never_sampled, float("-inf")), contrastive_alpha,
                                        contrastive_k)
        else:
            scores = logits[0] if text_cfg_scale is None else guided_logits(logits[0], logits[1], text_cfg_scale)
            scores = scores.index_fill(0, never_sampled, float("-inf"))
        last_token = sample_token(scores, temperature, top_k, top_p, generator)
        sampled += 1
        if last_token == config.eos_id:
            break
        if last_token != config.boi_id:
            text.append(last_token)
        logits = extend(last_token)
    if text:
        outputs.append(text)
    return outputs


# The method form, ``model.generate(prompt, ...)``, is this function itself: one signature, one docstring.
# It is set here because the loop builds on the model; model.py never imports this module.
Transfusion.generate = generate


def generate_image(model: Transfusion, cache: KVCache, image_hw, *, steps, sampler, cfg_scale, clip_x0,
                   generator, timestep_spacing="even", shift=1.0) -> torch.Tensor:
    """Denoise one image after the cache (which ends with BOI), then commit it clean.

    The image is conditioned on row 0 of the cache and committed into every row (the other rows,
    text guidance's unconditional one, receive the same continuation).

    ``sampler``: ``"ddpm"`` or ``"ddim"`` (on ``diffusion_timesteps(T, steps, timestep_spacing)``) for
    a model of integer steps, ``"euler"`` or ``"heun"`` (``integrate_flow`` with ``shift``) for a
    continuous-time one. Every model call runs the noisy patches after the cached prefix without
    committing them; with ``cfg_scale`` the unconditional prefix ``BOS, BOI`` rides along as a
    second cache row and the prediction is guided (``_guided``).
    """
    config = model.config
    grid = (image_hw[0] // config.patch_size, image_hw[1] // config.patch_size)
    n = grid[0] * grid[1]
    conditional = cache if cache.batch_size == 1 else cache.row(0)
    rows = conditional
    if cfg_scale is not None:
        unconditional = model.new_cache()
        model.extend_text(unconditional, torch.tensor([[config.bos_id, config.boi_id]], device=model.device))
        rows = KVCache.stack([conditional, unconditional])  # row 0 conditional, row 1 unconditional
    time_dtype = torch.float32 if config.continuous_time else torch.int64

    def predict(x, t):  # the guided prediction [n, C*p*p] of the patches x at step or time t
        t_batch = torch.full((rows.batch_size,), t, dtype=time_dtype, device=model.device)
        pred = model.extend_image(rows, x.expand(rows.batch_size, n, -1), t_batch, grid, commit=False).float()
        return _guided(pred, cfg_scale)

    x = torch.randn(n, config.patch_dim, device=model.device, generator=generator)  # [n, C*p*p] x_T
    if config.continuous_time:
        x = integrate_flow(x, predict, steps=steps, sampler=sampler, target=config.diffusion_target, shift=shift,
                           clip_x0=clip_x0)
    else:
        schedule = model.schedule_on(model.device)
        timesteps = diffusion_timesteps(config.num_timesteps, steps, timestep_spacing).tolist()
        for i, t in enumerate(timesteps):
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
            x = denoise_step(x, predict(x, t), t, t_next, schedule, config.diffusion_target,
                             eta=SAMPLERS[sampler], clip_x0=clip_x0, generator=generator)
    clean = torch.zeros(cache.batch_size, dtype=time_dtype, device=model.device)
    model.extend_image(cache, x.expand(cache.batch_size, n, -1), clean, grid, commit=True)
    return unpatchify(x, grid, config.patch_size)  # [C, H, W]


def _guided(pred: torch.Tensor, cfg_scale) -> torch.Tensor:
    """``pred [B, n, C*p*p]`` (B = 2 with guidance: conditional, unconditional) -> ``[n, C*p*p]``:
    ``cond + (s - 1) * (cond - uncond)``, written so that ``s = 1`` gives ``cond`` exactly."""
    if cfg_scale is None:
        return pred[0]
    return pred[0] + (cfg_scale - 1.0) * (pred[0] - pred[1])


def prefill(model: Transfusion, cache: KVCache, segments) -> torch.Tensor:
    """Run a prompt's segments into the cache; return the last position's logits ``[V]``."""
    logits = None
    for segment in segments:
        if segment.is_floating_point():  # a prompt image is clean: t = 0
            grid = (segment.shape[1] // model.config.patch_size, segment.shape[2] // model.config.patch_size)
            patches = patchify(segment.to(model.device, torch.float32), model.config.patch_size)[None]  # [1, n, C*p*p]
            time_dtype = torch.float32 if model.config.continuous_time else torch.int64
            clean = torch.zeros(1, dtype=time_dtype, device=model.device)
            model.extend_image(cache, patches, clean, grid, commit=True)
        else:
            logits = model.extend_text(cache, segment.to(model.device)[None])[0, -1]
    return logits


def _retrieved_segments(retrieved, config: TransfusionConfig) -> list:
    """The segments of the retrieved documents read before the prompt, each whole (BOS ... EOS)."""
    if retrieved is None:
        return []
    if isinstance(retrieved, (str, bytes, torch.Tensor)) or not isinstance(retrieved, Sequence):
        raise TypeError(f"retrieved: expected None or a list of documents, got {type(retrieved).__name__}")
    return [segment for j, document in enumerate(retrieved)
            for segment in document_segments(document, config, name=f"retrieved[{j}]")]


def _image_hw(image_size, patch_size: int) -> tuple[int, int]:
    expected = f"an int or (H, W), multiples of patch_size={patch_size}"
    hw = (image_size, image_size) if is_int(image_size) else image_size
    if not isinstance(hw, (tuple, list)) or not all(is_int(side) for side in hw):
        raise TypeError(f"image_size: expected {expected}, got {image_size!r}")
    if len(hw) != 2 or not all(side >= patch_size and side % patch_size == 0 for side in hw) or \
            (hw[0] // patch_size) * (hw[1] // patch_size) > 2**31 - 1:
        raise ValueError(f"image_size: expected {expected}, got {image_size!r}")
    return tuple(hw)


def _check_generate_args(max_new_tokens, temperature, top_k, top_p, force_image, image_steps, cfg_scale, clip_x0,
                         seed, config):
    """The type/value rule of ``tfkernels._checks``: ``TypeError`` for a wrong type, ``ValueError`` for
    a wrong value, the message naming the argument. Returns ``temperature, top_p, cfg_scale, clip_x0``
    as floats (``None`` kept), so that an int such as ``2**70`` never reaches torch."""
    check_int("max_new_tokens", max_new_tokens, 0, 2**31 - 1)  # positions are int32
    temperature = check_float("temperature", temperature, 0, what="a finite float >= 0 (0 is greedy)")
    if top_k is not None:
        check_int("top_k", top_k, 1)
    if top_p is not None and (top_p := check_float("top_p", top_p, 0, 1, what="None or a float in (0, 1]")) == 0:
        raise ValueError(f"top_p: expected None or a float in (0, 1], got {top_p!r}")
    if not isinstance(force_image, bool):
        raise TypeError(f"force_image: expected a bool, got {force_image!r}")
    check_int("image_steps", image_steps, 1, config.num_timesteps)
    if cfg_scale is not None:
        cfg_scale = check_float("cfg_scale", cfg_scale, what="None or a finite float")
    if clip_x0 is not None and (clip_x0 := check_float("clip_x0", clip_x0, 0, what="None or a finite float > 0")) == 0:
        raise ValueError(f"clip_x0: expected None or a finite float > 0, got {clip_x0!r}")
    if seed is not None:
        check_int("seed", seed, 0, 2**64 - 1)
    return temperature, top_p, cfg_scale, clip_x0


def _check_text_guidance_args(text_cfg_scale, contrastive_alpha, contrastive_k, unconditional_prompt, config):
    """The LM-mode guidance options, by the same rule; returns ``text_cfg_scale, contrastive_alpha`` as floats."""
    if text_cfg_scale is not None:
        text_cfg_scale = check_float("text_cfg_scale", text_cfg_scale, what="None or a finite float")
    if contrastive_alpha is not None:
        contrastive_alpha = check_float("contrastive_alpha", contrastive_alpha, 0, 1,
                                        what="None or a float in (0, 1]")
        if contrastive_alpha == 0:
            raise ValueError(f"contrastive_alpha: expected None or a float in (0, 1], got {contrastive_alpha!r}")
    check_int("contrastive_k", contrastive_k, 1, config.vocab_size - 2)  # BOS and EOI are never sampled
    if contrastive_alpha is None and contrastive_k != 1:
        raise ValueError(f"contrastive_k: only read with contrastive_alpha, got {contrastive_k!r}")
    if contrastive_alpha is not None and text_cfg_scale is not None:
        raise ValueError("text_cfg_scale: expected None with contrastive_alpha (contrastive decoding ranks tokens "
                         f"by the conditional and unconditional distributions themselves), got {text_cfg_scale!r}")
    if unconditional_prompt is not None and text_cfg_scale is None and contrastive_alpha is None:
        raise ValueError("unconditional_prompt: only read with text_cfg_scale or contrastive_alpha")
    return text_cfg_scale, contrastive_alpha


def _check_sampler_args(sampler, timestep_spacing, shift, config) -> tuple[str, float | None]:
    """``(sampler, shift)`` with their defaults filled in for the model's diffusion mode: ddpm/ddim and a
    timestep spacing for a model of integer steps, euler/heun and a shift for a continuous-time one."""
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    if shift is not None:
        shift = check_float("shift", shift, what="None or a finite float > 0")
        if shift <= 0:
            raise ValueError(f"shift: expected None or a finite float > 0, got {shift!r}")
    if config.continuous_time:
        sampler = "euler" if sampler is None else check_choice("sampler", sampler, FLOW_SAMPLERS)
        if timestep_spacing != "even":
            raise ValueError(f"timestep_spacing: expected 'even' with sampler {sampler!r} (spacings place the "
                             f"steps of ddpm/ddim; a flow model's grid is set by shift), got {timestep_spacing!r}")
        return sampler, config.flow_shift if shift is None else shift
    if sampler in FLOW_SAMPLERS:
        raise ValueError(f"sampler: expected one of {tuple(SAMPLERS)} for a model of integer steps ({sampler!r} "
                         f"integrates a continuous-time model, noise_schedule='flow'), got {sampler!r}")
    sampler = "ddpm" if sampler is None else check_choice("sampler", sampler, tuple(SAMPLERS))
    if shift is not None:
        raise ValueError(f"shift: expected None for a model of integer steps (noise_schedule="
                         f"{config.noise_schedule!r}); the shift is a continuous-time sampler's, got {shift!r}")
    return sampler, None
