"""reference.attention against an independent dense formula, and its edge cases."""

import importlib
import random

import pytest
import torch

import tfkernels as tk
from tfkernels.testing import random_layout

# The module (tfkernels.reference.attention, the attribute, is the function it exports).
reference_attention = importlib.import_module("tfkernels.reference.attention")


def dense_attention(q, k, v, dense_mask, scale):
    """Textbook formula on the dense mask, one (batch, head) at a time, float64."""
    batch, seq_q, heads_q, _ = q.shape
    group = heads_q // k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads_q):
            scores = q[b, :, h].double() @ k[b, :, h // group].double().T * scale
            for i in range(seq_q):
                visible = dense_mask[b, i]
                if visible.any():
                    weights = torch.softmax(scores[i, visible], dim=0)
                    out[b, i, h] = weights @ v[b, visible, h // group].double()
    return out


def _inputs(batch, seq_q, seq_k, heads_q, heads_kv, dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads_q, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, seq_k, heads_kv, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, seq_k, heads_kv, dim, generator=gen, dtype=dtype)
    return q, k, v


def test_matches_dense_formula_on_transfusion_layout():
    images, documents = random_layout(random.Random(3), 2, 40, max_image_len=10)
    mask = tk.IntervalMask.from_spans(40, images=images, documents=documents)
    q, k, v = _inputs(2, 40, 40, 4, 2, 8)
    out, lse = tk.reference.attention(q, k, v, mask, scale=0.3)
    torch.testing.assert_close(out, dense_attention(q, k, v, mask.to_dense(), 0.3), rtol=1e-12, atol=1e-12)
    assert lse.shape == (2, 4, 40) and lse.dtype == torch.float64


def test_rectangular_and_default_scale():
    mask = tk.IntervalMask.causal(1, 5, 23)
    q, k, v = _inputs(1, 5, 23, 2, 1, 16)
    out, lse = tk.reference.attention(q, k, v, mask)
    torch.testing.assert_close(out, dense_attention(q, k, v, mask.to_dense(), 16**-0.5), rtol=1e-12, atol=1e-12)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.expand(-1, -1, 2, -1)) * 0.25
    expected_lse = torch.logsumexp(scores.masked_fill(~mask.to_dense()[:, None], float("-inf")), dim=-1)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


def test_rows_that_see_nothing_give_zero_output_and_zero_gradients():
    mask = tk.IntervalMask.from_spans(12, images=[[(2, 5)]], documents=[[8]])
    q, k, v = (t.requires_grad_() for t in _inputs(1, 12, 12, 2, 2, 4))
    out, lse = tk.reference.attention(q, k, v, mask)
    assert (out[0, 8:] == 0).all() and torch.isneginf(lse[0, :, 8:]).all()
    assert torch.isfinite(lse[0, :, :8]).all()
    out.sum().backward()
    for grad in (q.grad, k.grad, v.grad):
        assert torch.isfinite(grad).all()
        assert (grad[0, 8:] == 0).all()


def test_chunking_gives_the_same_values_and_gradients(monkeypatch):
    images, documents = random_layout(random.Random(5), 2, 64, max_image_len=16)
    mask = tk.IntervalMask.from_spans(64, images=images, documents=documents)
    q, k, v = (t.requires_grad_() for t in _inputs(2, 64, 64, 4, 4, 8))
    whole, _ = tk.reference.attention(q, k, v, mask)
    grads_whole = torch.autograd.grad(whole.square().sum(), (q, k, v))
    # 2 * 4 * 64 * 5 elements: chunks of 5 query rows, checkpointed.
    monkeypatch.setattr(reference_attention, "_CHUNK_ELEMENTS", 2 * 4 * 64 * 5)
    chunked, _ = tk.reference.attention(q, k, v, mask)
    grads_chunked = torch.autograd.grad(chunked.square().sum(), (q, k, v))
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_chunked, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_upcast_controls_the_compute_dtype():
    mask = tk.IntervalMask.causal(1, 32)
    q, k, v = _inputs(1, 32, 32, 2, 2, 16, dtype=torch.float16)
    exact = dense_attention(q, k, v, mask.to_dense(), 0.25)
    upcast, lse = tk.reference.attention(q, k, v, mask)
    lowp, _ = tk.reference.attention(q, k, v, mask, upcast=False)
    assert upcast.dtype == lowp.dtype == torch.float16 and lse.dtype == torch.float32
    upcast_error = (upcast.double() - exact).abs().max()
    lowp_error = (lowp.double() - exact).abs().max()
    assert upcast_error <= 2**-11  # float32 math, one rounding to fp16 (relative eps 2^-11, |out| < 1)
    assert lowp_error > upcast_error  # fp16 softmax and matmul lose more


def test_gqa_rejects_indivisible_heads():
    q, k, v = _inputs(1, 4, 4, 3, 2, 4)
    with pytest.raises(ValueError, match="q has 3 heads, not a multiple of k/v's 2"):
        tk.reference.attention(q, k, v, tk.IntervalMask.causal(1, 4))


def test_memory_stays_bounded_at_8192(monkeypatch):
    """Forward at S = 8192: no chunk holds more than _CHUNK_ELEMENTS scores."""
    seq, heads = 8192, 2
    largest = []
    attend = reference_attention._attend_chunk

    def recording_attend(q, k, *args):
        largest.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return attend(q, k, *args)

    monkeypatch.setattr(reference_attention, "_attend_chunk", recording_attend)
    mask = tk.IntervalMask.causal(1, seq)
    q, k, v = _inputs(1, seq, seq, heads, heads, 16, dtype=torch.float32)
    with torch.no_grad():
        out, _ = tk.reference.attention(q, k, v, mask)
    assert len(largest) > 1 and max(largest) <= reference_attention._CHUNK_ELEMENTS
    # Spot-check the last rows against the dense formula on their own.
    tail = tk.IntervalMask.causal(1, 4, seq)
    expected = dense_attention(q[:, -4:], k, v, tail.to_dense(), 16**-0.5)
    torch.testing.assert_close(out[:, -4:].double(), expected, rtol=1e-5, atol=1e-5)
