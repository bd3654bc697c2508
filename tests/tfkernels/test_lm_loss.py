"""tk.linear_cross_entropy (chunked GEMMs + Triton row kernel) against F.cross_entropy on full logits.

On a CPU the row kernel runs in Triton's interpreter, in float32 and float16; bfloat16 runs only on
a GPU. Tolerances are anchored to eager PyTorch in the same dtype (``hidden @ weight.T`` in that
dtype, then ``F.cross_entropy``), against float64:

    max |ours - ref64| <= 2 * max |eager_lowp - ref64| + 4 * eps(out dtype) * max(1, max |ref64|)
"""

import functools
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


def _eager(hidden, weight, target, ignore_index=-100, reduction="mean", z_loss=0.0, bias=None, class_weight=None,
           label_smoothing=0.0, softcap=None, return_z_loss=False):
    """What eager PyTorch does: full logits in the input dtype (F.linear, then the soft-cap), F.cross_entropy with
    the same class weights and smoothing, and the z-loss on top, averaged over the counted rows."""
    logits = F.linear(hidden, weight, bias)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    class_weight = None if class_weight is None else class_weight.to(logits.dtype)
    loss = F.cross_entropy(logits, target.long(), weight=class_weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    counted = target != ignore_index
    z_rows = torch.where(counted, z_loss * torch.logsumexp(logits.float(), dim=-1).square(), 0.0)
    z_term = {"none": z_rows, "sum": z_rows.sum(), "mean": z_rows.sum() / counted.sum().clamp(min=1)}[reduction]
    return loss + z_term.to(loss.dtype)


def _inputs(n, h, v, dtype, seed, ignored=(), ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=gen) / h**0.25).to(DEVICE, dtype)  # logits of a few units
    target = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    target[list(ignored)] = ignore_index
    return hidden, weight, target


def _loss_and_grads(fn, tensors, grad_out):
    leaves = [t.detach().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    # A non-unit upstream gradient: the backward must scale by it.
    upstream = (loss * grad_out.reshape(loss.shape).to(loss.dtype)).sum() if loss.ndim \
        else loss * grad_out.flatten()[0].to(loss.dtype)
    return (loss, *torch.autograd.grad(upstream, leaves))


def assert_matches_eager(hidden, weight, target, bias=None, **kwargs):
    """Loss and gradients (hidden, weight, bias) anchored on eager PyTorch in hidden's dtype against float64."""
    gen = torch.Generator().manual_seed(99)
    grad_out = torch.randn(target.shape, generator=gen).to(DEVICE)
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)

    def call(loss_fn):
        return lambda h, w, b=None: loss_fn(h, w, target, bias=b, **kwargs)

    ours = _loss_and_grads(call(tk.linear_cross_entropy), tensors, grad_out)
    ref64 = _loss_and_grads(call(_eager), [t.double() for t in tensors], grad_out)
    lowp = _loss_and_grads(call(_eager), tensors, grad_out)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ref64[0].shape
    assert all(g.dtype == hidden.dtype for g in ours[1:])
    for name, a, r, low in zip(("loss", "dhidden", "dweight", "dbias"), ours, ref64, lowp):
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
    class_weight = torch.rand(5000, generator=torch.Generator().manual_seed(11)).add(0.1).to(DEVICE)
    bias = torch.randn(5000, generator=torch.Generator().manual_seed(12)).to(DEVICE, torch.bfloat16)
    assert_matches_eager(hidden, weight, target, bias=bias, reduction=reduction, z_loss=1e-4,
                         class_weight=class_weight, label_smoothing=0.1, softcap=30.0)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_training_size_on_gpu(dtype):
    """A training batch's LM head: 4096 tokens, hidden 2048, V = 32000, z-loss, every 7th row ignored."""
    hidden, weight, target = _inputs(4096, 2048, 32000, dtype, seed=13, ignored=range(0, 4096, 7))
    assert_matches_eager(hidden, weight, target, z_loss=1e-4)


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
    bias, class_weight = torch.randn(11, device=DEVICE, requires_grad=True), torch.rand(11, device=DEVICE)
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.tfkernels.linear_cross_entropy.default,
                              (hidden, weight, target, -100, 1e-3, reduction, True, True))
        torch.library.opcheck(torch.ops.tfkernels.linear_cross_entropy.default,
                              (hidden, weight, target, -100, 1e-3, reduction, True, True, bias, class_weight, 0.1, 5.0,
                               True))
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
    (dict(hidden=torch.randn(4, device=DEVICE)), ValueError, r"hidden: expected \[N, H\] or \[..., H\] \(at least 2-d\)"),
    (dict(weight=torch.randn(10, 4, 1, device=DEVICE)), ValueError, r"weight: expected a 2-d tensor \(\[V, H\]\)"),
    (dict(hidden=torch.randn(2, 3, 4, device=DEVICE)), ValueError,
     r"target: expected shape \[2, 3\] \(hidden's leading dimensions\), got \(6,\)"),
    (dict(bias=torch.randn(10, device=DEVICE).half()), TypeError, "bias: expected hidden's dtype torch.float32"),
    (dict(bias=torch.randn(9, device=DEVICE)), ValueError, r"bias: expected shape \[10\] \(one per class\), got \(9,\)"),
    (dict(bias=[0.0] * 10), TypeError, "bias: expected a torch.Tensor, got list"),
    (dict(class_weight=torch.ones(10, dtype=torch.long, device=DEVICE)), TypeError,
     r"class_weight: expected a float tensor \[10\], got torch.int64"),
    (dict(class_weight=torch.ones(1, 10, device=DEVICE)), ValueError, r"class_weight: expected shape \[10\]"),
    (dict(class_weight=torch.ones(10, device=DEVICE, requires_grad=True)), ValueError,
     r"class_weight: not differentiated; pass class_weight.detach\(\)"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing: expected a finite float in \[0, 1\], got 1.5"),
    (dict(label_smoothing=None), TypeError, r"label_smoothing: expected a finite float in \[0, 1\]"),
    (dict(softcap=-1.0), ValueError, r"softcap: expected None or a finite float >= 0 \(0: off\), got -1.0"),
    (dict(softcap=float("inf")), ValueError, r"softcap: expected None or a finite float >= 0"),
    (dict(softcap="30"), TypeError, r"softcap: expected None or a finite float >= 0"),
    (dict(return_z_loss=1), TypeError, r"return_z_loss: expected a bool, got 1"),
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
    # Beyond int64 it would overflow deep inside torch.
    (dict(ignore_index=2**70), ValueError, r"ignore_index: expected an int in \[-9223372036854775808, 9223372036854775807\]"),
    (dict(ignore_index=-(2**63) - 1), ValueError, "ignore_index: expected an int in"),
    (dict(hidden=torch.randn(6, 4, device=DEVICE).to(torch.complex64)), TypeError, "hidden: expected float16"),
    (dict(target=torch.tensor([0, 1, 2, 3, 4, 5], device=DEVICE).bool()), TypeError, "target: expected dtype int32"),
    (dict(target=[0, 1, 2, 3, 4, 5]), TypeError, r"target: expected an int tensor \[6\], got list"),
    (dict(reduction=None), TypeError, "reduction: expected a str"),
    (dict(z_loss=float("nan")), ValueError, "z_loss: expected a finite float >= 0"),
]
if DEVICE == "cuda":
    BAD_INPUTS.append((dict(target=torch.tensor([0, 1, 2, 3, -100, 9])), ValueError, "target: expected device cuda"))
    BAD_INPUTS.append((dict(class_weight=torch.ones(10)), ValueError, "class_weight: expected device cuda"))
    BAD_INPUTS.append((dict(bias=torch.ones(10)), ValueError, "bias: expected device cuda"))


@pytest.mark.parametrize("overrides, error, message", BAD_INPUTS)
def test_bad_inputs_raise_before_launch(overrides, error, message, path, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel or the reference ran on bad input")

    monkeypatch.setattr(lm_loss_module, "_launch", no_launch)
    monkeypatch.setattr(lm_loss_module.reference, "linear_cross_entropy", no_launch)
    with pytest.raises(error, match=message):
        tk.linear_cross_entropy(**_bad_args(**overrides))


# ------------------------------------------------------------------------------ the arguments porters expect
def _class_weight(v, seed):
    return torch.rand(v, generator=torch.Generator().manual_seed(seed)).add(0.1).to(DEVICE)


def _bias(v, dtype, seed):
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


OPTIONS = {
    "bias": dict(bias=True),
    "class_weight": dict(class_weight=True),
    "label_smoothing": dict(label_smoothing=0.2),
    "softcap": dict(softcap=1.5),  # about the logits' own size: tanh far from linear
    "everything": dict(bias=True, class_weight=True, label_smoothing=0.1, softcap=3.0, z_loss=1e-2),
}


# Each option alone in float32 (mean and none: sum is mean's numerator), all of them together in every dtype and
# reduction: enough to catch a wrong term while keeping the interpreted suite short.
OPTION_CASES = ([(option, reduction, torch.float32) for option in list(OPTIONS)[:-1] for reduction in ("mean", "none")]
                + [("everything", reduction, dtype) for reduction in ("mean", "sum", "none") for dtype in CPU_DTYPES])


@pytest.mark.parametrize("option, reduction, dtype", OPTION_CASES)
def test_options_match_f_cross_entropy(option, reduction, dtype, path, small_vocab_blocks):
    """Each option alone and all together, forward and gradients (hidden, weight, bias), against F.cross_entropy
    with the same weight, label_smoothing and ignore_index on F.linear's logits (soft-capped), in float64."""
    kwargs = dict(OPTIONS[option])
    hidden, weight, target = _inputs(29, 24, 203, dtype, seed=20, ignored=[0, 5, 6, 28])
    bias = _bias(203, dtype, seed=21) if kwargs.pop("bias", False) else None
    if kwargs.pop("class_weight", False):
        kwargs["class_weight"] = _class_weight(203, seed=22)
    assert_matches_eager(hidden, weight, target, bias=bias, reduction=reduction, **kwargs)


def test_weighted_mean_is_f_cross_entropys(path):
    """reduction="mean" with class weights: sum of w[y] * loss over the counted rows / sum of their w[y]."""
    hidden, weight, target = _inputs(40, 8, 30, torch.float32, seed=23, ignored=[1, 2])
    class_weight = _class_weight(30, seed=24)
    class_weight[target[3]] = 7.0  # one heavy class: a plain mean over rows would differ a lot
    loss = tk.linear_cross_entropy(hidden, weight, target, class_weight=class_weight)
    per_row = tk.linear_cross_entropy(hidden, weight, target, class_weight=class_weight, reduction="none")
    counted = target != -100
    denominator = class_weight[target[counted]].sum()
    torch.testing.assert_close(loss, per_row.sum() / denominator)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, target, weight=class_weight))
    assert abs(loss.item() - per_row[counted].mean().item()) > 1e-2, "the weighted mean is not the mean over rows"


def test_zero_weight_targets_give_zero_never_nan(path):
    """All counted targets weigh 0: F.cross_entropy divides 0 by 0 (NaN); the loss is 0 and so are the gradients."""
    hidden, weight, target = _inputs(6, 4, 9, torch.float32, seed=25)
    class_weight = torch.ones(9, device=DEVICE)
    class_weight[target] = 0.0
    hidden.requires_grad_()
    loss = tk.linear_cross_entropy(hidden, weight, target, class_weight=class_weight)
    assert loss.item() == 0.0 and torch.isnan(F.cross_entropy(hidden @ weight.T, target, weight=class_weight))
    assert torch.equal(torch.autograd.grad(loss, hidden)[0], torch.zeros_like(hidden))


def test_hidden_of_any_leading_shape_is_flattened(path):
    """[B, T, H] hidden and [B, T] targets: the loss of the flattened rows; "none" keeps target's shape."""
    hidden, weight, target = _inputs(24, 8, 50, torch.float32, seed=26, ignored=[3])
    grad_out = torch.randn(2, 3, 4, device=DEVICE)
    for reduction in ("mean", "none"):
        flat = _loss_and_grads(functools.partial(tk.linear_cross_entropy, target=target, reduction=reduction),
                               (hidden, weight), grad_out)
        shaped = _loss_and_grads(functools.partial(tk.linear_cross_entropy, target=target.reshape(2, 3, 4),
                                                   reduction=reduction),
                                 (hidden.reshape(2, 3, 4, 8), weight), grad_out)
        assert shaped[0].shape == ((2, 3, 4) if reduction == "none" else ())
        assert shaped[1].shape == (2, 3, 4, 8)
        for a, b in zip(shaped, flat):
            assert torch.equal(a.reshape(b.shape), b)
    # A strided [B, T, H] view (the shifted positions of a batch): reshaped with a copy, same result.
    batch = torch.randn(2, 13, 8, device=DEVICE)
    assert_matches_eager(batch[:, :-1], weight, target[:24].reshape(2, 12))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_return_z_loss_reports_the_z_term_it_adds(reduction, path):
    hidden, weight, target = _inputs(21, 16, 150, torch.float32, seed=27, ignored=[3, 4])
    class_weight = _class_weight(150, seed=28)
    loss, z_term = tk.linear_cross_entropy(hidden, weight, target, reduction=reduction, z_loss=1e-2,
                                           class_weight=class_weight, return_z_loss=True)
    without = tk.linear_cross_entropy(hidden, weight, target, reduction=reduction, class_weight=class_weight)
    counted = target != -100
    z_rows = torch.where(counted, 1e-2 * torch.logsumexp(hidden.double() @ weight.double().T, -1).square(), 0.0)
    expected = {"none": z_rows, "sum": z_rows.sum(), "mean": z_rows.sum() / counted.sum()}[reduction]
    assert z_term.dtype == torch.float32 and z_term.shape == loss.shape and not z_term.requires_grad
    torch.testing.assert_close(z_term.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, without + z_term)  # the mean divides ce by sum w[y], the z-loss by the count
    _, no_z = tk.linear_cross_entropy(hidden, weight, target, reduction=reduction, return_z_loss=True)
    assert torch.equal(no_z, torch.zeros_like(no_z))


def test_softcap_bounds_huge_logits(path):
    """Logits in the hundreds capped at 30 (Gemma 2): finite, and the gradient vanishes where tanh saturates."""
    hidden, weight, target = _inputs(12, 8, 90, torch.float32, seed=29)
    assert_matches_eager(hidden * 300, weight, target, softcap=30.0)
    assert_matches_eager(hidden * 1e-3, weight, target, softcap=30.0)  # |x / c| < 1/4: the polynomial branch


def test_softcap_zero_or_none_is_off(path):
    hidden, weight, target = _inputs(12, 8, 90, torch.float32, seed=30)
    plain = tk.linear_cross_entropy(hidden, weight, target)
    assert torch.equal(tk.linear_cross_entropy(hidden, weight, target, softcap=0.0), plain)
    assert torch.equal(tk.linear_cross_entropy(hidden, weight, target, softcap=None), plain)


def test_default_launch_compiles_no_option_code(monkeypatch):
    """Off by default at no cost: every option is a constexpr of the row kernel, all False by default."""
    launches = []
    kernel = lm_loss_module._cross_entropy_rows_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append({k: v for k, v in kwargs.items() if k.startswith("HAS_")})
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(lm_loss_module, "_cross_entropy_rows_kernel", Spy())
    hidden, weight, target = _inputs(8, 4, 20, torch.float32, seed=31)
    tk.linear_cross_entropy(hidden.requires_grad_(), weight, target).backward()
    assert launches and all(flags == dict(HAS_Z_LOSS=False, HAS_CLASS_WEIGHT=False, HAS_SMOOTHING=False,
                                          HAS_SOFTCAP=False) for flags in launches)
    launches.clear()
    tk.linear_cross_entropy(hidden, weight, target, z_loss=1e-4, class_weight=torch.ones(20, device=DEVICE),
                            label_smoothing=0.1, softcap=30.0)
    assert launches and all(flags == dict(HAS_Z_LOSS=True, HAS_CLASS_WEIGHT=True, HAS_SMOOTHING=True,
                                          HAS_SOFTCAP=True) for flags in launches)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options_under_torch_compile(reduction, path):
    hidden, weight, target = _inputs(12, 8, 50, torch.float32, seed=32, ignored=[2])
    bias = _bias(50, torch.float32, seed=33)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    class_weight = _class_weight(50, seed=34)

    def step(hidden, weight, bias):
        loss, z_term = tk.linear_cross_entropy(hidden, weight, target, reduction=reduction, z_loss=1e-3, bias=bias,
                                               class_weight=class_weight, label_smoothing=0.1, softcap=4.0,
                                               return_z_loss=True)
        return loss.square().sum(), z_term.sum()

    compiled = torch.compile(step, fullgraph=True)
    (loss_compiled, z_compiled), (loss_eager, z_eager) = compiled(*leaves), step(*leaves)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(z_compiled, z_eager, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(loss_compiled, leaves), torch.autograd.grad(loss_eager, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=8 * torch.finfo(torch.float32).eps * b.abs().max().item())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options_under_autocast(reduction, path):
    """The autocast rule (docs/design.md#autocast) with bias and class_weight: bias is cast like weight (nn.Linear's
    operands); class_weight is not an operand of the GEMM and is read in float32. Bit for bit the op on the cast
    operands; gradients in the operands' own dtypes; anchored on eager under the same autocast against float64."""
    low = torch.bfloat16 if path == "reference" or DEVICE == "cuda" else torch.float16  # the interpreter: fp16
    hidden, weight, target = _inputs(30, 16, 70, torch.float32, seed=35, ignored=[3])
    weight = weight.to(low)
    bias = _bias(70, torch.float32, seed=36)
    kwargs = dict(reduction=reduction, class_weight=_class_weight(70, seed=37), label_smoothing=0.1, softcap=2.0,
                  z_loss=1e-3)
    grad_out = torch.randn(30, generator=torch.Generator().manual_seed(38)).to(DEVICE)

    def ours(h, w, b):
        return tk.linear_cross_entropy(h, w, target, bias=b, **kwargs)

    def eager(h, w, b):
        return _eager(h, w, target, bias=b, **kwargs).float()

    def under_autocast(fn):  # the forward under autocast, the backward outside it (as PyTorch recommends)
        def forward(*leaves):
            with torch.autocast(DEVICE, dtype=low):
                return fn(*leaves)
        return forward

    autocast_ours = _loss_and_grads(under_autocast(ours), (hidden, weight, bias), grad_out)
    autocast_eager = _loss_and_grads(under_autocast(eager), (hidden, weight, bias), grad_out)
    assert autocast_ours[0].dtype == torch.float32
    assert [g.dtype for g in autocast_ours[1:]] == [torch.float32, low, torch.float32]
    plain = _loss_and_grads(ours, (hidden.to(low), weight, bias.to(low)), grad_out)
    for a, b in zip(autocast_ours, plain):
        assert torch.equal(a, b.to(a.dtype))
    exact = _loss_and_grads(eager, (hidden.double(), weight.double(), bias.double()), grad_out)
    for name, a, r, lowp in zip(("loss", "dhidden", "dweight", "dbias"), autocast_ours, exact, autocast_eager):
        assert_anchored(name, a.to(low) if name != "loss" else a, r, lowp.to(low) if name != "loss" else lowp)
