"""tk.linear_cross_entropy (chunked GEMMs + Triton row kernel) against F.cross_entropy on full logits.

On a CPU the row kernel runs in Triton's interpreter, in float32 and float16; bfloat16 runs only on
a GPU. Tolerances are anchored to eager PyTorch in the same dtype (``hidden @ weight.T`` in that
dtype, then ``F.cross_entropy``), against float64:

    max |ours - ref64| <= 2 * max |eager_lowp - ref64| + 4 * eps(out dtype) * max(1, max |ref64|)
"""

import math

import pytest
import torch
import torch.nn.functional as F

import tfkernels as tk
import tfkernels.lm_loss as lm_loss_module
from tests.support import CPU_DTYPES, DEVICE, both_paths_fixture, gpu_only, requires_triton
from tfkernels import reference
from tfkernels.testing import assert_anchored

pytestmark = requires_triton


path = both_paths_fixture(lm_loss_module)


@pytest.fixture
def small_vocab_blocks(monkeypatch):
    """64-column vocabulary slices: V = 203 then takes four, the last one partial."""
    monkeypatch.setattr(lm_loss_module, "_MAX_BLOCK_V", 64)


def _eager(hidden, weight, target, ignore_index=-100, reduction="mean", z_loss=0.0):
    """What eager PyTorch does: full logits in the input dtype, F.cross_entropy, z-loss on top."""
    logits = hidden @ weight.T
    per_row = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="none")
    counted = target != ignore_index
    if z_loss:
        per_row = per_row + torch.where(counted, z_loss * torch.logsumexp(logits, dim=-1).square(), 0.0)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / counted.sum().clamp(min=1)


def _inputs(n, h, v, dtype, seed, ignored=(), ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=gen) / h**0.25).to(DEVICE, dtype)  # logits of a few units
    target = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    target[list(ignored)] = ignore_index
    return hidden, weight, target


def _loss_and_grads(fn, hidden, weight, grad_out):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(hidden, weight)
    # A non-unit upstream gradient: the backward must scale by it.
    upstream = (loss * grad_out.to(loss.dtype)).sum() if loss.ndim else loss * grad_out[0].to(loss.dtype)
    return (loss, *torch.autograd.grad(upstream, (hidden, weight)))


def assert_matches_eager(hidden, weight, target, **kwargs):
    gen = torch.Generator().manual_seed(99)
    grad_out = torch.randn(hidden.shape[0], generator=gen).to(DEVICE)
    ours = _loss_and_grads(lambda h, w: tk.linear_cross_entropy(h, w, target, **kwargs), hidden, weight, grad_out)
    ref64 = _loss_and_grads(lambda h, w: _eager(h, w, target, **kwargs), hidden.double(), weight.double(), grad_out)
    lowp = _loss_and_grads(lambda h, w: _eager(h, w, target, **kwargs), hidden, weight, grad_out)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ref64[0].shape
    assert ours[1].dtype == ours[2].dtype == hidden.dtype
    for name, a, r, low in zip(("loss", "dhidden", "dweight"), ours, ref64, lowp):
        assert_anchored(name, a, r, low)
    return ours


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_eager_with_ignored_rows_and_several_chunks(dtype, reduction, small_vocab_blocks):
    # V = 203 is no multiple of the 64-column slice; 29 rows of H = 24 run as 2 chunks of 24 rows.
    hidden, weight, target = _inputs(29, 24, 203, dtype, seed=1, ignored=[0, 5, 6, 7, 28])
    assert lm_loss_module._rows_per_chunk(29, 203, 24) < 29
    assert_matches_eager(hidden, weight, target, reduction=reduction)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss(dtype, reduction):
    hidden, weight, target = _inputs(21, 16, 150, dtype, seed=2, ignored=[3])
    assert_matches_eager(hidden, weight, target, reduction=reduction, z_loss=1e-2)


def test_default_slice_custom_ignore_index_int32_target_one_row():
    hidden, weight, target = _inputs(17, 8, 300, torch.float32, seed=3, ignored=[1, 2], ignore_index=7)
    assert_matches_eager(hidden, weight, target.int(), ignore_index=7)
    assert_matches_eager(hidden[:1], weight, target[:1])


def test_vocab_of_one_and_huge_logits_stay_finite():
    hidden, weight, target = _inputs(6, 4, 1, torch.float32, seed=4)
    loss = tk.linear_cross_entropy(hidden, weight, target)
    assert loss.item() == 0.0, "one class: probability 1, loss 0"
    hidden, weight, target = _inputs(6, 4, 90, torch.float32, seed=5)
    assert_matches_eager(hidden * 300, weight, target)


def test_non_contiguous_hidden_and_weight():
    hidden, weight, target = _inputs(40, 12, 77, torch.float16, seed=6)
    strided_hidden = hidden[::2]  # every other row of a bigger activation
    transposed_weight = weight.T.contiguous().T  # [V, H] stored column-major, like a tied [H, V]
    assert not strided_hidden.is_contiguous() and not transposed_weight.is_contiguous()
    assert_matches_eager(strided_hidden, transposed_weight, target[::2])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_gives_zero_loss_and_zero_gradients(reduction):
    hidden, weight, _ = _inputs(9, 8, 40, torch.float32, seed=7)
    target = torch.full((9,), -100, device=DEVICE)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    loss = tk.linear_cross_entropy(hidden, weight, target, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss))
    grads = torch.autograd.grad(loss.sum(), (hidden, weight))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows(reduction, path):
    hidden, weight, target = _inputs(0, 8, 40, torch.float32, seed=8)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    loss = tk.linear_cross_entropy(hidden, weight, target, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == ((0,) if reduction == "none" else ())
    assert loss.sum().item() == 0.0
    grad_hidden, grad_weight = torch.autograd.grad(loss.sum(), (hidden, weight))
    assert grad_hidden.shape == (0, 8) and torch.equal(grad_weight, torch.zeros_like(weight))


def test_zero_hidden_size_gives_uniform_logits(path):
    """H = 0: every logit is 0, the loss is log V on both paths."""
    hidden, weight = torch.zeros(3, 0, device=DEVICE), torch.zeros(7, 0, device=DEVICE)
    loss = tk.linear_cross_entropy(hidden, weight, torch.tensor([0, 3, 6], device=DEVICE), reduction="none")
    torch.testing.assert_close(loss, torch.full((3,), math.log(7), device=DEVICE))


@pytest.mark.parametrize("ignore_index", [2**40, 2**32 + 5, -(2**63), 2**63 - 1])
@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int64])
def test_ignore_index_anywhere_in_int64(ignore_index, target_dtype, path):
    """An ignore_index no target can equal (beyond int32 for int32 targets) ignores nothing. torch
    compares an int32 tensor with a Python int modulo 2**32: targets 0 and 5 are the ones that would
    have been ignored silently (2**40 and -2**63 wrap to 0, 2**32 + 5 to 5)."""
    hidden, weight, _ = _inputs(6, 4, 9, torch.float32, seed=14)
    target = torch.tensor([0, 5, 1, 0, 8, 5], device=DEVICE)
    for reduction in ("mean", "none"):
        loss = tk.linear_cross_entropy(hidden, weight, target.to(target_dtype), ignore_index=ignore_index,
                                       reduction=reduction)
        torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, target, reduction=reduction),
                                   rtol=1e-5, atol=1e-6)
    assert reference.linear_cross_entropy(hidden, weight, target.to(target_dtype), ignore_index).item() > 0


def test_logits_are_chunked_never_n_by_v(monkeypatch):
    """Spy on the row kernel: every logits buffer it sees holds one chunk, never all N rows."""
    seen = []
    kernel = lm_loss_module._cross_entropy_rows_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(logits, *args, **kwargs):
                seen.append(tuple(logits.shape))
                return kernel[grid](logits, *args, **kwargs)
            return launch

    monkeypatch.setattr(lm_loss_module, "_cross_entropy_rows_kernel", Spy())
    hidden, weight, target = _inputs(50, 4, 120, torch.float32, seed=9)
    loss = tk.linear_cross_entropy(hidden.requires_grad_(), weight, target, reduction="none")
    loss.sum().backward()
    rows = lm_loss_module._rows_per_chunk(50, 120, 4)
    assert rows == 4, "chunk logits sized like the larger of hidden and weight: 120 * 4 / 120 rows"
    assert seen and all(shape[0] <= rows and shape[1] == 120 for shape in seen)
    assert len(seen) == 2 * 13, "13 chunks in the forward, 13 recomputed in the backward"


@gpu_only
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_on_gpu(reduction):
    hidden, weight, target = _inputs(300, 64, 5000, torch.bfloat16, seed=10, ignored=range(0, 300, 7))
    assert_matches_eager(hidden, weight, target, reduction=reduction, z_loss=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_matches_eager(reduction, path):
    hidden, weight, target = _inputs(12, 8, 50, torch.float32, seed=11, ignored=[2])
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()

    def step(hidden, weight, target):
        return tk.linear_cross_entropy(hidden, weight, target, reduction=reduction, z_loss=1e-3).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    loss_compiled = compiled(hidden, weight, target)
    grads_compiled = torch.autograd.grad(loss_compiled, (hidden, weight))
    loss_eager = step(hidden, weight, target)
    grads_eager = torch.autograd.grad(loss_eager, (hidden, weight))
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=0)
    for a, b in zip(grads_compiled, grads_eager):
        # The kernel path's op is opaque (the same code runs); on the reference path Inductor fuses
        # and reorders the float32 sums: a few ulps of the gradient's scale.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=8 * torch.finfo(torch.float32).eps * b.abs().max().item())


def test_compiled_calls_check_targets_at_run_time(path):
    """A graph compiled on good targets still rejects bad ones, with the eager error, on both paths."""
    hidden, weight, target = _inputs(6, 4, 9, torch.float32, seed=15)
    loss = torch.compile(lambda target: tk.linear_cross_entropy(hidden, weight, target), fullgraph=True)
    assert torch.isfinite(loss(target))
    with pytest.raises(ValueError, match=r"target: expected class indices in \[0, 8\] .* got target\[3\] = 9"):
        loss(torch.tensor([0, 1, 2, 9, 4, 5], device=DEVICE))


def test_op_registration_passes_opcheck():
    hidden, weight, target = _inputs(5, 4, 11, torch.float32, seed=12, ignored=[1])
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.tfkernels.linear_cross_entropy.default,
                              (hidden, weight, target, -100, 1e-3, reduction, True, True))
    torch.library.opcheck(torch.ops.tfkernels.linear_cross_entropy_checked_target.default, (target, 11, -100))


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.setattr(lm_loss_module, "use_triton", lambda x: False)
    hidden, weight, target = _inputs(7, 4, 9, torch.float32, seed=13)
    hidden, weight, target = hidden.cpu(), weight.cpu(), target.cpu()
    torch.testing.assert_close(tk.linear_cross_entropy(hidden, weight, target), F.cross_entropy(hidden @ weight.T, target))
    with pytest.raises(ValueError, match=r"target: expected class indices in \[0, 8\]"):
        tk.linear_cross_entropy(hidden, weight, torch.full((7,), 9))


def _bad_args(**overrides):
    args = dict(hidden=torch.randn(6, 4, device=DEVICE), weight=torch.randn(10, 4, device=DEVICE),
                target=torch.tensor([0, 1, 2, 3, -100, 9], device=DEVICE))
    args.update(overrides)
    return args


BAD_INPUTS = [
    (dict(hidden=torch.randn(6, 4, device=DEVICE).double()), TypeError, "hidden: expected float16, bfloat16 or float32"),
    (dict(hidden=torch.randn(2, 3, 4, device=DEVICE)), ValueError, r"hidden: expected a 2-d tensor \(\[N, H\]\)"),
    (dict(weight=torch.randn(10, 4, device=DEVICE).half()), TypeError, "weight: expected hidden's dtype"),
    (dict(weight=torch.randn(10, 5, device=DEVICE)), ValueError, r"weight: expected \[V, H\] with H = 4"),
    (dict(weight=torch.randn(0, 4, device=DEVICE)), ValueError, "weight: expected at least one class"),
    (dict(target=torch.tensor([0, 1, 2, 3, 4], device=DEVICE)), ValueError, r"target: expected shape \[6\]"),
    (dict(target=torch.zeros(6, device=DEVICE)), TypeError, "target: expected dtype int32 or int64"),
    (dict(target=torch.tensor([0, 1, 2, 3, 10, 9], device=DEVICE)), ValueError,
     r"target: expected class indices in \[0, 9\] or ignore_index=-100, got target\[4\] = 10"),
    (dict(target=torch.tensor([0, -1, 2, 3, 4, 9], device=DEVICE)), ValueError, r"got target\[1\] = -1"),
    (dict(reduction="avg"), ValueError, "reduction: expected one of"),
    (dict(z_loss=-1.0), ValueError, "z_loss: expected a finite float >= 0"),
    (dict(z_loss=float("inf")), ValueError, "z_loss: expected a finite float >= 0"),
    (dict(z_loss="0.1"), TypeError, "z_loss: expected a finite float >= 0"),
    (dict(ignore_index=None), TypeError, "ignore_index: expected an int"),
    (dict(ignore_index=True), TypeError, "ignore_index: expected an int"),
    (dict(ignore_index=-100.0), TypeError, "ignore_index: expected an int"),
    # Beyond int64 it used to overflow deep inside torch.
    (dict(ignore_index=2**70), ValueError, r"ignore_index: expected an int in \[-9223372036854775808, 9223372036854775807\]"),
    (dict(ignore_index=-(2**63) - 1), ValueError, "ignore_index: expected an int in"),
    (dict(hidden=torch.randn(6, 4, device=DEVICE).to(torch.complex64)), TypeError, "hidden: expected float16"),
    (dict(target=torch.tensor([0, 1, 2, 3, 4, 5], device=DEVICE).bool()), TypeError, "target: expected dtype int32"),
    (dict(target=[0, 1, 2, 3, 4, 5]), TypeError, r"target: expected an int tensor \[N\], got list"),
    (dict(reduction=None), TypeError, "reduction: expected a str"),
    (dict(z_loss=float("nan")), ValueError, "z_loss: expected a finite float >= 0"),
]
if DEVICE == "cuda":
    BAD_INPUTS.append((dict(target=torch.tensor([0, 1, 2, 3, -100, 9])), ValueError, "target: expected device cuda"))


@pytest.mark.parametrize("overrides, error, message", BAD_INPUTS)
def test_bad_inputs_raise_before_launch(overrides, error, message, path, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel or the reference ran on bad input")

    monkeypatch.setattr(lm_loss_module, "_launch", no_launch)
    monkeypatch.setattr(lm_loss_module.reference, "linear_cross_entropy", no_launch)
    with pytest.raises(error, match=message):
        tk.linear_cross_entropy(**_bad_args(**overrides))
