"""Eager attention under an ``IntervalMask``: the semantics every attention kernel must match.

Dense scores per chunk of queries, so the forward memory stays bounded at long sequences
(``S = 8192`` on a CPU); with autograd each chunk is checkpointed, so the backward pass
recomputes its scores instead of keeping all of them.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..mask import IntervalMask

__all__ = ["attention"]

# Scores held at once per chunk: B * H * chunk * Sk elements. 2^26 fp32 values = 256 MiB.
_CHUNK_ELEMENTS = 1 << 26


def _attend_chunk(q, k, v, kv_start, kv_end, scale):
    """q ``[B, H, C, D]``, k/v ``[B, H, Sk, D]``, bounds ``[B, C]`` -> out ``[B, H, C, D]``, lse ``[B, H, C]``."""
    keys = torch.arange(k.shape[2], device=q.device)
    visible = (keys >= kv_start[..., None]) & (keys < kv_end[..., None])  # [B, C, Sk]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    # Rows that see no key have max -inf; shifting by 0 there keeps exp() at 0 instead of NaN.
    # The shift is detached: softmax does not depend on it, so gradients stay exact.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.matmul(probs, v)
    lse = (row_max + torch.log(denom)).squeeze(-1)  # -inf where the row sees nothing
    return out, lse


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: IntervalMask,
    scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention, eagerly.

    Args:
        q: ``[B, Sq, Hq, D]``.
        k, v: ``[B, Sk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA/MQA: each kv head serves
            ``Hq // Hkv`` consecutive query heads).
        mask: ``IntervalMask`` with ``batch_size == B``, ``seq_len_q == Sq``, ``seq_len_k == Sk``.
        scale: score scale, ``1 / sqrt(D)`` by default.
        upcast: compute in float32 (or the input's wider dtype) and cast the output back;
            ``False`` computes in the input dtype, which is how eager low-precision code behaves
            and what the kernels' tolerances are anchored to.

    Returns:
        out ``[B, Sq, Hq, D]`` in q's dtype, lse ``[B, Hq, Sq]`` (natural log, float32 unless the
        compute dtype is wider). Rows that see no key give out = 0 and lse = -inf.
    """
    batch, seq_q, heads_q, dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    if heads_q % heads_kv:
        raise ValueError(f"q has {heads_q} heads, not a multiple of k/v's {heads_kv}")
    mask.validate(batch_size=batch, seq_len_q=seq_q, seq_len_k=seq_k, device=q.device)
    scale = dim**-0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    group = heads_q // heads_kv
    qh = q.transpose(1, 2).to(compute)  # [B, Hq, Sq, D]
    kh = k.transpose(1, 2).to(compute).repeat_interleave(group, dim=1)  # [B, Hq, Sk, D]
    vh = v.transpose(1, 2).to(compute).repeat_interleave(group, dim=1)
    if seq_k == 0:  # nothing to see: every row is a padding row
        lse = qh.new_full((batch, heads_q, seq_q), float("-inf"))
        return torch.zeros_like(q), lse.to(torch.promote_types(compute, torch.float32))
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * heads_q * seq_k))
    use_checkpoint = torch.is_grad_enabled() and seq_q > chunk and any(
        t.requires_grad for t in (q, k, v)
    )
    outs, lses = [], []
    for c0 in range(0, seq_q, chunk):
        args = (qh[:, :, c0 : c0 + chunk], kh, vh, mask.kv_start[:, c0 : c0 + chunk],
                mask.kv_end[:, c0 : c0 + chunk], scale)
        if use_checkpoint:
            out, lse = checkpoint(_attend_chunk, *args, use_reentrant=False)
        else:
            out, lse = _attend_chunk(*args)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=2) if outs else qh.new_zeros(batch, heads_q, 0, dim)
    lse = torch.cat(lses, dim=2) if lses else qh.new_zeros(batch, heads_q, 0)
    return out.transpose(1, 2).to(q.dtype), lse.to(torch.promote_types(compute, torch.float32))
