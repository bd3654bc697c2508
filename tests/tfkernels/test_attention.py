"""tk.attention's Triton kernels against reference.attention in float64.

On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest), in float32
and float16; bfloat16 runs only on a GPU (the interpreter mishandles it). The tolerance of every
comparison is anchored to eager PyTorch's own error in the same dtype:

    max |ours - ref64| <= 2 * max |torch_lowp - ref64| + 4 * eps(dtype) * max(1, max |ref64|, grads)

The eps term covers what a flash backward adds over eager even in float32: probabilities are
recomputed as exp2(s - lse) from a rounded lse, a few ulps of error per element (inputs are
O(1), hence the floor of 1; dq/dk, which can cancel to ~0, use the largest reference gradient).
"""

import random
import zlib

import pytest
import torch

import tfkernels as tk
from tests.support import CPU_DTYPES, DEVICE, gpu_only, requires_triton
from tfkernels.testing import assert_anchored, random_layout

pytestmark = requires_triton



def _random(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def assert_matches_reference(q, k, v, mask, *, scale=None, lse_weight=0.0, seed=0):
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

    ours = run(lambda a, b, c: tk.attention(a, b, c, mask, scale=scale, return_lse=True), q, k, v)
    ref = run(lambda a, b, c: tk.reference.attention(a, b, c, mask, scale=scale), q.double(), k.double(), v.double())
    lowp = run(lambda a, b, c: tk.reference.attention(a, b, c, mask, scale=scale, upcast=False), q, k, v)
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


def test_bad_scale_and_deterministic_flag():
    # A NaN scale is a float of the wrong value: ValueError (it was a TypeError before the one rule).
    with pytest.raises(ValueError, match=r"scale: expected a finite float or None, got nan"):
        tk.attention(**_bad(), scale=float("nan"))
    with pytest.raises(TypeError, match=r"scale: expected a finite float or None, got '0.5'"):
        tk.attention(**_bad(), scale="0.5")
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
@pytest.mark.parametrize("dim", [64, 96, 128, 192, 256])
def test_head_dims_on_gpu(dim):
    mask = _transfusion_mask(1024, 2, seed=22, max_image_len=256)
    q, k, v = _qkv(2, 1024, 1024, 8, 2, dim, torch.bfloat16, seed=23)
    assert_matches_reference(q, k, v, mask)


@gpu_only
def test_autotuned_configs_match_reference_on_gpu(monkeypatch):
    monkeypatch.setenv("TFKERNELS_AUTOTUNE", "1")
    mask = _transfusion_mask(2048, 2, seed=24, max_image_len=256)
    q, k, v = _qkv(2, 2048, 2048, 8, 2, 128, torch.bfloat16, seed=25)
    assert_matches_reference(q, k, v, mask)


def test_an_unvalidated_bad_mask_never_reads_outside_k_and_v():
    """Validation is skipped for a mask already checked (or under torch.compile); a mask mutated in
    place afterwards must give wrong values at worst, never an out-of-bounds read. Keys past Sk are
    NaN here, so reading any of them would show up in the output."""
    seq_len = 80
    mask = tk.IntervalMask.causal(1, seq_len, device=DEVICE)
    q, k, v = _qkv(1, seq_len, seq_len + 40, 2, 2, 32, torch.float32, seed=30)
    k[:, seq_len:] = float("nan")
    v[:, seq_len:] = float("nan")
    k, v = k[:, :seq_len], v[:, :seq_len]  # views: the NaN keys lie right after them in memory
    tk.attention(q, k, v, mask)  # validates the mask once
    mask.kv_end[0, :] = seq_len + 40  # now out of range, and not re-checked
    mask.kv_start[0, :5] = -100
    out = tk.attention(q, k, v, mask)
    assert torch.isfinite(out).all()
