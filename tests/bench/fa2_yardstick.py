"""A plain FlashAttention-2 forward in Triton: the yardstick for the attention forward's interior loop.

No mask, no bounds, no GQA, no non-finite handling, a sequence that is a multiple of the tiles: the
least a key-tile step can issue at a given tile shape (QK^T, the online softmax in exp2 with the scale
applied after the row max, PV; K and V pointers advanced per step). The compile gate compiles it at
the forward's default config and compares instructions per 64 x 64 (query, key) pairs of the loop.
"""

import triton
import triton.language as tl


@triton.jit
def fa2_forward_kernel(Q, K, V, O, stride_b, stride_s, stride_h, num_heads, seq_len, qk_scale,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[B, S, H, BLOCK_D]`` q, k, v, o of equal strides; grid (S / BLOCK_M, B * H); ``qk_scale`` in
    log2 units (> 0)."""
    query_tile = tl.program_id(0)
    batch, head = tl.program_id(1) // num_heads, tl.program_id(1) % num_heads
    offset = batch.to(tl.int64) * stride_b + head * stride_h
    rows = query_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(Q + offset + rows[:, None] * stride_s + dims[None, :])
    kt_ptrs = K + offset + keys[None, :] * stride_s + dims[:, None]
    v_ptrs = V + offset + keys[:, None] * stride_s + dims[None, :]
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for _ in range(0, seq_len, BLOCK_N):
        scores = tl.dot(q, tl.load(kt_ptrs))
        new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
        p = tl.math.exp2(scores * qk_scale - new_max[:, None])
        rescale = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        acc = tl.dot(p.to(q.dtype), tl.load(v_ptrs), acc * rescale[:, None])
        row_max = new_max
        kt_ptrs += BLOCK_N * stride_s
        v_ptrs += BLOCK_N * stride_s
    out = acc / row_sum[:, None]
    tl.store(O + offset + rows[:, None] * stride_s + dims[None, :], out.to(q.dtype))
