"""Sampling steps of generation: next text token, and one reverse diffusion step.

The diffusion step works for any ``tk.NoiseSchedule``: the forward process is
``x_t = a_t * x0 + b_t * noise`` with ``(a_t, b_t) = schedule.coefficients(t)``.
"""

from __future__ import annotations

import torch


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


def diffusion_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """``steps`` distinct timesteps from ``T - 1`` down to 0, evenly spaced: int64 ``[steps]``."""
    return torch.linspace(num_timesteps - 1, 0, steps).round().to(torch.int64)


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
