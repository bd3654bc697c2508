"""Projection + cross-entropy, eagerly: the semantics the fused LM loss kernel matches.

Materialises the ``[N, V]`` logits, so it is only for tests, small vocabularies and the CPU path.
"""

from __future__ import annotations

import torch

from .._checks import autocast_off, check_choice

__all__ = ["REDUCTIONS", "linear_cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0) -> torch.Tensor:
    """Cross-entropy of ``logits = hidden @ weight.T`` against ``target``, plus an optional z-loss.

    Args:
        hidden: ``[N, H]``.
        weight: ``[V, H]`` (the output projection, as stored by ``nn.Linear(H, V)``).
        target: int ``[N]``; rows equal to ``ignore_index`` contribute nothing.
        reduction: ``"mean"`` over non-ignored rows (0 when all are ignored), ``"sum"``, or
            ``"none"`` (``[N]``, 0 on ignored rows).
        z_loss: weight of ``logsumexp(logits)^2`` added to each non-ignored row (PaLM's z-loss).

    Returns:
        float32 loss (float64 when the inputs are float64), computed in that precision, autocast or
        not (autocast is off inside; ``tk.linear_cross_entropy`` casts its inputs first).
    """
    check_choice("reduction", reduction, REDUCTIONS)
    with autocast_off(hidden):
        return _linear_cross_entropy(hidden, weight, target, ignore_index, reduction, z_loss)


def _linear_cross_entropy(hidden, weight, target, ignore_index, reduction, z_loss):
    compute = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(compute) @ weight.to(compute).T  # [N, V]
    target = target.long()  # torch compares an int32 tensor with a Python int modulo 2**32
    counted = target != ignore_index
    safe_target = torch.where(counted, target, torch.zeros_like(target))
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, safe_target[:, None]).squeeze(1)
    per_row = torch.where(counted, lse - target_logit + z_loss * lse.square(), torch.zeros_like(lse))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / counted.sum().clamp(min=1)
