"""adaLN modulation, eagerly: the semantics the fused ``adaln_modulate`` kernels match.

DiT / PixArt-alpha condition every block on the timestep (and class or pooled text) through
adaptive layer norm: a norm without affine parameters, then a per-sample (or per-token) scale and
shift, ``norm(x) * (1 + scale) + shift``. The block's branch output is added back to the residual
stream multiplied by a gate, ``stream + gate * branch``, and the next norm reads that sum; so the
op optionally takes the residual stream and fuses the gated add in front of the norm (as
FlashAttention's fused ``layer_norm_fn(x, ..., residual=...)`` fuses a plain add):

    h = residual + gate * x          (residual given; gate None means 1)
    y = norm(h) * (1 + scale) + shift
    returns y, or (y, h) when residual is given

with ``norm`` LayerNorm (``(h - mean) / sqrt(var + eps)``, biased variance) or RMSNorm
(``h / sqrt(mean(h^2) + eps)``) over the last dim. ``h`` is rounded to the residual's dtype before
it is normalised, so ``y`` is exactly ``adaln_modulate(h, shift, scale)`` on the returned ``h``.
"""

from __future__ import annotations

import functools

import torch

from .._checks import autocast_off, check_choice

__all__ = ["NORMS", "adaln_modulate"]

NORMS = ("layer", "rms")


def _per_row(cond: torch.Tensor) -> torch.Tensor:
    """Conditioning ``[B, C]`` -> ``[B, 1, C]``; ``[B, 1, C]`` and ``[B, T, C]`` broadcast as they are."""
    return cond[:, None, :] if cond.ndim == 2 else cond


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None, eps: float = 1e-6, norm: str = "layer"):
    """``norm(h) * (1 + scale) + shift`` with ``h = residual + gate * x`` (or ``h = x``), in float32.

    Args:
        x: ``[B, T, C]``: the tokens to normalise, or the branch output to add to ``residual``.
        shift, scale, gate: per-sample ``[B, C]`` / ``[B, 1, C]`` or per-token ``[B, T, C]``.
        residual: ``[B, T, C]``, the residual stream; ``gate`` needs it.
        eps: added to the variance (LayerNorm) or the mean square (RMSNorm).
        norm: ``"layer"`` or ``"rms"``.

    Returns:
        ``y`` contiguous, in the dtype of the tensor normalised (``x``, or ``residual``), and ``h``
        contiguous in residual's dtype when residual is given. Computed in float32 (float64 when an input is float64),
        autocast or not (it is off inside); differentiable in every tensor.
    """
    check_choice("norm", norm, NORMS)
    if gate is not None and residual is None:
        raise ValueError("gate: multiplies x in residual + gate * x; give residual too")
    with autocast_off(x):
        return _adaln_modulate(x, shift, scale, gate, residual, eps, norm)


def _adaln_modulate(x, shift, scale, gate, residual, eps, norm):
    given = [t for t in (x, shift, scale, gate, residual) if t is not None]
    compute = functools.reduce(torch.promote_types, (t.dtype for t in given), torch.float32)
    if residual is None:
        h = None
        normed = x.to(compute)
    else:
        branch = x.to(compute) if gate is None else _per_row(gate).to(compute) * x.to(compute)
        h = (residual.to(compute) + branch).to(residual.dtype).contiguous()
        normed = h.to(compute)
    if norm == "layer":
        centred = normed - normed.mean(dim=-1, keepdim=True)
        normalised = centred * torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + eps)
    else:
        normalised = normed * torch.rsqrt(normed.square().mean(dim=-1, keepdim=True) + eps)
    y = normalised * (1 + _per_row(scale).to(compute)) + _per_row(shift).to(compute)
    y = y.to(x.dtype if residual is None else residual.dtype).contiguous()
    return y if h is None else (y, h)
