"""tk.attention's Triton kernels against reference.attention in float64.

On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest), in float32
and float16; bfloat16 runs only on a GPU (the interpreter mishandles it). The tolerance of every
comparison is anchored to eager PyTorch's own error in the same dtype:

    max |ours - ref64| <= 2 * max |torch_lowp - ref64| + 4 * eps(dtype) * max(1, max |ref64|, grads)

The eps term covers what a flash backward adds over eager even in float32: probabilities are
recomputed as exp2(s - lse) from a rounded lse, a few ulps of error per element (inputs are
O(1), hence the floor of 1; dq/dk, which can cancel to ~0, use the largest reference gradient).
"""

import functools
import importlib
import random
import zlib

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tfkernels as tk
from tests.support import CPU_DTYPES, DEVICE, gpu_only, requires_triton
from tfkernels._dispatch import HAS_TRITON
from tfkernels.mask import canonical_bounds
from tfkernels.testing import (
    assert_anchored,
    packed_transfusion_layout,
    random_hidden_layout,
    random_layout,
    segment_ids_from_layout,
)

# The module (tfkernels.attention, the attribute, is the public function).
attention_module = importlib.import_module("tfkernels.attention")

pytestmark = requires_triton



def _random(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def assert_matches_reference(q, k, v, mask, *, scale=None, softcap=None, lse_weight=0.0, seed=0):
    """Forward and q/k/v gradients of tk.attention against the float64 reference.

    q/k/v may be non-contiguous views; gradients are taken with respect to them. With
    ``lse_weight`` the loss also uses the returned log-sum-exp (its backward path).
    """
    gen = torch.Generator().manual_seed(seed + 1)
    d_out = _random(q.shape, q.dtype, gen)
    finite = None

    def run(fn, *inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        out, lse = fn(*inputs)
        nonlocal finite
        finite = torch.isfinite(lse) if finite is None else finite
        loss = (out.double() * d_out.double()).sum()
        if lse_weight:
            loss = loss + lse_weight * torch.where(finite, lse.double(), 0.0).square().sum()
        return (out, lse, *torch.autograd.grad(loss, inputs))

    ours = run(lambda a, b, c: tk.attention(a, b, c, mask, scale=scale, return_lse=True, softcap=softcap), q, k, v)
    ref = run(lambda a, b, c: tk.reference.attention(a, b, c, mask, scale=scale, softcap=softcap), q.double(),
              k.double(), v.double())
    lowp = run(lambda a, b, c: tk.reference.attention(a, b, c, mask, scale=scale, upcast=False, softcap=softcap), q,
               k, v)
    # dq and dk are sums of p * (dp - delta) terms that can cancel to ~0 (one key: exactly 0), so
    # their ulps are those of the gradients' common scale: the largest reference gradient.
    grad_scale = max(r.abs().max().item() if r.numel() else 0.0 for r in ref[2:])
    for name, a, r, low in zip(("out", "lse", "dq", "dk", "dv"), ours, ref, lowp):
        assert a.shape == r.shape, name
        assert a.dtype == (torch.float32 if name == "lse" else q.dtype), name
        if name == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(r)), "lse: -inf exactly on rows that see nothing"
            a, r, low = (torch.where(finite, t, 0.0) for t in (a, r, low))
        assert_anchored(name, a, r, low, magnitude=grad_scale if name.startswith("d") else 0.0)
    out, _, dq, dk, dv = ours
    return out, dq, dk, dv


def _qkv(batch, seq_q, seq_k, heads_q, heads_kv, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (_random((batch, seq_q, heads_q, dim), dtype, gen),
            _random((batch, seq_k, heads_kv, dim), dtype, gen),
            _random((batch, seq_k, heads_kv, dim), dtype, gen))


def _transfusion_mask(seq_len, batch, seed, **kwargs):
    images, documents = random_layout(random.Random(seed), batch, seq_len, **kwargs)
    return tk.IntervalMask.from_spans(seq_len, images=images, documents=documents, device=DEVICE)


# (name, mask builder, B, Sq, Sk, Hq, Hkv, D)
CASES = [
    ("transfusion", lambda: _transfusion_mask(200, 2, seed=1, max_image_len=70), 2, 200, 200, 4, 2, 64),
    # Explicit edge cases: a one-patch image at a document start, an image crossing several tile
    # borders, an adjacent one-patch image, an image ending its document, then padding.
    ("transfusion_edges", lambda: tk.IntervalMask.from_spans(
        200, images=[[(0, 1), (20, 100), (100, 101), (120, 150)], [(62, 64), (150, 190)]],
        documents=[[150, 40], [64, 136]], device=DEVICE), 2, 200, 200, 2, 2, 32),
    ("transfusion_gqa4_d80", lambda: _transfusion_mask(150, 2, seed=2, max_image_len=40), 2, 150, 150, 8, 2, 80),
    ("causal", lambda: tk.IntervalMask.causal(1, 160, device=DEVICE), 1, 160, 160, 2, 2, 64),
    ("full", lambda: tk.IntervalMask.full(1, 100, device=DEVICE), 1, 100, 100, 2, 1, 64),
    ("prefix_lm", lambda: tk.IntervalMask.prefix_lm([37, 100], 2, 130, device=DEVICE), 2, 130, 130, 2, 2, 64),
    ("sliding_window", lambda: tk.IntervalMask.sliding_window(45, 1, 150, device=DEVICE), 1, 150, 150, 2, 2, 64),
    ("decode_1", lambda: tk.IntervalMask.causal(2, 1, 300, device=DEVICE), 2, 1, 300, 4, 1, 64),
    ("decode_7", lambda: tk.IntervalMask.causal(1, 7, 300, device=DEVICE), 1, 7, 300, 4, 4, 64),
    # Image patches of a generation step against the cached prefix: rows 448..512 of a layout
    # whose last image is [448, 512).
    ("decode_64_image", lambda: tk.IntervalMask.from_spans(
        512, images=[[(40, 170), (448, 512)]], documents=[[200, 312]], device=DEVICE).slice_queries(448, 512),
     1, 64, 512, 2, 2, 64),
    ("one_token", lambda: tk.IntervalMask.causal(1, 1, device=DEVICE), 1, 1, 1, 2, 2, 64),
    ("more_queries_than_keys", lambda: tk.IntervalMask.causal(1, 70, 40, device=DEVICE), 1, 70, 40, 2, 2, 32),
    ("head_dim_24", lambda: _transfusion_mask(90, 1, seed=3), 1, 90, 90, 2, 2, 24),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(case, dtype):
    name, build_mask, batch, seq_q, seq_k, heads_q, heads_kv, dim = case
    mask = build_mask()
    q, k, v = _qkv(batch, seq_q, seq_k, heads_q, heads_kv, dim, dtype, seed=zlib.crc32(name.encode()) % 1000)  # not hash(): salted per process
    out, dq, dk, dv = assert_matches_reference(q, k, v, mask)
    # Rows that see nothing: exactly zero output and zero gradient.
    empty = (mask.kv_end == mask.kv_start)
    if empty.any():
        assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    unseen_keys = ~mask.to_dense().any(dim=1)
    if unseen_keys.any():
        assert (dk[unseen_keys] == 0).all() and (dv[unseen_keys] == 0).all()


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    """q from a packed qkv projection, k/v stored head-major and transposed: only D is unit-stride."""
    gen = torch.Generator().manual_seed(7)
    batch, seq, heads, dim = 2, 120, 4, 64
    qkv = _random((batch, seq, 3, heads, dim), dtype, gen)
    k_heads_major = _random((batch, heads, seq, dim), dtype, gen)
    v_heads_major = _random((batch, heads, seq, dim), dtype, gen)
    q, k, v = qkv[:, :, 0], k_heads_major.transpose(1, 2), v_heads_major.transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    mask = _transfusion_mask(seq, batch, seed=8)
    assert_matches_reference(q, k, v, mask, scale=0.2)


@pytest.mark.parametrize("scale", [0.3, -0.3, 0.0], ids=["positive", "negative", "zero"])
def test_any_scale(scale):
    """A positive scale takes the row max before scaling (the forward's fast order); a negative or zero
    scale keeps the scale-first order, where the max of the scaled scores is not the scaled max."""
    mask = _transfusion_mask(100, 1, seed=21)
    q, k, v = _qkv(1, 100, 100, 2, 2, 32, torch.float32, seed=22)
    assert_matches_reference(q, k, v, mask, scale=scale)


def test_rows_far_apart_are_copied_not_overflowed():
    """A key tile's elements are addressed with int32 offsets from its first row: k and v whose rows
    lie 2^23 elements apart (a slice of a huge buffer) are copied first; the result is the same."""
    gen = torch.Generator().manual_seed(23)
    row_stride = attention_module._MAX_ROW_STRIDE
    storage = torch.randn(3 * row_stride + 16, generator=gen)
    k = storage.as_strided((1, 3, 2, 8), (0, row_stride, 8, 1))
    v = storage.as_strided((1, 3, 2, 8), (0, row_stride, 8, 1), storage_offset=row_stride // 2)
    q = torch.randn(1, 3, 2, 8, generator=gen)
    mask = tk.IntervalMask.causal(1, 3)
    out = tk.attention(q, k, v, mask)
    torch.testing.assert_close(out, tk.attention(q, k.contiguous(), v.contiguous(), mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"k, v: expected heads x head dim below 8388608 \(a key row's size\), "
                                         r"got 32769 x 256"):
        big = torch.empty(1, 1, 32769, 256, dtype=torch.float16)
        tk.attention(torch.empty(1, 1, 32769, 256, dtype=torch.float16), big, big, mask)


def test_lse_output_and_its_gradient():
    mask = _transfusion_mask(130, 2, seed=4)
    q, k, v = _qkv(2, 130, 130, 4, 2, 32, torch.float32, seed=5)
    assert_matches_reference(q, k, v, mask, lse_weight=0.1)


def test_expanded_upstream_gradients():
    """out.sum() and lse.sum() hand the backward stride-0 gradients."""
    mask = _transfusion_mask(100, 2, seed=17)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 100, 100, 4, 2, 32, torch.float32, seed=18))
    out, lse = tk.attention(q, k, v, mask, return_lse=True)
    ours = torch.autograd.grad(out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, lse64 = tk.reference.attention(q64, k64, v64, mask)
    ref = torch.autograd.grad(out64.sum() + torch.where(torch.isfinite(lse64), lse64, 0.0).sum(), (q64, k64, v64))
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5)


def test_different_layout_per_batch_row_equals_rows_run_alone():
    mask = _transfusion_mask(180, 2, seed=9)
    q, k, v = _qkv(2, 180, 180, 2, 2, 64, torch.float32, seed=10)
    both = tk.attention(q, k, v, mask)
    for row in range(2):
        alone = tk.IntervalMask(mask.kv_start[row : row + 1], mask.kv_end[row : row + 1], 180)
        torch.testing.assert_close(tk.attention(q[row : row + 1], k[row : row + 1], v[row : row + 1], alone),
                                   both[row : row + 1], rtol=0, atol=0)


def test_deterministic_backward_is_bitwise_reproducible():
    mask = _transfusion_mask(160, 2, seed=11)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 160, 160, 4, 2, 64, torch.float16, seed=12))
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(13)).to(q.dtype)
    runs = []
    for _ in range(2):
        out = tk.attention(q, k, v, mask, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), d_out))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# ------------------------------------------------------------------------------ ported arguments
SOFTCAP_CASES = [c for c in CASES if c[0] in ("transfusion_gqa4_d80", "decode_7", "more_queries_than_keys")]


@pytest.mark.parametrize("softcap", [0.5, 2.0], ids=["cap_0.5", "cap_2"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", SOFTCAP_CASES, ids=[c[0] for c in SOFTCAP_CASES])
def test_softcap_matches_reference(case, dtype, softcap):
    """Soft-capping in the forward and both backward kernels, LSE gradient included: scores are O(1) (the
    default scale), so a cap of 0.5 saturates most of them (a missing tanh derivative shows) and 2 bends
    the largest (scores of O(10) would need a looser floor: flash recomputes P from a rounded LSE)."""
    name, build_mask, batch, seq_q, seq_k, heads_q, heads_kv, dim = case
    q, k, v = _qkv(batch, seq_q, seq_k, heads_q, heads_kv, dim, dtype, seed=zlib.crc32(name.encode()) % 1000)
    assert_matches_reference(q, k, v, build_mask(), softcap=softcap, lse_weight=0.1)


def test_softcap_off_is_the_plain_kernel_and_a_cap_changes_the_result():
    mask = _transfusion_mask(96, 1, seed=30)
    q, k, v = _qkv(1, 96, 96, 2, 2, 32, torch.float32, seed=31)
    plain = tk.attention(q, k, v, mask)
    assert torch.equal(tk.attention(q, k, v, mask, softcap=None), plain)
    assert torch.equal(tk.attention(q, k, v, mask, softcap=0.0), plain)  # FlashAttention's "off"
    capped = tk.attention(q, k, v, mask, softcap=0.5)
    assert (capped - plain).abs().max() > 1e-2


def test_causal_shortcut_equals_the_causal_mask():
    """``mask=None, causal=True``: FlashAttention's causal (bottom-right aligned for Sq != Sk); ``mask=None``
    alone: every key. Both are one shared mask row, validated once and reused."""
    for seq_q, seq_k in ((64, 64), (20, 70)):
        q, k, v = (t.requires_grad_() for t in _qkv(2, seq_q, seq_k, 4, 2, 32, torch.float32, seed=seq_q))
        for causal, mask in ((True, tk.IntervalMask.causal(2, seq_q, seq_k, device=DEVICE)),
                             (False, tk.IntervalMask.full(2, seq_q, seq_k, device=DEVICE))):
            out = tk.attention(q, k, v, causal=causal)
            expected = tk.attention(q, k, v, mask)
            assert torch.equal(out, expected)
            assert torch.equal(tk.attention(q, k, v, causal=causal), out)  # the cached mask, reused
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
            expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
            assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))
    assert attention_module._shared_mask.cache_info().hits > 0
    with pytest.raises(ValueError, match=r"causal: expected False with a mask"):
        tk.attention(q, k, v, tk.IntervalMask.causal(2, seq_q, seq_k), causal=True)
    with pytest.raises(TypeError, match=r"causal: expected a bool, got 1"):
        tk.attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match=r"q: expected a torch.Tensor, got list"):
        tk.attention([1.0], k, v, causal=True)


def assert_same_for_shared_and_repeated(q, k, v, shared, repeated):
    """Values, LSE and gradients of a batch-1 mask equal those of its layout repeated per row, bitwise."""
    results = []
    for mask in (shared, repeated):
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse = tk.attention(*inputs, mask, return_lse=True)
        results.append((out, lse, *torch.autograd.grad(out.float().square().sum() + lse.sum(), inputs)))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_one_mask_row_serves_the_whole_batch(dtype):
    """A batch-1 mask with batch-3 tensors (read with a zero batch stride on the kernel path) equals the
    same layout repeated per row, values and gradients, bitwise."""
    shared = _transfusion_mask(120, 1, seed=40, max_image_len=40)
    repeated = tk.IntervalMask(shared.kv_start.repeat(3, 1), shared.kv_end.repeat(3, 1), shared.seq_len_k)
    q, k, v = _qkv(3, 120, 120, 4, 2, 32, dtype, seed=41)
    assert_same_for_shared_and_repeated(q, k, v, shared, repeated)
    assert_matches_reference(q, k, v, repeated)  # and the repeated layout is right


def test_a_scale_tensor_is_applied_to_q_and_gets_its_gradient():
    mask = _transfusion_mask(80, 2, seed=50)
    q, k, v = _qkv(2, 80, 80, 2, 2, 32, torch.float32, seed=51)
    scale = torch.tensor(0.3, requires_grad=True)
    out = tk.attention(q, k, v, mask, scale=scale)
    torch.testing.assert_close(out, tk.attention(q, k, v, mask, scale=0.3), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(out.square().sum(), scale)
    scale64 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out64, _ = tk.reference.attention(q.double() * scale64, k.double(), v.double(), mask, scale=1.0)
    (expected,) = torch.autograd.grad(out64.square().sum(), scale64)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=0)


def test_torch_compile_fullgraph_matches_eager():
    mask = _transfusion_mask(96, 2, seed=14)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 96, 96, 4, 2, 32, torch.float32, seed=15))

    def step(q, k, v, kv_start, kv_end):
        out = tk.attention(q, k, v, tk.IntervalMask(kv_start, kv_end, k.shape[1]))
        return out.square().sum()

    compiled = torch.compile(step, fullgraph=True)
    loss_compiled = compiled(q, k, v, mask.kv_start, mask.kv_end)
    grads_compiled = torch.autograd.grad(loss_compiled, (q, k, v))
    loss_eager = step(q, k, v, mask.kv_start, mask.kv_end)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v))
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=0)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_with_the_ported_arguments():
    """causal=True (the mask built in the graph), softcap, a tensor scale and a batch-1 mask trace
    without a graph break and match eager, gradients included."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 80, 80, 4, 2, 32, torch.float32, seed=60))
    scale = torch.tensor(0.2, requires_grad=True)
    shared = _transfusion_mask(80, 1, seed=61)

    def step(q, k, v, scale, kv_start, kv_end):
        causal = tk.attention(q, k, v, causal=True, softcap=2.0, scale=scale)
        packed = tk.attention(q, k, v, tk.IntervalMask(kv_start, kv_end, 80), softcap=2.0)
        return causal.square().sum() + packed.square().sum()

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        loss = fn(q, k, v, scale, shared.kv_start, shared.kv_end)
        results.append((loss, *torch.autograd.grad(loss, (q, k, v, scale))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_compile_takes_a_traced_scale():
    """The second scale value makes dynamo trace the scale as a SymFloat, which the argument checks
    must take without a graph break (fullgraph). The op's float argument then specialises it again,
    so each new value compiles the frame once more; a value seen before reuses its frame."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    mask = _transfusion_mask(64, 1, seed=19).validate()  # checked once: its state stays the same below
    q, k, v = _qkv(1, 64, 64, 2, 2, 32, torch.float32, seed=20)
    step = torch.compile(lambda q, k, v, scale: tk.attention(q, k, v, mask, scale=scale), backend=counter,
                         fullgraph=True)
    frames = []
    for scale in (0.3, 0.4, 0.5, 0.4, 0.3):
        torch.testing.assert_close(step(q, k, v, scale), tk.attention(q, k, v, mask, scale=scale),
                                   rtol=1e-6, atol=1e-6)
        frames.append(counter.frame_count)
    assert frames[0] == 1, f"the first call compiles one frame, got {frames}"
    assert frames[1] > frames[0] and frames[2] == frames[1] + 1, f"each new scale compiles once more, got {frames}"
    assert frames[3] == frames[4] == frames[2], f"a scale seen before recompiled: {frames}"


def test_torch_compile_does_not_recompile_for_new_layouts():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    q, k, v = (t.requires_grad_() for t in _qkv(2, 64, 64, 2, 2, 32, torch.float32, seed=16))

    @torch.compile(backend=counter, fullgraph=True)
    def step(q, k, v, mask):
        return tk.attention(q, k, v, mask).float().square().sum()

    for layout_seed in range(5):
        mask = _transfusion_mask(64, 2, seed=100 + layout_seed)
        loss = step(q, k, v, mask)
        grads = torch.autograd.grad(loss, (q, k, v))
        expected = tk.attention(q, k, v, mask).float().square().sum()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        assert all(torch.isfinite(g).all() for g in grads)
    assert counter.frame_count == 1


# ------------------------------------------------------------------------------ bad inputs
def _bad(**overrides):
    args = dict(q=torch.randn(1, 8, 4, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16),
                mask=tk.IntervalMask.causal(1, 8))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "args, error, message",
    [
        (_bad(q=torch.randn(1, 8, 4, 16, dtype=torch.float64)), TypeError, r"q: expected float16, bfloat16 or float32, got torch.float64"),
        (_bad(k=torch.randn(1, 8, 2, 16).half()), TypeError, r"q, k, v: expected one dtype"),
        (_bad(q=torch.randn(1, 8, 64)), ValueError, r"q: expected shape \[B, S, H, D\], got \(1, 8, 64\)"),
        (_bad(q=[1.0]), TypeError, r"q: expected a torch.Tensor, got list"),
        (_bad(q=torch.randn(1, 8, 3, 16)), ValueError, r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
        (_bad(v=torch.randn(1, 9, 2, 16)), ValueError, r"k, v: expected the same shape"),
        (_bad(k=torch.randn(1, 8, 2, 8), v=torch.randn(1, 8, 2, 8)), ValueError, r"k: expected batch 1 and head dim 16"),
        (_bad(q=torch.randn(1, 8, 2, 300), k=torch.randn(1, 8, 2, 300), v=torch.randn(1, 8, 2, 300)),
         ValueError, r"head dim: expected 1..256, got 300"),
        (_bad(mask=tk.IntervalMask.causal(1, 7)), ValueError, r"mask.seq_len_q: is 7 but the inputs need 8"),
        (_bad(mask=tk.IntervalMask.causal(2, 8)), ValueError, r"mask.batch_size: is 2 but the inputs need 1"),
        (_bad(q=torch.randn(3, 8, 4, 16), k=torch.randn(3, 8, 2, 16), v=torch.randn(3, 8, 2, 16),
              mask=tk.IntervalMask.causal(2, 8)), ValueError, r"mask.batch_size: is 2 but the inputs need 3"),
        (_bad(mask=tk.IntervalMask.causal(1, 8, 9)), ValueError, r"mask.seq_len_k: is 9 but the inputs need 8"),
        (_bad(mask=torch.ones(1, 8, 8, dtype=torch.bool)), TypeError, r"mask: expected a tfkernels.IntervalMask, got Tensor"),
        (_bad(k=torch.randn(1, 8, 2, 16, device="meta"), v=torch.randn(1, 8, 2, 16, device="meta")),
         ValueError, r"q, k, v: expected one device"),
        (_bad(mask=tk.IntervalMask(torch.zeros(1, 8, dtype=torch.int32), torch.full((1, 8), 9, dtype=torch.int32), 8)),
         ValueError, r"mask.kv_end: batch row 0, query 0: expected kv_end <= seq_len_k=8"),
    ],
)
def test_bad_inputs_raise_before_launch(args, error, message):
    with pytest.raises(error, match=message):
        tk.attention(**args)


def test_bad_scale_softcap_and_deterministic_flag():
    # A NaN scale is a float of the wrong value: ValueError (it was a TypeError before the one rule).
    with pytest.raises(ValueError, match=r"scale: expected a finite float, a 0-d float tensor or None, got nan"):
        tk.attention(**_bad(), scale=float("nan"))
    with pytest.raises(TypeError, match=r"scale: expected a finite float, a 0-d float tensor or None, got '0.5'"):
        tk.attention(**_bad(), scale="0.5")
    with pytest.raises(ValueError, match=r"scale: expected a float, or a 0-d float tensor, got a torch.float32 "
                                         r"tensor of shape \(2,\)"):
        tk.attention(**_bad(), scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"scale: expected a float, or a 0-d float tensor, got a torch.int64"):
        tk.attention(**_bad(), scale=torch.tensor(1))
    with pytest.raises(ValueError, match=r"softcap: expected a finite float >= 0 \(0 = no cap\) or None, got -1.0"):
        tk.attention(**_bad(), softcap=-1.0)
    with pytest.raises(TypeError, match=r"softcap: expected a finite float >= 0 \(0 = no cap\) or None, got '50'"):
        tk.attention(**_bad(), softcap="50")
    with pytest.raises(TypeError, match=r"deterministic: expected a bool, got 'yes'"):
        tk.attention(**_bad(), deterministic="yes")


# ------------------------------------------------------------------------------ GPU only


@gpu_only
@pytest.mark.parametrize("seq_len, heads_kv", [(4096, 16), (8192, 4)])
def test_bf16_long_transfusion_on_gpu(seq_len, heads_kv):
    mask = _transfusion_mask(seq_len, 2, seed=20, max_documents=6, max_image_len=1024)
    q, k, v = _qkv(2, seq_len, seq_len, 16, heads_kv, 128, torch.bfloat16, seed=21)
    assert_matches_reference(q, k, v, mask)


@gpu_only
@pytest.mark.parametrize("dim", [64, 80, 96, 128, 192, 256])
def test_head_dims_on_gpu(dim):
    mask = _transfusion_mask(1024, 2, seed=22, max_image_len=256)
    q, k, v = _qkv(2, 1024, 1024, 8, 2, dim, torch.bfloat16, seed=23)
    assert_matches_reference(q, k, v, mask)


def _long_mask(kind, batch, seq_q, seq_k, seed):
    """The masks of training and sampling at full length: packed Transfusion rows (the benchmarks'
    composition), causal, or the last image's patches of a packed row against the cached prefix."""
    if kind == "causal":
        return tk.IntervalMask.causal(batch, seq_q, seq_k, device=DEVICE)
    images, documents = packed_transfusion_layout(random.Random(seed), batch, seq_k)
    mask = tk.IntervalMask.from_spans(seq_k, images=images, documents=documents, device=DEVICE)
    if kind == "image_decode":
        end = images[0][-1][1]
        return mask.slice_queries(end - seq_q, end)
    return mask


@gpu_only
@pytest.mark.parametrize("kind, dtype, batch, seq_q, seq_k, heads_q, heads_kv, dim", [
    ("packed", torch.float16, 1, 8192, 8192, 8, 2, 128),
    ("packed", torch.float16, 2, 4096, 4096, 8, 4, 64),
    ("causal", torch.bfloat16, 1, 8192, 8192, 8, 8, 128),
    ("causal", torch.float16, 1, 4096, 4096, 8, 8, 128),
    ("causal", torch.bfloat16, 2, 1, 8192, 16, 4, 128),  # decoding one token against the cache
    ("causal", torch.float16, 2, 1, 8192, 16, 4, 128),
    ("image_decode", torch.bfloat16, 1, 256, 8192, 16, 4, 128),
], ids=str)
def test_long_masks_on_gpu(kind, dtype, batch, seq_q, seq_k, heads_q, heads_kv, dim):
    mask = _long_mask(kind, batch, seq_q, seq_k, seed=26)
    q, k, v = _qkv(batch, mask.seq_len_q, mask.seq_len_k, heads_q, heads_kv, dim, dtype, seed=27)
    assert_matches_reference(q, k, v, mask)


@gpu_only
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_softcap_and_shared_mask_on_gpu(dim):
    """The SOFTCAP kernels and the zero-stride mask at the GPU's tiles (bf16, GQA, one layout for the batch)."""
    mask = _transfusion_mask(1024, 1, seed=24, max_image_len=256)
    q, k, v = _qkv(2, 1024, 1024, 8, 2, dim, torch.bfloat16, seed=25)
    repeated = tk.IntervalMask(mask.kv_start.repeat(2, 1), mask.kv_end.repeat(2, 1), 1024)
    out, dq, dk, dv = assert_matches_reference(q, k, v, repeated, softcap=2.0, lse_weight=0.1)
    assert torch.equal(tk.attention(q, k, v, mask, softcap=2.0), out)


@gpu_only
def test_autotuned_configs_match_reference_on_gpu(monkeypatch):
    monkeypatch.setenv("TFKERNELS_AUTOTUNE", "1")
    mask = _transfusion_mask(2048, 2, seed=24, max_image_len=256)
    q, k, v = _qkv(2, 2048, 2048, 8, 2, 128, torch.bfloat16, seed=25)
    assert_matches_reference(q, k, v, mask)


# ------------------------------------------------------------------------------ robustness
# Memory safety whatever the mask holds, validation again after an edit, and non-finite isolation, each on
# the kernel path (the interpreter here) and on the reference path (docs/design.md#mask-validation).
# Helpers shared with the property tests at the end of the module.
NAN_PAD = 24  # rows of padding around each of q, k, v, d_out in their buffers
# Rows that share a work item with a non-finite value are recomputed by the rerun pass, which may use
# another inner tile size than the walk: the same values as without that value, up to rounding.
ROUNDING = dict(rtol=1e-5, atol=1e-5)
# Triton's interpreter computes with NumPy, which warns about arithmetic on NaN and infinities.
numpy_nan_warnings = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")


def _padded(shape, gen, fill, dtype=torch.float32):
    """A random tensor ``shape = [B, S, H, D]`` that is a view into a buffer with ``NAN_PAD`` rows of ``fill``
    before and after it along S: a kernel reading outside the view reads ``fill``."""
    batch, seq, heads, dim = shape
    buffer = torch.full((batch, seq + 2 * NAN_PAD, heads, dim), fill, dtype=dtype, device=DEVICE)
    buffer[:, NAN_PAD:NAN_PAD + seq] = torch.randn(shape, generator=gen).to(DEVICE)
    return buffer[:, NAN_PAD:NAN_PAD + seq]


def _fwd_bwd(fn, q, k, v, d_out):
    """out, lse, dq, dk, dv of ``fn(q, k, v) -> (out, lse)`` with loss ``sum(out * d_out) + sum(finite lse)``."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out * d_out).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


def _kernel(mask, scale=None):
    return lambda q, k, v: tk.attention(q, k, v, mask, scale=scale, return_lse=True)


def _reference(mask, scale=None):
    return lambda q, k, v: tk.reference.attention(q, k, v, mask, scale=scale)


def _assert_same(ours, ref, *, tol=2e-5, names=("out", "lse", "dq", "dk", "dv")):
    """Same non-finite entries (NaN/inf) on both paths, finite entries equal up to ``tol`` x magnitude."""
    for name, a, r in zip(names, ours, ref):
        a, r = a.double().cpu(), r.double().cpu()
        assert torch.equal(torch.isnan(a), torch.isnan(r)), f"{name}: NaN in different places"
        assert torch.equal(torch.isinf(a), torch.isinf(r)), f"{name}: inf in different places"
        finite = torch.isfinite(r)
        if finite.any():
            scale = max(1.0, r[finite].abs().max().item())
            assert (a[finite] - r[finite]).abs().max().item() <= tol * scale, f"{name}: values differ"


def test_in_place_edits_after_first_use_are_rejected_on_both_paths(monkeypatch):
    """A mask that passed validation and is then edited in place to hold 2**31 - 1 (bounds whose tile
    arithmetic would overflow) is validated again and refused before any launch, on both paths."""
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 40, 2, 8), torch.randn(1, 40, 2, 8)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    mask = tk.IntervalMask.full(1, 5, 40, device=DEVICE)
    tk.attention(q, k, v, mask)
    mask.kv_start[0, 4] = mask.kv_end[0, 4] = 2**31 - 1
    message = r"mask.kv_end: batch row 0, query 4: expected kv_end <= seq_len_k=40, got \[2147483647, 2147483647\)"
    with pytest.raises(ValueError, match=message):
        tk.attention(q, k, v, mask)
    with pytest.raises(ValueError, match=message):
        tk.reference.attention(q, k, v, mask)
    mask.kv_start[0, 4], mask.kv_end[0, 4] = 0, 40  # fixed in place: accepted again
    torch.testing.assert_close(tk.attention(q, k, v, mask), tk.reference.attention(q, k, v, mask)[0],
                               rtol=1e-5, atol=1e-5)


def test_swapped_mask_tensors_are_validated():
    q, k, v = _qkv(1, 8, 8, 2, 1, 16, torch.float32, seed=40)
    mask = tk.IntervalMask.causal(1, 8, device=DEVICE)
    tk.attention(q, k, v, mask)
    mask.kv_end = torch.full((1, 8), 3, dtype=torch.int32, device=DEVICE)  # new tensors, never validated
    mask.kv_start = torch.tensor([[0, 0, 0, 0, 5, 5, 5, 5]], dtype=torch.int32, device=DEVICE)
    for attend in (lambda: tk.attention(q, k, v, mask), lambda: tk.reference.attention(q, k, v, mask)):
        with pytest.raises(ValueError, match=r"batch row 0, query 4: expected kv_start <= kv_end, got \[5, 3\)"):
            attend()


def test_return_lse_must_be_a_bool():
    with pytest.raises(TypeError, match=r"return_lse: expected a bool, got 'no'"):
        tk.attention(**_bad(), return_lse="no")
    with pytest.raises(TypeError, match=r"return_lse: expected a bool, got 1"):
        tk.attention(**_bad(), return_lse=1)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from tfkernels.attention import _clamp_bound, _tile_ranges, _tile_ranges_of_rows

    @triton.jit
    def _tile_ranges_probe(START, END, OUT, last, num_cols, BLOCK: tl.constexpr):
        tiles = _tile_ranges(START, END, 0, last, num_cols, BLOCK)
        for i in tl.static_range(4):
            tl.store(OUT + i, tiles[i])

    @triton.jit
    def _tile_ranges_of_rows_probe(START, END, OUT, num_rows, num_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, ROWS)  # as _tile_setup loads and clamps a program's bounds
        valid = offs < num_rows
        start = _clamp_bound(tl.load(START + offs, mask=valid, other=0), num_cols)
        end = _clamp_bound(tl.load(END + offs, mask=valid, other=0), num_cols)
        tiles = _tile_ranges_of_rows(start, end, valid, num_cols, BLOCK)
        for i in tl.static_range(4):
            tl.store(OUT + i, tiles[i])


def _tile_ranges_of(start, end, num_cols, block):
    """``_tile_ranges`` run by a one-program Triton kernel on ``[R]`` bounds (rows ``0..R-1``)."""
    out = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    bounds = [torch.tensor(b, dtype=torch.int32, device=DEVICE) for b in (start, end)]
    _tile_ranges_probe[(1,)](*bounds, out, len(start) - 1, num_cols, BLOCK=block)
    return out.tolist()


INT32_EDGES = [-(2**31), -(2**31) + 1, -1, 0, 1, 2**31 - 2, 2**31 - 1]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.integers(-70, 140), st.sampled_from(INT32_EDGES)), min_size=4, max_size=4),
       st.integers(1, 100), st.sampled_from([16, 32, 64]))
def test_tile_ranges_stay_inside_the_columns_whatever_the_bounds(bounds, num_cols, block):
    """How the kernels stay inside their tensors: the four bounds a program reads are clamped before any
    tile arithmetic, so the three segments are consecutive and inside [0, cdiv(Sk, BLOCK)) for every int32
    value (no overflow)."""
    start_first, start_last, end_first, end_last = bounds
    lo, inner_lo, inner_hi, hi = _tile_ranges_of([start_first, start_last], [end_first, end_last], num_cols, block)
    num_tiles = -(-num_cols // block)
    assert lo >= 0 and hi <= num_tiles and lo <= num_tiles and 0 <= inner_lo <= inner_hi <= num_tiles
    visited = [t for a, b in ((lo, inner_lo), (inner_lo, inner_hi), (inner_hi, hi)) for t in range(a, b)]
    assert len(visited) == len(set(visited)) <= num_tiles, "segments overlap or run past the columns"
    assert all(0 <= t < num_tiles for t in visited)
    # Interior tiles (no element mask, no load mask) must be full tiles inside [0, Sk).
    assert inner_hi * block <= num_cols or inner_hi == inner_lo


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(*[st.one_of(st.integers(-20, 120), st.sampled_from(INT32_EDGES))] * 2), min_size=1,
                max_size=8), st.integers(1, 100), st.sampled_from([16, 32]))
def test_tile_ranges_of_non_monotone_bounds(rows, num_cols, block):
    """The key side of a mask with holes: a tile's bounds need not be monotone, so its column tiles come from
    all its rows' bounds. Whatever the values: consecutive segments inside [0, cdiv(Sk, BLOCK)), every column
    a row sees in a visited tile, and every row sees every column of the interior (unmasked) tiles."""
    out = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    bounds = [torch.tensor(b, dtype=torch.int32, device=DEVICE) for b in zip(*rows)]
    _tile_ranges_of_rows_probe[(1,)](*bounds, out, len(rows), num_cols, ROWS=8, BLOCK=block)
    lo, inner_lo, inner_hi, hi = out.tolist()
    num_tiles = -(-num_cols // block)
    assert 0 <= lo <= inner_lo <= inner_hi <= hi <= num_tiles
    clamped = [(min(max(a, 0), num_cols), min(max(b, 0), num_cols)) for a, b in rows]
    for start, end in clamped:
        assert all(lo <= col // block < hi for col in range(start, end)), "a visible column outside the walk"
        for tile in range(inner_lo, inner_hi):
            assert start <= tile * block and (tile + 1) * block <= min(end, num_cols), "an interior tile needs a mask"


@numpy_nan_warnings
def test_kernels_read_nothing_outside_their_tensors_whatever_the_key_bounds():
    """The key bounds of a mask with holes below validation (huge, negative, start past end): nothing read
    outside q, k, v, d_out, as for the row bounds."""
    batch, seq_q, seq_k, heads, dim = 2, 70, 50, 2, 16
    big = 2**31 - 1
    causal = tk.IntervalMask.causal(batch, seq_q, seq_k, device=DEVICE)
    key_q_start = torch.tensor([[-5, big, 0, 40, 3, -(2**31), 60, 10, 69, 1] * 5] * batch, dtype=torch.int32,
                               device=DEVICE)
    key_q_end = torch.tensor([[big, 2, 70, -1, 3, 2**30, 65, 9, 70, big] * 5] * batch, dtype=torch.int32,
                             device=DEVICE)
    op = attention_module._attention_fwd
    results = []
    for fill in (float("nan"), 1e4):
        gen = torch.Generator().manual_seed(43)
        tensors = [_padded(shape, gen, fill) for shape in ((batch, seq_q, heads, dim), (batch, seq_k, heads, dim),
                                                           (batch, seq_k, heads, dim), (batch, seq_q, heads, dim))]
        run = lambda a, b, c: op(a, b, c, causal.kv_start, causal.kv_end, 0.25, 0.0, key_q_start, key_q_end)  # noqa: E731
        results.append(_fwd_bwd(run, *tensors))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{name} read outside its tensors")
    assert torch.isfinite(results[0][0]).all(), "the forward reads real keys only: finite output"


@numpy_nan_warnings
def test_kernels_read_nothing_outside_their_tensors_whatever_the_bounds():
    """The kernel ops themselves (below validation) with bounds no valid mask has: huge, negative,
    decreasing, past Sk. Whatever they compute, they must not read outside q, k, v, d_out: with the
    padding around the views filled with NaN or with a finite value, every result is bitwise the same."""
    batch, seq_q, seq_k, heads_q, heads_kv, dim = 2, 70, 50, 2, 1, 16
    big = 2**31 - 1
    kv_start = torch.tensor([[-5, -(2**31), 0, 3, 40, 2, big, 10, 0, 49] * 7,
                             [0, 0, 60, 60, -1, 5, 5, 90, 90, 20] * 7], dtype=torch.int32, device=DEVICE)
    kv_end = torch.tensor([[big, 50, 1, 2, 45, 60, big, 9, -3, 50] * 7,
                           [1, 2, 70, 2**30, 2, 6, 7, 100, 91, 30] * 7], dtype=torch.int32, device=DEVICE)
    # The rows a program reads its tile range from (first and last of each 32- and 64-row tile): the
    # values that overflow an unclamped cdiv, and a range past both ends.
    kv_start[:, [31, 63, 69]] = big
    kv_end[:, [0, 32, 64]] = -(2**31)
    kv_start[1, [0, 32]], kv_end[1, [31, 63]] = -(2**31), big
    op = attention_module._attention_fwd
    results = []
    for fill in (float("nan"), 1e4):
        gen = torch.Generator().manual_seed(41)
        q = _padded((batch, seq_q, heads_q, dim), gen, fill)
        k = _padded((batch, seq_k, heads_kv, dim), gen, fill)
        v = _padded((batch, seq_k, heads_kv, dim), gen, fill)
        d_out = _padded((batch, seq_q, heads_q, dim), gen, fill)
        results.append(_fwd_bwd(lambda a, b, c: op(a, b, c, kv_start, kv_end, 0.25), q, k, v, d_out))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{name} read outside its tensors")
    assert torch.isfinite(results[0][0]).all(), "the forward reads real keys only: finite output"


def test_keys_past_sk_are_never_phantom_keys():
    """With an (unvalidated) kv_end past Sk, the keys loaded as zeros past the end of K/V must not
    count as visible keys: the rows see exactly their keys below Sk."""
    q, k, v = _qkv(1, 40, 40, 2, 2, 16, torch.float32, seed=42)
    start = torch.zeros(1, 40, dtype=torch.int32, device=DEVICE)
    end = torch.full((1, 40), 40, dtype=torch.int32, device=DEVICE)
    expected, expected_lse = attention_module._attention_fwd(q, k, v, start, end, 0.25)
    out, lse = attention_module._attention_fwd(q, k, v, start, end + 1000, 0.25)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=0)


# Non-finite isolation (docs/design.md#empty-rows-and-non-finite-values). First: a NaN in V at a padding key.
@numpy_nan_warnings
def test_nan_at_a_padding_key_reaches_no_row_on_both_paths():
    mask = tk.IntervalMask.from_segment_ids(torch.tensor([[0] * 10 + [-1] * 6], device=DEVICE))
    gen = torch.Generator().manual_seed(43)
    q, k, v = (torch.randn(1, 16, 1, 8, generator=gen).to(DEVICE) for _ in range(3))
    v[0, 12] = float("nan")
    clean_v = v.clone()
    clean_v[0, 12] = 0.0
    for attend in (tk.attention, lambda *a: tk.reference.attention(*a)[0]):
        out = attend(q, k, v, mask)
        assert torch.isfinite(out).all(), "a NaN no query sees turned rows NaN"
        assert (out[0, 10:] == 0).all(), "padding rows are exactly 0"
        torch.testing.assert_close(out, attend(q, k, clean_v, mask), **ROUNDING)


NONFINITE_SOURCES = ["q", "k", "v", "d_out"]


@numpy_nan_warnings
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("source", NONFINITE_SOURCES)
def test_nonfinite_values_stay_inside_their_visible_pairs(source, value):
    """A non-finite value in q, k, v or d_out reaches only the outputs and gradients that depend
    on it through a visible (query, key) pair. Both paths give the same NaN/inf entries and the same
    finite values; every entry the poisoned value cannot reach equals the clean run's (up to rounding)."""
    mask = tk.IntervalMask.from_spans(80, images=[[(10, 30)], [(40, 70)]], documents=[[35, 30], [75]],
                                      device=DEVICE)
    gen = torch.Generator().manual_seed(44)
    q, k, v, d_out = (torch.randn(2, 80, 2, 16, generator=gen).to(DEVICE) for _ in range(4))
    clean = _fwd_bwd(_kernel(mask), q, k, v, d_out)
    tensor = {"q": q, "k": k, "v": v, "d_out": d_out}[source]
    # Head 0 of row 0 at position 20 (inside an image), head 1 (GQA: kv head 1) of row 0 at 70 (padding),
    # head 0 of row 1 at 77 (padding: nobody sees it, and it sees nothing).
    for b, pos, head in ((0, 20, 0), (0, 70, 1), (1, 77, 0)):
        tensor[b, pos, head, 3] = value
    ours = _fwd_bwd(_kernel(mask), q, k, v, d_out)
    ref = _fwd_bwd(_reference(mask), q, k, v, d_out)
    _assert_same(ours, ref)
    # What the poisoned entries can reach: through visible pairs only.
    dense = mask.to_dense()  # [B, Sq, Sk]
    poisoned_q = torch.zeros(2, 80, 2, dtype=torch.bool, device=DEVICE)  # (batch, position, head)
    poisoned_k = torch.zeros_like(poisoned_q)
    for b, pos, head in ((0, 20, 0), (0, 70, 1), (1, 77, 0)):
        (poisoned_k if source in ("k", "v") else poisoned_q)[b, pos, head] = True
    # Rows that see a poisoned key, keys seen by a poisoned row (heads: q head h uses kv head h here).
    rows = poisoned_q | torch.einsum("bqk,bkh->bqh", dense.float(), poisoned_k.float()).bool()
    keys = poisoned_k | torch.einsum("bqk,bqh->bkh", dense.float(), rows.float()).bool()
    reachable = {"out": rows, "lse": rows.transpose(1, 2), "dq": rows, "dk": keys, "dv": keys}
    for name, a, c in zip(("out", "lse", "dq", "dk", "dv"), ours, clean):
        untouched = ~reachable[name]
        torch.testing.assert_close(a[untouched], c[untouched], **ROUNDING, msg=f"{name} outside the reach")
    if source in ("q", "k", "v") and value != value:  # a NaN makes every row that sees it NaN
        sees_something = dense.any(-1)[..., None]  # a padding row with a NaN q still sees nothing: 0
        assert torch.isnan(ours[0][rows & sees_something]).all() and (ours[0][rows & ~sees_something] == 0).all()


@numpy_nan_warnings
def test_rows_that_see_nothing_are_zero_whatever_q_k_v_hold():
    """Padding rows give exactly 0 (lse -inf) and zero dq; keys nobody sees get zero dk and dv, on
    both paths, with NaN and inf everywhere in q, k, v and d_out outside the visible pairs."""
    mask = tk.IntervalMask.from_spans(48, images=[[(3, 9)]], documents=[[20]], device=DEVICE)
    gen = torch.Generator().manual_seed(45)
    q, k, v, d_out = (torch.randn(1, 48, 2, 8, generator=gen).to(DEVICE) for _ in range(4))
    for t, value in ((q, float("nan")), (k, float("inf")), (v, float("nan")), (d_out, -float("inf"))):
        t[:, 20:] = value  # the padding: sees nothing, seen by nothing
    for attend in (_kernel(mask), _reference(mask)):
        out, lse, dq, dk, dv = _fwd_bwd(attend, q, k, v, d_out)
        assert (out[:, 20:] == 0).all() and torch.isneginf(lse[:, :, 20:]).all() and (dq[:, 20:] == 0).all()
        assert (dk[:, 20:] == 0).all() and (dv[:, 20:] == 0).all()
        for t in (out, lse[:, :, :20], dq, dk, dv):
            assert torch.isfinite(t[:, :20] if t is not lse else t).all()


@numpy_nan_warnings
def test_documents_of_a_packed_row_are_isolated():
    """A NaN anywhere in one document (q, k, v and d_out) leaves the other documents' outputs and
    gradients as without it (up to rounding), on both paths."""
    mask = tk.IntervalMask.from_spans(96, images=[[(5, 20), (50, 70)]], documents=[[40, 56]], device=DEVICE)
    gen = torch.Generator().manual_seed(46)
    q, k, v, d_out = (torch.randn(1, 96, 2, 16, generator=gen).to(DEVICE) for _ in range(4))
    for attend in (_kernel(mask), _reference(mask)):
        clean = _fwd_bwd(attend, q, k, v, d_out)
        poisoned = [t.clone() for t in (q, k, v, d_out)]
        for t in poisoned:
            t[0, 12, 1, 5] = float("nan")  # document 0 (inside its first image)
        results = _fwd_bwd(attend, *poisoned)
        for name, a, c in zip(("out", "lse", "dq", "dk", "dv"), results, clean):
            other = a[..., 40:, :, :] if name != "lse" else a[..., 40:]
            expected = c[..., 40:, :, :] if name != "lse" else c[..., 40:]
            torch.testing.assert_close(other, expected, **ROUNDING, msg=f"{name}: document 1 changed")
        # Head 1 of document 0's rows that see key 12 (the image's rows 5.. and every row after it): NaN.
        assert torch.isnan(results[0][0, 5:40, 1]).all() and torch.isfinite(results[0][0, :, 0]).all()


# Mask validation under torch.compile: no host sync, so both paths compute with the canonical bounds.
def _canonical_mask(kv_start, kv_end, seq_len_k):
    return tk.IntervalMask(*canonical_bounds(kv_start, kv_end, seq_len_k), seq_len_k)


@functools.cache
def _compiled(path):
    """One compiled function per path, reused across tests and examples (mask values are graph inputs:
    new values never recompile)."""
    attend = tk.attention if path == "kernel" else tk.reference.attention
    kwargs = {"return_lse": True} if path == "kernel" else {}

    def step(q, k, v, kv_start, kv_end):
        return attend(q, k, v, tk.IntervalMask(kv_start, kv_end, k.shape[1]), **kwargs)

    return torch.compile(step, fullgraph=True, backend="aot_eager")


def _check_compiled_against_canonical(q, k, v, d_out, kv_start, kv_end):
    expected = _fwd_bwd(_reference(_canonical_mask(kv_start, kv_end, k.shape[1])), q.double(), k.double(),
                        v.double(), d_out.double())
    for path in ("kernel", "reference"):
        got = _fwd_bwd(lambda a, b, c, path=path: _compiled(path)(a, b, c, kv_start, kv_end), q, k, v, d_out)
        _assert_same(got, expected, tol=1e-4)


@numpy_nan_warnings
def test_compiled_calls_compute_with_the_canonical_bounds_on_both_paths():
    """A bad mask first seen by a compiled function (or edited between compiled calls) cannot be validated
    without a graph break: the kernel and the reference then both compute with canonical_bounds (monotone,
    clamped, start past end = empty row), never out of bounds, and agree."""
    q, k, v = _qkv(2, 37, 45, 2, 1, 16, torch.float32, seed=47)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(48)).to(DEVICE)
    big = 2**31 - 1
    rows = [
        ([0] * 37, [45] * 37),  # valid
        ([-5] * 20 + [big] * 17, [big] * 37),  # past both ends
        (list(range(37, 0, -1)), list(range(45, 8, -1))),  # decreasing
        ([3, 1, 4, 1, 5, 9, 2, 6] * 4 + [5] * 5, [2, 7, 1, 8, 2, 8] * 6 + [-(2**31)]),  # start past end, negative
    ]
    for start_row, end_row in rows:
        kv_start = torch.tensor([start_row, start_row[::-1]], dtype=torch.int32, device=DEVICE)
        kv_end = torch.tensor([end_row, end_row], dtype=torch.int32, device=DEVICE)
        _check_compiled_against_canonical(q, k, v, d_out, kv_start, kv_end)


# ------------------------------------------------------------------------------ property test: random bad masks
# Random bad masks thrown at the three kernels (forward, dK/dV, dQ: forward + backward), eagerly and
# under torch.compile(fullgraph=True). Kept small for the interpreter: a few shapes, ~45 examples.
PROPERTY_SHAPES = [(1, 37, 37, 2, 1, 16), (2, 20, 70, 2, 2, 8), (2, 70, 45, 1, 1, 16)]  # B, Sq, Sk, Hq, Hkv, D
VALUES = [-(2**31), -(2**31) + 1, -70, -1, 0, 1, 2**31 - 2, 2**31 - 1]


@st.composite
def _masks(draw, batch, seq_q, seq_k):
    """``(valid mask, kv_start, kv_end)``: a valid mask of the shape, and bounds made from it by random
    edits (out of range, huge, negative, start past end, decreasing), which may leave it valid."""
    kind = draw(st.sampled_from(["layout", "causal", "full", "window", "prefix"] if seq_q == seq_k else
                                ["causal", "full", "window", "prefix"]))
    if kind == "layout":
        images, documents = random_layout(random.Random(draw(st.integers(0, 2**16))), batch, seq_q, max_image_len=12)
        mask = tk.IntervalMask.from_spans(seq_q, images=images, documents=documents, device=DEVICE)
    elif kind == "window":
        mask = tk.IntervalMask.sliding_window(draw(st.integers(1, 20)), batch, seq_q, seq_k, device=DEVICE)
    elif kind == "prefix":
        mask = tk.IntervalMask.prefix_lm(draw(st.integers(0, seq_k)), batch, seq_q, seq_k, device=DEVICE)
    else:
        mask = getattr(tk.IntervalMask, kind)(batch, seq_q, seq_k, device=DEVICE)
    start, end = mask.kv_start.clone(), mask.kv_end.clone()
    value = st.one_of(st.integers(-3, seq_k + 3), st.sampled_from(VALUES))
    for _ in range(draw(st.integers(0, 4))):
        target = draw(st.sampled_from([start, end]))
        b, i = draw(st.integers(0, batch - 1)), draw(st.integers(0, seq_q - 1))
        if draw(st.booleans()):
            target[b, i] = draw(value)
        else:  # a run of rows
            target[b, i:] = draw(value)
    if draw(st.booleans()):  # rows out of order
        b = draw(st.integers(0, batch - 1))
        perm = torch.tensor(draw(st.permutations(range(seq_q))), device=DEVICE)
        start[b] = start[b, perm]
    return mask, start, end


def _property_inputs(shape, seed):
    batch, seq_q, seq_k, heads_q, heads_kv, dim = shape
    gen = torch.Generator().manual_seed(seed)
    return (_padded((batch, seq_q, heads_q, dim), gen, float("nan")), _padded((batch, seq_k, heads_kv, dim), gen, float("nan")),
            _padded((batch, seq_k, heads_kv, dim), gen, float("nan")), _padded((batch, seq_q, heads_q, dim), gen, float("nan")))


@numpy_nan_warnings
@settings(max_examples=24, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_property_random_bad_masks_in_eager_mode(data):
    """Eager mode, a mask used once (validated) and then edited in place or given new tensors: an invalid
    mask raises ValueError on both paths before any launch; a valid one gives kernel == reference. The
    kernel ops below validation, on the raw bounds, never read outside q, k, v, d_out (NaN all around)."""
    shape = data.draw(st.sampled_from(PROPERTY_SHAPES))
    batch, seq_q, seq_k = shape[:3]
    mask, start, end = data.draw(_masks(batch, seq_q, seq_k))
    q, k, v, d_out = _property_inputs(shape, data.draw(st.integers(0, 2**16)))
    tk.attention(q, k, v, mask)  # first use: validated
    if data.draw(st.booleans()):
        mask.kv_start.copy_(start)  # in place
        mask.kv_end.copy_(end)
    else:
        mask.kv_start, mask.kv_end = start, end  # swapped tensors
    canonical = canonical_bounds(start, end, seq_k)
    valid = torch.equal(canonical[0], start) and torch.equal(canonical[1], end)
    event("valid mask" if valid else "invalid mask")
    if valid:
        expected = _fwd_bwd(_reference(mask), q.double(), k.double(), v.double(), d_out.double())
        _assert_same(_fwd_bwd(_kernel(mask), q, k, v, d_out), expected, tol=1e-4)
    else:
        for attend in (_kernel(mask), _reference(mask)):
            with pytest.raises(ValueError, match=r"^mask.kv_(start|end): batch row \d+, query \d+: expected"):
                attend(q, k, v)
        # Below validation, on the raw values: finite (nothing read from the NaN around the tensors; the
        # backward of an invalid mask may overflow, so only the forward is finite by construction) and
        # the same as with finite values around the tensors.
        op = lambda a, b, c: attention_module._attention_fwd(a, b, c, start, end, 0.25)  # noqa: E731
        raw = _fwd_bwd(op, q, k, v, d_out)
        assert torch.isfinite(raw[0]).all()
        padded = [t._base.clone().nan_to_num_(nan=7.0) for t in (q, k, v, d_out)]
        again = _fwd_bwd(op, *(p[:, NAN_PAD:NAN_PAD + t.shape[1]] for p, t in zip(padded, (q, k, v, d_out))))
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), raw, again):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{name} read outside")


@numpy_nan_warnings
@settings(max_examples=16, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_property_random_bad_masks_under_torch_compile(data):
    """Under torch.compile(fullgraph=True), valid or not: kernel == reference == the eager reference on the
    canonical bounds (forward and backward), on inputs surrounded by NaN (no read outside them)."""
    shape = PROPERTY_SHAPES[0]
    batch, seq_q, seq_k = shape[:3]
    _, start, end = data.draw(_masks(batch, seq_q, seq_k))
    q, k, v, d_out = _property_inputs(shape, data.draw(st.integers(0, 2**16)))
    _check_compiled_against_canonical(q, k, v, d_out, start, end)


# ------------------------------------------------------------------------------ masks with holes (hidden spans)
# Hidden spans (docs/design.md#hidden-spans): the forward and dQ walks classify each key tile by its keys' query
# intervals (skipped, unmasked or masked), dK/dV walks its keys' intervals, which are not monotone. The
# interpreter's tiles are 64 x 32 (forward), 32 x 64 (dK/dV, dQ) and 32 wide in the reruns, so spans at
# multiples of 32 sit on tile borders.
def _hidden_mask(seq_len, batch, seed, **kwargs):
    images, documents, hidden = random_hidden_layout(random.Random(seed), batch, seq_len, **kwargs)
    return tk.IntervalMask.from_spans(seq_len, images=images, documents=documents, hidden=hidden, device=DEVICE)


def _tile_border_mask():
    """Hidden spans of one token (at a document start), adjacent ones on a tile border, a noisy copy followed by
    its clean copy, whole key tiles hidden, a document that is one hidden span, a hidden span ending its
    document; then padding."""
    return tk.IntervalMask.from_spans(
        256, images=[[(64, 96), (232, 250)], [(128, 192)]], documents=[[160, 32, 60], [256]],
        hidden=[[(0, 1), (31, 32), (32, 64), (96, 128), (140, 160), (160, 192), (192, 193), (200, 232)],
                [(64, 128), (192, 200), (255, 256)]], device=DEVICE)


def _clean_copies_mask(seq_len=224):
    """BAGEL-style rows: text, a noisy copy of an image (hidden), its clean copy, text, ..."""
    pattern = [("text", 10), ("hidden", 40), ("image", 40), ("text", 20), ("hidden", 30), ("image", 30), ("text", 5)]
    images, hidden, pos = [], [], 0
    for kind, length in pattern * 2:
        if pos + length > seq_len:
            break
        {"text": [], "hidden": hidden, "image": images}[kind].append((pos, pos + length))
        pos += length
    return tk.IntervalMask.from_spans(seq_len, images=[images], documents=[[pos]], hidden=[hidden], device=DEVICE)


def _rectangular_mask_with_holes():
    """Sq != Sk built from tensors: causal rows against 100 keys, keys 20..39 seen only by queries 0..9 (rows at
    positions 52..61) and key 70 by queries 20..29."""
    causal = tk.IntervalMask.causal(1, 48, 100, device=DEVICE)
    key_q_start = torch.zeros(1, 100, dtype=torch.int32, device=DEVICE)
    key_q_end = torch.full((1, 100), 48, dtype=torch.int32, device=DEVICE)
    key_q_end[0, 20:40] = 10
    key_q_start[0, 70], key_q_end[0, 70] = 20, 30
    return tk.IntervalMask(causal.kv_start, causal.kv_end, 100, key_q_start, key_q_end)


# (name, mask builder, B, Sq, Sk, Hq, Hkv, D)
HIDDEN_CASES = [
    ("random", lambda: _hidden_mask(200, 2, seed=1, max_image_len=70), 2, 200, 200, 4, 2, 64),
    ("random_dense_spans_gqa4_d80", lambda: _hidden_mask(150, 2, seed=2, max_image_len=40, image_probability=0.9),
     2, 150, 150, 8, 2, 80),
    ("tile_borders", _tile_border_mask, 2, 256, 256, 2, 1, 32),
    ("clean_copies", _clean_copies_mask, 1, 224, 224, 2, 2, 64),
    # A generation step's rows against the cache: the clean copy's patches, then a noisy span's.
    ("decode_clean_copy", lambda: _clean_copies_mask().slice_queries(50, 90), 1, 40, 90, 4, 2, 32),
    ("decode_noisy_copy", lambda: _clean_copies_mask().slice_queries(110, 140), 1, 30, 140, 4, 2, 32),
    ("rectangular", _rectangular_mask_with_holes, 1, 48, 100, 2, 2, 16),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", HIDDEN_CASES, ids=[c[0] for c in HIDDEN_CASES])
def test_holes_match_reference(case, dtype):
    name, build_mask, batch, seq_q, seq_k, heads_q, heads_kv, dim = case
    mask = build_mask()
    assert mask.has_holes
    q, k, v = _qkv(batch, seq_q, seq_k, heads_q, heads_kv, dim, dtype, seed=zlib.crc32(name.encode()) % 1000)
    out, dq, dk, dv = assert_matches_reference(q, k, v, mask)
    dense = mask.to_dense()
    empty, unseen_keys = ~dense.any(dim=2), ~dense.any(dim=1)
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    assert (dk[unseen_keys] == 0).all() and (dv[unseen_keys] == 0).all()


@pytest.mark.parametrize("case", [c for c in HIDDEN_CASES if c[0] in ("tile_borders", "decode_noisy_copy")],
                         ids=lambda c: c[0])
def test_holes_with_softcap_and_the_lse_gradient(case):
    name, build_mask, batch, seq_q, seq_k, heads_q, heads_kv, dim = case
    q, k, v = _qkv(batch, seq_q, seq_k, heads_q, heads_kv, dim, torch.float32, seed=70)
    assert_matches_reference(q, k, v, build_mask(), softcap=2.0, lse_weight=0.1)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_one_mask_with_holes_serves_the_whole_batch(dtype):
    shared = _hidden_mask(120, 1, seed=71, max_image_len=40, image_probability=0.8)
    repeated = tk.IntervalMask(*(t.repeat(3, 1) for t in (shared.kv_start, shared.kv_end)), 120,
                               *(t.repeat(3, 1) for t in (shared.key_q_start, shared.key_q_end)))
    q, k, v = _qkv(3, 120, 120, 4, 2, 32, dtype, seed=72)
    assert_same_for_shared_and_repeated(q, k, v, shared, repeated)
    assert_matches_reference(q, k, v, repeated)


def test_holes_backward_is_bitwise_reproducible():
    mask = _hidden_mask(160, 2, seed=73, image_probability=0.8)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 160, 160, 4, 2, 64, torch.float16, seed=74))
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(75)).to(q.dtype)
    runs = [torch.autograd.grad(tk.attention(q, k, v, mask, deterministic=True), (q, k, v), d_out) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_holes_under_torch_compile_do_not_recompile_for_new_layouts():
    """fullgraph, one frame for every layout with holes (their bounds are tensor contents), equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    q, k, v = (t.requires_grad_() for t in _qkv(2, 64, 64, 2, 2, 32, torch.float32, seed=76))

    @torch.compile(backend=counter, fullgraph=True)
    def step(q, k, v, doc_ids, image_ids, hidden_ids):
        mask = tk.IntervalMask.from_segment_ids(doc_ids, image_ids, hidden_ids)
        return tk.attention(q, k, v, mask).float().square().sum()

    for layout_seed in range(4):
        images, documents, hidden = random_hidden_layout(random.Random(200 + layout_seed), 2, 64)
        ids = segment_ids_from_layout(64, images, documents, hidden=hidden)
        loss = step(q, k, v, *ids)
        grads = torch.autograd.grad(loss, (q, k, v))
        mask = tk.IntervalMask.from_segment_ids(*ids)
        expected = tk.attention(q, k, v, mask).float().square().sum()
        expected_grads = torch.autograd.grad(expected, (q, k, v))
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        for a, b in zip(grads, expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


@numpy_nan_warnings
@pytest.mark.parametrize("source", NONFINITE_SOURCES)
def test_nonfinite_values_in_a_hidden_span_stay_inside_it(source):
    """A NaN in a hidden span's q, k, v or d_out reaches only what its span's queries and keys touch: the
    queries after the span (which see its clean copy and the text around it) are as without it, on both paths."""
    mask = _clean_copies_mask()
    gen = torch.Generator().manual_seed(77)
    q, k, v, d_out = (torch.randn(1, 224, 2, 16, generator=gen).to(DEVICE) for _ in range(4))
    clean = [_fwd_bwd(attend, q, k, v, d_out) for attend in (_kernel(mask), _reference(mask))]
    poisoned = {"q": q, "k": k, "v": v, "d_out": d_out}
    poisoned[source] = poisoned[source].clone()
    poisoned[source][0, 30, 1, 3] = float("nan")  # inside the first noisy copy, (10, 50)
    ours = _fwd_bwd(_kernel(mask), *poisoned.values())
    ref = _fwd_bwd(_reference(mask), *poisoned.values())
    _assert_same(ours, ref)
    outside = torch.ones(224, dtype=torch.bool)
    outside[10:50] = False
    for name, a, c in zip(("out", "lse", "dq", "dk", "dv"), ours, clean[0]):
        rows = (a[:, :, outside] if name == "lse" else a[:, outside]), (c[:, :, outside] if name == "lse" else c[:, outside])
        if name in ("dk", "dv"):  # keys before the span are seen by its queries: their gradients carry it
            rows = a[:, 50:], c[:, 50:]
        torch.testing.assert_close(*rows, **ROUNDING, msg=f"{name} outside the hidden span")
    if source in ("k", "v"):  # seen by every query of the span
        assert torch.isnan(ours[0][0, 10:50, 1]).all() and torch.isfinite(ours[0][0, :, 0]).all()
    elif source == "q":
        assert torch.isnan(ours[0][0, 30, 1]).all() and torch.isfinite(ours[0][0, :30]).all()


@numpy_nan_warnings
@pytest.mark.parametrize("rule", [r for r in attention_module.LAUNCH_RULES if r.holes_only],
                         ids=lambda r: f"{r.arch}_d{r.max_head_dim}")
def test_holes_at_their_own_gpu_configs(rule):
    """The GPU configs of a mask with holes (LAUNCH_RULES' holes-only rows, e.g. dQ tiles of 16 keys: one granule
    per tile), run in the interpreter at a small head dim: equal to the reference, and with a NaN in a hidden span's
    k (the reruns, at their configs) the same NaN and finite entries as the reference."""
    mask = _clean_copies_mask()
    gen = torch.Generator().manual_seed(78)
    q, d_out = (torch.randn(1, 224, 2, 16, generator=gen).to(DEVICE) for _ in range(2))
    k, v = (torch.randn(1, 224, 1, 16, generator=gen).to(DEVICE) for _ in range(2))
    with attention_module.use_launch_configs(rule.configs):
        assert_matches_reference(q, k, v, mask)
        k[0, 30, 0, 3] = float("nan")  # inside the first noisy copy, (10, 50)
        ours = _fwd_bwd(_kernel(mask), q, k, v, d_out)
    _assert_same(ours, _fwd_bwd(_reference(mask), q, k, v, d_out))
    assert torch.isnan(ours[0][0, 10:50]).all() and torch.isfinite(ours[0][0, 50:]).all()
