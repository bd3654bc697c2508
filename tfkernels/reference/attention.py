"""Eager attention under an ``IntervalMask``: the semantics every attention kernel must match.

Dense scores per chunk of queries, so the forward memory stays bounded at long sequences
(``S = 8192`` on a CPU); each chunk is one autograd node that saves its inputs and recomputes its
scores in the backward pass, so the backward memory stays bounded too.

Non-finite values are isolated by the mask (the kernels compute the same thing,
docs/design.md#empty-rows-and-non-finite-values):

* invisible (query, key) pairs are *selected* away, never multiplied by zero, so a NaN or inf in
  q, k, v or d_out at a pair the mask hides reaches no output and no gradient;
* a contraction over keys (``P @ V`` for the output, ``dS @ K`` for dq) or over queries
  (``dS^T @ Q`` for dk, ``P^T @ dO`` for dv) runs on operands whose non-finite entries are zeroed,
  and a visible pair whose operand row held one makes the whole result row NaN;
* an output row with any non-finite entry is NaN in every entry.

So row ``i``'s output and lse depend only on ``q[i]`` and the keys it sees; ``dq[i]`` only on those,
``d_out[i]`` and ``d_lse[i]``; ``dk[j]``, ``dv[j]`` only on key ``j`` and the queries that see it.
Rows that see no key give out = 0, lse = -inf and dq = 0; keys that no query sees get dk = dv = 0,
whatever any tensor holds.
"""

from __future__ import annotations

import torch

from ..mask import IntervalMask

__all__ = ["attention"]

# Scores held at once per chunk: B * H * chunk * Sk elements. 2^26 fp32 values = 256 MiB.
_CHUNK_ELEMENTS = 1 << 26


def _visible(kv_start, kv_end, seq_k, rows, key_q_start, key_q_end):
    """bool ``[B, 1, C, Sk]``: query row sees key (broadcast over heads). ``rows [C]``: the chunk's query
    indices; ``key_q_start``/``key_q_end [B, Sk]``: the queries each key allows (``None``: all)."""
    keys = torch.arange(seq_k, device=kv_start.device)
    visible = (keys >= kv_start[..., None]) & (keys < kv_end[..., None])
    if key_q_start is not None:
        visible &= (rows[:, None] >= key_q_start[:, None, :]) & (rows[:, None] < key_q_end[:, None, :])
    return visible[:, None]


def _bad_rows(x):
    """bool ``[..., N]``: the row of ``x [..., N, D]`` holds a NaN or an infinity."""
    return ~torch.isfinite(x).all(dim=-1)


def _finite_or_zero(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _nan_rows(x):
    """``x [..., D]`` with every row that holds a non-finite entry set to NaN."""
    return x.masked_fill(_bad_rows(x)[..., None], float("nan"))


def _scores(q, k, scale, softcap):
    """Scaled scores ``[B, H, C, Sk]``, soft-capped to ``softcap * tanh(s / softcap)`` when asked, and
    the ``tanh`` (for the backward pass; None without a cap)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if not softcap:
        return scores, None
    capped = scores.div_(softcap).tanh_()
    return capped * softcap, capped


def _attend_chunk(q, k, v, visible, scale, softcap, v_finite, v_bad):
    """q ``[B, H, C, D]``, k/v ``[B, H, Sk, D]``, ``visible [B, 1, C, Sk]`` (``_visible``) -> out ``[B, H, C,
    D]``, lse ``[B, H, C]``.

    ``v_finite`` is v with its non-finite entries zeroed, ``v_bad [B, H, Sk]`` where v's row held one.
    In place where it can: the chunk's ``[B, H, C, Sk]`` buffers bound the memory.
    """
    scores = _scores(q, k, scale, softcap)[0].masked_fill_(~visible, float("-inf"))
    # Rows whose scores are all -inf (those that see nothing) shift by 0 so exp() gives 0, not NaN.
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
    probs = scores.sub_(row_max).exp_()  # the weights, normalised below
    denom = probs.sum(dim=-1, keepdim=True)
    probs.div_(denom.masked_fill(denom == 0, 1.0)).masked_fill_(~visible, 0.0)
    probs.masked_fill_(visible & v_bad[:, :, None, :], float("nan"))  # a visible non-finite v
    out = _nan_rows(torch.matmul(probs, v_finite))
    lse = (row_max + torch.log(denom)).squeeze(-1)  # -inf where the row sees nothing
    return out, lse


class _ChunkAttention(torch.autograd.Function):
    """One chunk of query rows: forward ``_attend_chunk``, backward the FlashAttention-2 formulas with
    the same selects (checked against autograd of the textbook formula in the tests). ``k_finite``,
    ``k_bad``, ``v_finite``, ``v_bad`` are computed once for all chunks (no gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, kv_start, kv_end, rows, key_q_start, key_q_end, scale, softcap, k_finite, k_bad,
                v_finite, v_bad):
        # The bounds (the chunk's rows and, with holes, the keys' allowed queries) are saved instead of the
        # [B, 1, C, Sk] mask, so that the memory the backward keeps stays bounded.
        seq_k = k.shape[2]
        visible = _visible(kv_start, kv_end, seq_k, rows, key_q_start, key_q_end)
        out, lse = _attend_chunk(q, k, v, visible, scale, softcap, v_finite, v_bad)
        ctx.save_for_backward(q, k, v, out, lse, k_finite, k_bad, kv_start, kv_end, rows, key_q_start, key_q_end)
        ctx.scale, ctx.softcap = scale, softcap
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, k_finite, k_bad, kv_start, kv_end, rows, key_q_start, key_q_end = ctx.saved_tensors
        scale = ctx.scale
        visible = _visible(kv_start, kv_end, k.shape[2], rows, key_q_start, key_q_end)
        hidden = ~visible
        nan = float("nan")
        scores, capped = _scores(q, k, scale, ctx.softcap)
        probs = scores.sub_(lse[..., None]).exp_().masked_fill_(hidden, 0.0)
        delta = (d_out * out).sum(dim=-1) - d_lse  # [B, H, C]
        d_scores = torch.matmul(d_out, v.transpose(-1, -2)).sub_(delta[..., None]).mul_(probs)
        if capped is not None:  # d(c * tanh(s / c)) / ds = 1 - tanh(s / c)^2
            d_scores.mul_(1 - capped.square_())
        d_scores.masked_fill_(hidden, 0.0)
        d_q = torch.matmul(d_scores.masked_fill(visible & k_bad[:, :, None, :], nan), k_finite)
        d_k = torch.matmul(d_scores.masked_fill_(visible & _bad_rows(q)[..., None], nan).transpose(-1, -2),
                           _finite_or_zero(q))
        del d_scores
        d_v = torch.matmul(probs.masked_fill_(visible & _bad_rows(d_out)[..., None], nan).transpose(-1, -2),
                           _finite_or_zero(d_out))
        return (d_q.mul_(scale), d_k.mul_(scale), d_v) + (None,) * 11


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: IntervalMask,
    scale: float | None = None,
    upcast: bool = True,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention, eagerly.

    Args:
        q: ``[B, Sq, Hq, D]``.
        k, v: ``[B, Sk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA/MQA: each kv head serves
            ``Hq // Hkv`` consecutive query heads).
        mask: ``IntervalMask`` with ``batch_size == B``, ``seq_len_q == Sq``, ``seq_len_k == Sk``.
        scale: score scale, ``1 / sqrt(D)`` by default.
        softcap: soft-capping: each scaled score ``s`` becomes ``softcap * tanh(s / softcap)``
            before the softmax (None or 0: no cap).
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
    kv_start, kv_end = mask._op_bounds()  # validated, or canonical while torch.compile traces
    key_q_start, key_q_end = mask._op_holes() or (None, None)
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
    # Once for all chunks: K and V with their non-finite entries zeroed, and where their rows held one.
    operands = [f(t.detach()) for t in (kh, vh) for f in (_finite_or_zero, _bad_rows)]
    outs, lses = [], []
    rows = torch.arange(seq_q, device=q.device)
    for c0 in range(0, seq_q, chunk):
        chunk_rows = slice(c0, c0 + chunk)
        out, lse = _ChunkAttention.apply(qh[:, :, chunk_rows], kh, vh, kv_start[:, chunk_rows], kv_end[:, chunk_rows],
                                         rows[chunk_rows], key_q_start, key_q_end, scale, softcap, *operands)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=2) if outs else qh.new_zeros(batch, heads_q, 0, dim)
    lse = torch.cat(lses, dim=2) if lses else qh.new_zeros(batch, heads_q, 0)
    return out.transpose(1, 2).to(q.dtype), lse.to(torch.promote_types(compute, torch.float32))
