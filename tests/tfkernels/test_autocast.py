"""The autocast rule of every op (docs/design.md#autocast), on the kernel path and the reference path.

- Matmul consumers, ``attention`` and ``linear_cross_entropy``: under autocast their float operands
  are cast to autocast's dtype (as ``nn.Linear`` and SDPA do), then the op runs with autocast off.
  So the result equals, bit for bit, the op called outside autocast on the cast operands; the loss
  is float32, attention's out has autocast's dtype (lse float32), and the gradients come back in
  the operands' own dtypes.
- Elementwise ops, ``add_noise`` and ``diffusion_loss``: the inputs are taken as given and autocast
  is off inside: the results equal the op outside autocast, bit for bit.

Kernel path: Triton's interpreter on a CPU under float16 autocast (it mishandles bfloat16), the
kernels on a GPU under bfloat16. Reference path: bfloat16 autocast. Values are also anchored to eager
PyTorch under the same autocast against float64 (``tfkernels.testing.assert_anchored``).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

import tfkernels as tk
import tfkernels.diffusion as diffusion_module
import tfkernels.lm_loss as lm_loss_module
from tests.support import DEVICE, requires_triton
from tfkernels import reference
from tfkernels.testing import assert_anchored

pytestmark = requires_triton
attention_module = importlib.import_module("tfkernels.attention")  # tk.attention is the function

COSINE = tk.NoiseSchedule.cosine(1000).to(DEVICE)


@pytest.fixture(params=["kernel", "reference"])
def low(request, monkeypatch):
    """The autocast dtype of the path under test; the reference path is forced by ``use_triton``."""
    if request.param == "reference":
        for module in (attention_module, diffusion_module, lm_loss_module):
            monkeypatch.setattr(module, "use_triton", lambda x: False)
        return torch.bfloat16
    return torch.bfloat16 if DEVICE == "cuda" else torch.float16


def _autocast(dtype):
    return torch.autocast(DEVICE, dtype=dtype)


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _grads(fn, inputs, upstream, autocast_dtype=None):
    """The result of ``fn`` on leaf copies of ``inputs`` (under autocast to ``autocast_dtype`` if given)
    and the gradients of ``sum(result * upstream)``, computed outside autocast as PyTorch recommends."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    with torch.autocast(DEVICE, dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
        out = fn(*leaves)
    grads = torch.autograd.grad((out.float() * upstream).sum(), leaves)
    return out.detach(), grads


# ------------------------------------------------------------------------------ attention
def test_attention_casts_q_k_v_to_the_autocast_dtype(low):
    mask = tk.IntervalMask.from_spans(24, images=[[(4, 12)]], documents=[[20]], device=DEVICE)
    q, k, v = _randn(1, 24, 4, 16, seed=1), _randn(1, 24, 2, 16, seed=2, dtype=low), _randn(1, 24, 2, 16, seed=3)
    upstream = _randn(1, 24, 4, 16, seed=4)
    with _autocast(low):  # fp32 q and v, low-precision k: accepted, all three cast
        (out, lse) = tk.attention(q, k, v, mask, return_lse=True)
    ours, grads = _grads(lambda q, k, v: tk.attention(q, k, v, mask), (q, k, v), upstream, low)
    # Eager low precision: SDPA's way under autocast, the inputs cast, then computed in that dtype.
    eager = _grads(lambda q, k, v: reference.attention(q.to(low), k.to(low), v.to(low), mask, upcast=False)[0],
                   (q, k, v), upstream, low)
    assert out.dtype == low and lse.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float32, low, torch.float32], "gradients in the inputs' dtypes"
    # Bit for bit the op outside autocast on the cast inputs.
    cast = [x.to(low) for x in (q, k, v)]
    plain, plain_grads = _grads(lambda q, k, v: tk.attention(q, k, v, mask), cast, upstream)
    assert torch.equal(ours, plain) and torch.equal(lse, tk.attention(*cast, mask, return_lse=True)[1])
    for grad, plain_grad in zip(grads, plain_grads):
        assert torch.equal(grad, plain_grad.to(grad.dtype))
    exact = _grads(lambda q, k, v: reference.attention(q, k, v, mask)[0], [x.double() for x in (q, k, v)], upstream)
    assert_anchored("out", ours, exact[0], eager[0])
    for name, grad, ref64, lowp in zip(("dq", "dk", "dv"), grads, exact[1], eager[1]):
        assert_anchored(name, grad.to(low), ref64, lowp.to(low))


# ------------------------------------------------------------------------------ linear_cross_entropy
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_casts_hidden_and_weight(reduction, low):
    hidden, weight = _randn(30, 16, seed=5), _randn(70, 16, seed=6, dtype=low)  # mixed: accepted under autocast
    target = torch.randint(0, 70, (30,), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    target[3] = -100
    upstream = _randn(30, seed=8) if reduction == "none" else torch.tensor(1.5, device=DEVICE)
    ours, grads = _grads(lambda h, w: tk.linear_cross_entropy(h, w, target, reduction=reduction), (hidden, weight),
                         upstream, low)
    eager = _grads(lambda h, w: F.cross_entropy(h @ w.T, target, reduction=reduction), (hidden, weight), upstream, low)
    assert ours.dtype == torch.float32, "the loss is float32 under autocast, on both paths"
    assert [g.dtype for g in grads] == [torch.float32, low]
    cast = [hidden.to(low), weight]
    plain, plain_grads = _grads(lambda h, w: tk.linear_cross_entropy(h, w, target, reduction=reduction), cast,
                                upstream)
    assert torch.equal(ours, plain)
    for grad, plain_grad in zip(grads, plain_grads):
        assert torch.equal(grad, plain_grad.to(grad.dtype))
    exact = _grads(lambda h, w: F.cross_entropy(h @ w.T, target, reduction=reduction),
                   (hidden.double(), weight.double()), upstream)
    assert_anchored("loss", ours, exact[0], eager[0].float())
    for name, grad, ref64, lowp in zip(("dhidden", "dweight"), grads, exact[1], eager[1]):
        assert_anchored(name, grad.to(low), ref64, lowp.to(low))


def test_linear_cross_entropy_dtypes_must_match_outside_autocast():
    with pytest.raises(TypeError, match="weight: expected hidden's dtype"):
        tk.linear_cross_entropy(_randn(4, 8, seed=9), _randn(5, 8, seed=10, dtype=torch.float16),
                                torch.zeros(4, dtype=torch.long, device=DEVICE))


# ------------------------------------------------------------------------------ diffusion ops
@pytest.mark.parametrize("seeded", [False, True])
def test_diffusion_ops_take_their_inputs_as_given(seeded, low):
    x0, noise = _randn(40, 12, seed=11), _randn(40, 12, seed=12)
    pred = _randn(40, 12, seed=13, dtype=low)  # as it comes out of an autocast linear
    t = torch.tensor([3, 500, 999], device=DEVICE)
    offsets = torch.tensor([0, 10, 25, 40], device=DEVICE)
    weights = torch.tensor([0.5, 1.0, 2.0], device=DEVICE)
    source = {"seed": 17} if seeded else {"noise": noise}
    upstream = _randn(3, seed=14)

    def run(autocast_dtype):
        with torch.autocast(DEVICE, dtype=low, enabled=autocast_dtype is not None):
            x_t = tk.add_noise(x0, t, COSINE, offsets=offsets, **source)
        loss = _grads(lambda p, a: tk.diffusion_loss(p, a, t, COSINE, target="v", offsets=offsets, weights=weights,
                                                     reduction="none", **source), (pred, x0), upstream, autocast_dtype)
        return x_t, loss

    x_t, (loss, grads) = run(low)
    plain_x_t, (plain_loss, plain_grads) = run(None)
    assert x_t.dtype == torch.float32 and loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [low, torch.float32]
    assert torch.equal(x_t, plain_x_t) and torch.equal(loss, plain_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


# ------------------------------------------------------------------------------ backward inside autocast
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kernel_ops_backward_inside_autocast_is_the_same(reduction):
    """train.py runs backward inside its autocast block: the kernel ops' gradients are the same as with
    backward outside it. (The reference path's backward is plain eager autograd: inside an autocast
    block it follows autocast like any eager PyTorch code.)"""
    low = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    mask = tk.IntervalMask.causal(1, 20, 20, device=DEVICE)
    q, k, v = (_randn(1, 20, 2, 8, seed=s) for s in (30, 31, 32))
    hidden, weight = _randn(10, 8, seed=33), _randn(30, 8, seed=34)
    target = torch.randint(0, 30, (10,), generator=torch.Generator().manual_seed(35)).to(DEVICE)
    cases = [(lambda q, k, v: tk.attention(q, k, v, mask), (q, k, v), _randn(1, 20, 2, 8, seed=36)),
             (lambda h, w: tk.linear_cross_entropy(h, w, target, reduction=reduction), (hidden, weight),
              _randn(10, seed=37) if reduction == "none" else torch.tensor(0.7, device=DEVICE))]
    for fn, inputs, upstream in cases:
        outside = _grads(fn, inputs, upstream, low)[1]
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        with _autocast(low):
            inside = torch.autograd.grad((fn(*leaves).float() * upstream).sum(), leaves)
        assert all(torch.equal(a, b) for a, b in zip(inside, outside))


def test_lm_loss_op_turns_autocast_off_inside():
    """The registered op itself, called with float32 operands under autocast (as opcheck or a direct
    torch.ops call does): its GEMMs write into float32 buffers, which crashed when autocast recast
    them (``torch.mm(..., out=grad_hidden)``: "Expected out tensor to have dtype Half")."""
    low = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    hidden, weight = _randn(10, 8, seed=38), _randn(30, 8, seed=39)
    target = torch.randint(0, 30, (10,), generator=torch.Generator().manual_seed(40)).to(DEVICE)
    op = torch.ops.tfkernels.linear_cross_entropy.default
    plain = op(hidden, weight, target, -100, 0.0, "mean", True, True)
    with _autocast(low):
        inside = op(hidden, weight, target, -100, 0.0, "mean", True, True)
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(inside, plain))


# ------------------------------------------------------------------------------ torch.compile
def test_compiled_under_autocast_matches_eager(low):
    """fullgraph=True under autocast: the autocast state is read at trace time (and guarded on), the
    casts and the autocast-off region are traced. On the kernel path the ops are opaque and the
    results equal eager's; on the reference path Inductor may drop a cast's rounding (it does not
    emulate intermediate low-precision casts), so the compiled result is anchored instead."""
    mask = tk.IntervalMask.causal(1, 16, 16, device=DEVICE)
    q, k, v = (_randn(1, 16, 2, 8, seed=s) for s in (20, 21, 22))
    hidden, weight = _randn(12, 8, seed=23), _randn(20, 8, seed=24)
    target = torch.randint(0, 20, (12,), generator=torch.Generator().manual_seed(25)).to(DEVICE)
    x0, pred = _randn(3, 10, seed=26), _randn(3, 10, seed=27, dtype=low)
    t = torch.tensor([1, 400, 900], device=DEVICE)

    def step(q, k, v, hidden, weight, pred):
        out = tk.attention(q, k, v, mask)
        lm = tk.linear_cross_entropy(hidden, weight, target, reduction="none")
        x_t = tk.add_noise(x0, t, COSINE, seed=5)
        diffusion = tk.diffusion_loss(pred, x0, t, COSINE, seed=5, reduction="none")
        return out, lm, x_t, diffusion

    inputs = (q, k, v, hidden, weight, pred)
    with _autocast(low):
        compiled = torch.compile(step, fullgraph=True)(*inputs)
        eager = step(*inputs)
    exact = (  # the public ops take no float64: the reference functions do
reference.attention(q.double(), k.double(), v.double(), mask)[0],
             reference.linear_cross_entropy(hidden.double(), weight.double(), target, reduction="none"),
             reference.add_noise(x0.double(), t, COSINE, seed=5),
             reference.diffusion_loss(pred.double(), x0.double(), t, COSINE, seed=5, reduction="none"))
    for name, ours, reference_eager, ref64 in zip(("out", "lm", "x_t", "diffusion"), compiled, eager, exact):
        assert ours.dtype == reference_eager.dtype, name
        assert_anchored(name, ours, ref64, reference_eager)
