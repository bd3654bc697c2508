"""Projection + cross-entropy, eagerly: the semantics the fused LM loss kernel matches.

Materialises the ``[N, V]`` logits, so it is only for tests, small vocabularies and the CPU path.

The loss of a counted row (``target != ignore_index``) with logits ``s`` (after the optional soft-cap),
``lse = logsumexp(s)``, ``logp = s - lse``, class weights ``w`` (all 1 by default) and label smoothing
``eps`` over ``V`` classes is ``F.cross_entropy``'s

    ce = (1 - eps) * w[y] * -logp[y] + (eps / V) * sum_c w[c] * -logp[c]

plus the z-loss ``z_loss * lse**2``. ``"mean"`` divides the summed ``ce`` by the summed ``w[y]`` of the
counted rows (F.cross_entropy's weighted mean) and the summed z-loss by the number of counted rows; a
denominator of 0 is taken as 1, so that no row counted gives 0, never NaN.
"""

from __future__ import annotations

import torch

from .._checks import autocast_off, check_choice

__all__ = ["REDUCTIONS", "linear_cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0, *,
                         bias: torch.Tensor | None = None, class_weight: torch.Tensor | None = None,
                         label_smoothing: float = 0.0, softcap: float | None = None,
                         return_z_loss: bool = False):
    """Cross-entropy of ``logits = hidden @ weight.T + bias`` against ``target``, plus an optional z-loss.

    Args:
        hidden: ``[..., H]`` (leading dimensions are flattened).
        weight: ``[V, H]`` (the output projection, as stored by ``nn.Linear(H, V)``).
        target: int ``[...]``, hidden's leading shape; rows equal to ``ignore_index`` contribute nothing.
        reduction: ``"mean"`` (see the module docstring), ``"sum"``, or ``"none"`` (target's shape, 0 on
            ignored rows).
        z_loss: weight of ``logsumexp(logits)^2`` added to each counted row (PaLM's z-loss).
        bias: ``[V]`` or ``None``, added to the logits (``nn.Linear``'s bias).
        class_weight: ``[V]`` or ``None``: ``F.cross_entropy``'s ``weight``, a rescaling per class.
        label_smoothing: ``F.cross_entropy``'s, in ``[0, 1]``.
        softcap: ``None`` (or 0) for none, else logits become ``softcap * tanh(logits / softcap)`` first.
        return_z_loss: also return the z-loss term alone, reduced as it enters the loss, detached.

    Returns:
        float32 loss (float64 when the inputs are float64), computed in that precision, autocast or
        not (autocast is off inside; ``tk.linear_cross_entropy`` casts its inputs first); with
        ``return_z_loss``, ``(loss, z_term)``.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    with autocast_off(hidden):
        loss, z_term = _linear_cross_entropy(hidden, weight, target, ignore_index, reduction, z_loss, bias,
                                             class_weight, label_smoothing, softcap)
    return (loss, z_term.detach()) if return_z_loss else loss


def _linear_cross_entropy(hidden, weight, target, ignore_index, reduction, z_loss, bias, class_weight,
                          label_smoothing, softcap):
    compute = torch.promote_types(hidden.dtype, torch.float32)
    target_shape = target.shape
    hidden = hidden.reshape(target.numel(), hidden.shape[-1])  # target has hidden's leading shape; -1 fails at H = 0
    target = target.reshape(-1).long()  # torch compares an int32 tensor with a Python int modulo 2**32
    logits = hidden.to(compute) @ weight.to(compute).T  # [N, V]
    if bias is not None:
        logits = logits + bias.to(compute)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    vocab_size = logits.shape[-1]
    counted = target != ignore_index
    safe_target = torch.where(counted, target, torch.zeros_like(target))
    lse = torch.logsumexp(logits, dim=-1)
    neg_logp = lse[:, None] - logits
    class_w = torch.ones(vocab_size, dtype=compute, device=logits.device) if class_weight is None \
        else class_weight.to(compute)
    target_w = class_w[safe_target]
    ce = target_w * neg_logp.gather(1, safe_target[:, None]).squeeze(1)
    if label_smoothing:
        ce = (1 - label_smoothing) * ce + (label_smoothing / vocab_size) * (neg_logp * class_w).sum(-1)
    zero = torch.zeros_like(lse)
    ce = torch.where(counted, ce, zero)
    z_term = torch.where(counted, z_loss * lse.square(), zero)
    if reduction == "none":
        return (ce + z_term).reshape(target_shape), z_term.reshape(target_shape)
    if reduction == "sum":
        return ce.sum() + z_term.sum(), z_term.sum()
    ce_denominator = torch.where(counted, target_w, zero).sum()
    ce_denominator = torch.where(ce_denominator == 0, torch.ones_like(ce_denominator), ce_denominator)
    z_mean = z_term.sum() / counted.sum().clamp(min=1)
    return ce.sum() / ce_denominator + z_mean, z_mean
