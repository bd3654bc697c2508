"""reference.attention against an independent dense formula, and its edge cases."""

import importlib
import random

import pytest
import torch

import tfkernels as tk
from tfkernels.mask import canonical_bounds
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


# ------------------------------------------------------------------------------ robustness on the reference path
def _textbook(q, k, v, mask, scale, softcap=None):
    """Autograd of the plain formula on the dense mask (no chunking, no custom backward): out, lse."""
    group = q.shape[2] // k.shape[2]
    kh = k.repeat_interleave(group, dim=2)
    vh = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kh) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask.to_dense()[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", probs, vh), lse


@pytest.mark.parametrize("softcap", [None, 0.5, 3.0], ids=["no_cap", "cap_0.5", "cap_3"])
def test_the_backward_equals_autograd_of_the_textbook_formula(softcap):
    """reference.attention has its own backward (the FlashAttention-2 formulas with selects, so that
    non-finite values stay isolated): on finite inputs it is autograd of the textbook formula, with
    or without soft-capping (a cap of 0.5 saturates most scores: tanh's derivative matters)."""
    images, documents = random_layout(random.Random(7), 2, 40, max_image_len=10, padding=True)
    mask = tk.IntervalMask.from_spans(40, images=images, documents=documents)
    q, k, v = _inputs(2, 40, 40, 4, 2, 8, seed=8)
    gen = torch.Generator().manual_seed(9)
    d_out, d_lse = torch.randn(q.shape, generator=gen, dtype=torch.float64), torch.randn(2, 4, 40, generator=gen,
                                                                                        dtype=torch.float64)
    grads = []
    for attend in (lambda a, b, c: tk.reference.attention(a, b, c, mask, scale=0.3, softcap=softcap),
                   lambda a, b, c: _textbook(a, b, c, mask, 0.3, softcap)):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = attend(*inputs)
        finite = torch.isfinite(lse)
        loss = (out * d_out).sum() + (torch.where(finite, lse, 0.0) * d_lse).sum()
        grads.append((out, torch.where(finite, lse, 0.0), *torch.autograd.grad(loss, inputs)))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_gradcheck_small():
    mask = tk.IntervalMask.from_spans(10, images=[[(2, 6)]], documents=[[8]])
    q, k, v = (t.requires_grad_() for t in _inputs(1, 10, 10, 2, 1, 4, seed=10))

    def attend(a, b, c):
        out, lse = tk.reference.attention(a, b, c, mask, scale=0.7)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)  # padding rows: lse = -inf, no gradient

    assert torch.autograd.gradcheck(attend, (q, k, v))


def test_nan_at_a_padding_key_is_isolated():
    """A NaN in V at a padding key reaches no row: multiplying hidden pairs by zero instead of selecting
    them away would turn all 16 rows NaN (0 * NaN in probs @ v)."""
    mask = tk.IntervalMask.from_segment_ids(torch.tensor([[0] * 10 + [-1] * 6]))
    q, k, v = _inputs(1, 16, 16, 1, 1, 8, dtype=torch.float32, seed=11)
    v[0, 12] = float("nan")
    out, lse = tk.reference.attention(q, k, v, mask)
    assert torch.isfinite(out).all() and (out[0, 10:] == 0).all() and torch.isneginf(lse[0, 0, 10:]).all()


@pytest.mark.parametrize("source", ["q", "k", "v", "d_out"])
def test_a_nan_in_one_document_reaches_no_other_document(source):
    """Forward and every gradient: documents of a packed row are isolated, whichever tensor holds the NaN."""
    mask = tk.IntervalMask.from_spans(30, images=[[(3, 8), (20, 26)]], documents=[[12, 14]])
    q, k, v = _inputs(1, 30, 30, 2, 1, 4, seed=12)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    results = []
    for poison in (False, True):
        tensors = [t.clone() for t in (q, k, v, d_out)]
        if poison:
            tensors[["q", "k", "v", "d_out"].index(source)][0, 5, 0, 1] = float("nan")  # document 0
        inputs = [t.requires_grad_() for t in tensors[:3]]
        out, lse = tk.reference.attention(*inputs, mask)
        grads = torch.autograd.grad((out * tensors[3]).sum(), inputs)
        results.append((out, lse, *grads))
    for name, clean, poisoned in zip(("out", "lse", "dq", "dk", "dv"), *results):
        other = (slice(None), slice(None), slice(12, None)) if name == "lse" else (slice(None), slice(12, None))
        torch.testing.assert_close(poisoned[other], clean[other], rtol=0, atol=0, msg=name)
    assert not all(torch.isfinite(t).all() for t in results[1]), "the NaN reaches document 0's results"


def test_rows_that_see_nothing_stay_zero_with_nan_everywhere_else():
    mask = tk.IntervalMask.from_spans(12, images=[[(2, 5)]], documents=[[8]])
    q, k, v = (t.requires_grad_() for t in _inputs(1, 12, 12, 2, 2, 4, seed=14))
    with torch.no_grad():
        for t in (q, k, v):
            t[0, 8:] = float("nan")  # padding: sees nothing, seen by nothing
    out, lse = tk.reference.attention(q, k, v, mask)
    assert (out[0, 8:] == 0).all() and torch.isneginf(lse[0, :, 8:]).all() and torch.isfinite(out).all()
    out.sum().backward()
    for grad in (q.grad, k.grad, v.grad):
        assert torch.isfinite(grad).all() and (grad[0, 8:] == 0).all()


def test_in_place_edits_and_swaps_are_rejected():
    q, k, v = _inputs(1, 5, 40, 2, 2, 8, seed=15)
    mask = tk.IntervalMask.full(1, 5, 40)
    tk.reference.attention(q, k, v, mask)
    mask.kv_start[0, 4] = mask.kv_end[0, 4] = 2**31 - 1
    with pytest.raises(ValueError, match=r"mask.kv_end: batch row 0, query 4: expected kv_end <= seq_len_k=40"):
        tk.reference.attention(q, k, v, mask)
    mask.kv_start = torch.zeros(1, 5, dtype=torch.int32)
    mask.kv_end = torch.tensor([[3, 2, 4, 4, 4]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"query 1: expected kv_end non-decreasing along queries"):
        tk.reference.attention(q, k, v, mask)


def test_under_torch_compile_the_canonical_bounds_are_used():
    """No host sync under compile: an invalid mask gives the answer of its canonical bounds (never an
    error, never a read out of range), forward and backward."""
    q, k, v = _inputs(2, 9, 11, 2, 1, 4, seed=16)
    kv_start = torch.tensor([[-4, 0, 5, 3, 2**31 - 1, 0, 1, 2, 3], [0] * 9], dtype=torch.int32)
    kv_end = torch.tensor([[20, 1, 2, 9, 9, 9, -(2**31), 11, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9]], dtype=torch.int32)

    def step(q, k, v, kv_start, kv_end):
        return tk.reference.attention(q, k, v, tk.IntervalMask(kv_start, kv_end, 11))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    canonical = tk.IntervalMask(*canonical_bounds(kv_start, kv_end, 11), 11)
    runs = []
    for attend in (lambda a, b, c: compiled(a, b, c, kv_start, kv_end),
                   lambda a, b, c: tk.reference.attention(a, b, c, canonical)):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = attend(*inputs)
        runs.append((out, lse, *torch.autograd.grad(out.square().sum(), inputs)))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="batch row 0, query 0: expected kv_start >= 0"):
        step(q, k, v, kv_start, kv_end)  # eager: rejected by name
