"""Flash attention under an ``IntervalMask``."""

from __future__ import annotations

import torch

from . import reference
from .mask import IntervalMask

__all__ = ["attention"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _check_inputs(q, k, v, mask) -> None:
    """Raise a clear error for anything a kernel cannot take, before any launch."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name}: expected shape [B, S, H, D], got {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name}: expected float16, bfloat16 or float32, got {t.dtype}")
    if not isinstance(mask, IntervalMask):
        raise TypeError(f"mask: expected a tfkernels.IntervalMask, got {type(mask).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    batch, _, heads_q, dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k, v: expected the same shape [B, Sk, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(
            f"k: expected batch {batch} and head dim {dim} as in q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    heads_kv = k.shape[2]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"q heads ({heads_q}) must be a multiple of k/v heads ({heads_kv})")
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim: expected 1..{MAX_HEAD_DIM}, got {dim}")
    mask.validate(batch_size=batch, seq_len_q=q.shape[1], seq_len_k=k.shape[1], device=q.device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: IntervalMask,
    scale: float | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
):
    """Softmax attention where query ``q`` sees keys ``[mask.kv_start[q], mask.kv_end[q])``.

    Args:
        q: ``[B, Sq, Hq, D]``; fp16, bf16 or fp32; any strides.
        k, v: ``[B, Sk, Hkv, D]``, ``Hq % Hkv == 0`` (GQA/MQA).
        mask: ``IntervalMask`` of batch ``B``, ``Sq`` rows and ``Sk`` keys.
        scale: score scale, ``1 / sqrt(D)`` by default.
        return_lse: also return the log-sum-exp of the scaled scores, ``[B, Hq, Sq]`` float32.
        deterministic: bitwise-reproducible gradients.

    Returns:
        out ``[B, Sq, Hq, D]`` (and lse). Rows that see no key give zeros (lse = -inf).
    """
    _check_inputs(q, k, v, mask)
    out, lse = reference.attention(q, k, v, mask, scale)
    return (out, lse) if return_lse else out
