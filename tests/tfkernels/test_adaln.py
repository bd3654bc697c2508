"""tk.adaln_modulate (one Triton pass each way) against eager DiT-style code in float64.

On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest), in float32
and float16; bfloat16 runs only on a GPU. The float64 result is eager PyTorch as DiT / PixArt-alpha
write it (``F.layer_norm`` or ``F.rms_norm`` without affine, ``* (1 + scale) + shift``, the gated
residual add before it), independent of ``tfkernels.reference``; every comparison is anchored to
the same eager code's error in the low dtype (``tfkernels.testing.assert_anchored``):

    max |ours - ref64| <= 2 * max |eager_lowp - ref64| + 4 * eps * max(1, max |ref64|)
"""

import pytest
import torch
import torch.nn.functional as F

import tfkernels as tk
import tfkernels.adaln as adaln_module
from tests.support import CPU_DTYPES, DEVICE, both_paths_fixture, gpu_only, requires_triton
from tfkernels import reference
from tfkernels.testing import assert_anchored

pytestmark = requires_triton

path = both_paths_fixture(adaln_module)

NAMES = ("x", "shift", "scale", "gate", "residual")


def _randn(*shape, dtype=torch.float32, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _eager(x, shift, scale, gate=None, residual=None, eps=1e-6, norm="layer"):
    """DiT's ``modulate(norm(x), shift, scale)`` after ``x = x + gate * branch``, in the inputs' dtype."""

    def rows(c):
        return c.unsqueeze(1) if c.ndim == 2 else c

    h = None
    if residual is not None:
        h = residual + (x if gate is None else rows(gate) * x)
        x = h
    normalise = F.layer_norm if norm == "layer" else F.rms_norm
    y = normalise(x, x.shape[-1:], eps=eps) * (1 + rows(scale)) + rows(shift)
    return y if h is None else (y, h)


def _inputs(batch, tokens, channels, dtype, *, per_token, residual, gate, seed, cond_shape=None):
    """``{name: tensor or None}``; conditioning of a few tenths (adaLN's is zero-initialised)."""
    if cond_shape is None:
        cond_shape = (batch, tokens, channels) if per_token else (batch, channels)
    return {
        "x": _randn(batch, tokens, channels, dtype=dtype, seed=seed) * 2 + 0.5,  # the norm removes the offset
        "shift": _randn(*cond_shape, dtype=dtype, seed=seed + 1) * 0.3,
        "scale": _randn(*cond_shape, dtype=dtype, seed=seed + 2) * 0.3,
        "gate": _randn(*cond_shape, dtype=dtype, seed=seed + 3) if gate else None,
        "residual": _randn(batch, tokens, channels, dtype=dtype, seed=seed + 4) if residual else None,
    }


def _outputs_and_grads(fn, inputs, upstream, **kwargs):
    """``fn``'s outputs (a tuple) and the gradients of ``sum(out * upstream)`` for every given input."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    out = fn(**{n: leaves.get(n) for n in NAMES}, **kwargs)
    out = out if isinstance(out, tuple) else (out,)
    loss = sum((o.double() * u).sum() for o, u in zip(out, upstream))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out, dict(zip(leaves, grads))


def assert_matches_eager(inputs, seed=100, **kwargs):
    """Outputs and all gradients anchored to eager code in the inputs' dtype; dtypes and shapes kept."""
    upstream = [_randn(*inputs["x"].shape, dtype=torch.float64, seed=seed + i) for i in range(2)]  # for y, h
    ref64 = _outputs_and_grads(_eager, {n: None if t is None else t.double() for n, t in inputs.items()},
                               upstream, **kwargs)
    lowp = _outputs_and_grads(_eager, inputs, upstream, **kwargs)
    ours = _outputs_and_grads(tk.adaln_modulate, inputs, upstream, **kwargs)
    normed = inputs["x"] if inputs["residual"] is None else inputs["residual"]
    for name, out, exact, eager in zip(("y", "h"), ours[0], ref64[0], lowp[0]):
        assert out.dtype == normed.dtype and out.shape == normed.shape and out.is_contiguous()
        assert_anchored(name, out, exact, eager)
    assert ours[1].keys() == {n for n, t in inputs.items() if t is not None}
    for name, grad in ours[1].items():
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name
        # The gradients of x and residual sum terms that cancel (dn - mean(dn) - n mean(dn n)).
        magnitude = ref64[1][name].abs().max().item()
        assert_anchored(f"d{name}", grad, ref64[1][name], lowp[1][name], magnitude)
    return ours


MODES = {  # (per_token, residual, gate)
    "per_sample": (False, False, False),
    "per_token": (True, False, False),
    "gated_residual_per_sample": (False, True, True),
    "gated_residual_per_token": (True, True, True),
    "residual_no_gate": (False, True, False),
}


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_eager_float64(dtype, norm, mode):
    per_token, residual, gate = MODES[mode]
    # C = 48 is no power of two (a 64-wide tile); T = 37 leaves a partial tile of rows.
    inputs = _inputs(2, 37, 48, dtype, per_token=per_token, residual=residual, gate=gate, seed=1)
    assert_matches_eager(inputs, norm=norm)


@pytest.mark.parametrize("batch, tokens, channels", [(3, 1, 40), (1, 5, 1), (2, 3, 1000), (1, 2, 4096)])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_awkward_shapes(batch, tokens, channels, norm):
    """One token; one channel (LayerNorm gives y = shift, every x-gradient 0); C above the tile, rows of
    one tile each."""
    inputs = _inputs(batch, tokens, channels, torch.float32, per_token=False, residual=True, gate=True, seed=2)
    assert_matches_eager(inputs, norm=norm)


@pytest.mark.parametrize("per_token", [False, True])
def test_many_chunks_per_sample_sum_in_a_fixed_order(per_token, monkeypatch):
    """Tiles of 4 rows, about 8 programs per launch: each sample's tokens split across 3 chunks (the
    last one partial), the per-sample gradients summed over the chunks' partials; bitwise reproducible."""
    monkeypatch.setattr(adaln_module, "_TILE_ELEMENTS", 128)
    monkeypatch.setattr(adaln_module, "_TARGET_PROGRAMS", 8)
    config = adaln_module._config(3, 45, 20)
    assert config["chunks"] > 1 and 45 % config["rows_per_program"], config
    inputs = _inputs(3, 45, 20, torch.float32, per_token=per_token, residual=True, gate=True, seed=3)
    first = assert_matches_eager(inputs)
    second = _outputs_and_grads(tk.adaln_modulate, inputs, [torch.ones(1, dtype=torch.float64)] * 2)
    again = _outputs_and_grads(tk.adaln_modulate, inputs, [torch.ones(1, dtype=torch.float64)] * 2)
    assert all(torch.equal(a, b) for a, b in zip(first[0], second[0]))
    assert all(torch.equal(second[1][n], again[1][n]) for n in second[1])


def test_per_sample_rows_as_b_1_c_and_expanded(path):
    """PixArt's ``[B, 1, C]`` chunks and an expanded (stride-0) row are per-sample conditioning."""
    inputs = _inputs(2, 9, 24, torch.float32, per_token=False, residual=True, gate=True, seed=4,
                     cond_shape=(2, 1, 24))
    assert_matches_eager(inputs, norm="rms")
    shared = _randn(1, 24, seed=5).expand(2, 24)  # one row for every sample
    x = _randn(2, 9, 24, seed=6)
    torch.testing.assert_close(tk.adaln_modulate(x, shared, shared), _eager(x, shared, shared), rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs_are_read_in_place(path):
    """x and residual as strided slices of bigger activations; shift, scale and gate as chunks of one
    [B, T, 3C] projection (per token) and of one [B, 3C] projection (per sample)."""
    batch, tokens, channels = 2, 11, 20
    x = _randn(batch, 2 * tokens, channels + 3, seed=7)[:, ::2, 1:channels + 1]
    residual = _randn(batch, channels, tokens, seed=8).transpose(1, 2)
    for projection in (_randn(batch, tokens, 3 * channels, seed=9), _randn(batch, 3 * channels, seed=10)):
        shift, scale, gate = (projection * 0.3).chunk(3, dim=-1)
        assert not any(t.is_contiguous() for t in (x, residual, shift, scale, gate))
        assert_matches_eager(dict(x=x, shift=shift, scale=scale, gate=gate, residual=residual))


def test_y_is_the_op_on_the_returned_h_and_unused_outputs_need_no_gradient(path):
    inputs = _inputs(2, 7, 24, torch.float16, per_token=False, residual=True, gate=True, seed=11)
    y, h = tk.adaln_modulate(**inputs)
    assert torch.equal(y, tk.adaln_modulate(h, inputs["shift"], inputs["scale"]))
    upstream = _randn(2, 7, 24, dtype=torch.float64, seed=12)
    zeros = torch.zeros_like(upstream)
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    for pick, both in ((0, [upstream, zeros]), (1, [zeros, upstream])):
        # Only y used (h gets no gradient), then only h: the same as a zero gradient for the other.
        out = tk.adaln_modulate(**leaves)[pick]
        grads = torch.autograd.grad((out.double() * upstream).sum(), list(leaves.values()), allow_unused=True)
        expected = _outputs_and_grads(tk.adaln_modulate, inputs, both)[1]
        for name, grad in zip(leaves, grads):
            grad = torch.zeros_like(leaves[name]) if grad is None else grad
            assert torch.equal(grad, expected[name]), name


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_eps_zero_and_padding_rows_of_a_tile_stay_finite():
    """eps = 0 is allowed (as in F.layer_norm); the rows past the last token of a tile see 0 / 0 in the
    kernels, which must not reach the per-sample sums."""
    inputs = _inputs(2, 5, 12, torch.float32, per_token=False, residual=True, gate=True, seed=12)
    assert adaln_module._config(2, 5, 12)["rows"] > 5
    assert_matches_eager(inputs, eps=0.0)


@pytest.mark.parametrize("per_token", [False, True])
def test_no_tokens(path, per_token):
    """Empty batches and empty rows, with per-sample and per-token ([B, 0, C]) conditioning."""
    for batch, tokens in ((0, 4), (2, 0)):
        inputs = _inputs(batch, tokens, 8, torch.float32, per_token=per_token, residual=True, gate=True, seed=13)
        leaves = {n: t.requires_grad_() for n, t in inputs.items()}
        y, h = tk.adaln_modulate(**leaves)
        assert y.shape == h.shape == (batch, tokens, 8)
        grads = torch.autograd.grad((y.sum() + h.sum()), list(leaves.values()))
        assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, leaves.values()))


def test_paths_agree(path):
    """The reference path gives what the kernels give, in float16 (both compute in float32)."""
    inputs = _inputs(2, 13, 40, torch.float16, per_token=True, residual=True, gate=True, seed=14)
    ours = tk.adaln_modulate(**inputs, norm="rms")
    expected = reference.adaln_modulate(**inputs, norm="rms")
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=2 * torch.finfo(torch.float16).eps * b.abs().max().item())


@gpu_only
@pytest.mark.parametrize("mode", list(MODES))
def test_bf16_on_gpu(mode):
    per_token, residual, gate = MODES[mode]
    inputs = _inputs(4, 1024, 1152, torch.bfloat16, per_token=per_token, residual=residual, gate=gate, seed=15)
    assert_matches_eager(inputs)


@pytest.mark.parametrize("residual", [False, True])
def test_torch_compile_fullgraph_matches_eager(residual, path):
    inputs = _inputs(2, 6, 24, torch.float32, per_token=False, residual=residual, gate=residual, seed=16)
    leaves = {n: t.requires_grad_() for n, t in inputs.items() if t is not None}

    def step(**tensors):
        out = tk.adaln_modulate(**tensors, eps=1e-5, norm="rms")
        return sum(o.square().sum() for o in (out if residual else (out,)))

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(**leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    loss_eager = step(**leaves)
    grads_eager = torch.autograd.grad(loss_eager, list(leaves.values()))
    torch.testing.assert_close(loss, loss_eager, rtol=1e-6, atol=0)
    for a, b in zip(grads, grads_eager):
        # The kernel path's op is opaque; on the reference path Inductor fuses and reorders the sums.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=8 * torch.finfo(torch.float32).eps * b.abs().max().item())


def test_autocast_takes_inputs_as_given(path):
    """An elementwise op under autocast: nothing is cast, autocast is off inside, bit for bit the op
    outside autocast; y keeps the normalised tensor's dtype (float32 stream, low-precision branch)."""
    low = torch.bfloat16 if DEVICE == "cuda" or path == "reference" else torch.float16
    inputs = _inputs(2, 5, 16, torch.float32, per_token=False, residual=True, gate=True, seed=17)
    inputs["x"], inputs["shift"] = inputs["x"].to(low), inputs["shift"].to(low)  # out of autocast's linears
    upstream = [_randn(2, 5, 16, dtype=torch.float64, seed=18)] * 2
    with torch.autocast(DEVICE, dtype=low):
        inside = _outputs_and_grads(tk.adaln_modulate, inputs, upstream)
    outside = _outputs_and_grads(tk.adaln_modulate, inputs, upstream)
    assert [o.dtype for o in inside[0]] == [torch.float32, torch.float32]
    assert all(torch.equal(a, b) for a, b in zip(inside[0], outside[0]))
    assert all(inside[1][n].dtype == inputs[n].dtype and torch.equal(inside[1][n], outside[1][n]) for n in inside[1])


def test_op_registration_passes_opcheck():
    inputs = _inputs(2, 5, 12, torch.float32, per_token=False, residual=True, gate=True, seed=19)
    x, shift, scale, gate, residual = (inputs[n].requires_grad_() for n in NAMES)
    torch.library.opcheck(torch.ops.tfkernels.adaln_modulate.default, (x, shift, scale, gate, residual, 1e-6, False))
    torch.library.opcheck(torch.ops.tfkernels.adaln_modulate.default, (x, shift, scale, None, None, 1e-6, True))
    dy = _randn(2, 5, 12, seed=20)
    torch.library.opcheck(torch.ops.tfkernels.adaln_modulate_bwd.default,
                          (dy, dy, x.detach(), x.detach(), scale.detach(), gate.detach(), 1e-6, False, True,
                           torch.float32, torch.float32, False))


def _bad_args(**overrides):
    args = dict(x=_randn(2, 3, 8, seed=21), shift=_randn(2, 8, seed=22), scale=_randn(2, 8, seed=23))
    args.update(overrides)
    return args


BAD_INPUTS = [
    (dict(x=_randn(2, 3, 8, seed=0).double()), TypeError, "x: expected float16, bfloat16 or float32"),
    (dict(x=[[1.0]]), TypeError, "x: expected a torch.Tensor, got list"),
    (dict(x=_randn(6, 8, seed=0)), ValueError, r"x: expected \[B, T, C\], got shape \[6, 8\]"),
    (dict(x=_randn(2, 3, 0, seed=0), shift=_randn(2, 0, seed=0), scale=_randn(2, 0, seed=0)), ValueError,
     r"x: expected 1 <= C <= 8192 channels"),
    (dict(shift=_randn(2, 8, seed=0).long()), TypeError, "shift: expected float16, bfloat16 or float32"),
    (dict(shift=_randn(3, 8, seed=0)), ValueError,
     r"shift: expected per-sample \[B, C\] = \[2, 8\] \(or \[B, 1, C\]\) or per-token \[B, T, C\] = \[2, 3, 8\], "
     r"got \[3, 8\]"),
    (dict(scale=_randn(2, 7, seed=0)), ValueError, r"scale: expected per-sample .* got \[2, 7\]"),
    (dict(scale=_randn(2, 2, 8, seed=0)), ValueError, r"scale: expected per-sample .* got \[2, 2, 8\]"),
    (dict(scale=_randn(8, seed=0)), ValueError, r"scale: expected per-sample .* got \[8\]"),
    (dict(scale=None), TypeError, "scale: expected a torch.Tensor, got NoneType"),
    (dict(scale=_randn(2, 3, 8, seed=0)), ValueError,
     r"shift, scale, gate: expected all per-sample .* got shift per-sample, scale per-token"),
    (dict(gate=_randn(2, 8, seed=0)), ValueError, r"gate: multiplies x in residual \+ gate \* x"),
    (dict(gate=_randn(2, 8, seed=0), residual=_randn(2, 3, 9, seed=0)), ValueError,
     r"residual: expected x's shape \[2, 3, 8\], got \[2, 3, 9\]"),
    (dict(residual=_randn(2, 3, 8, seed=0).int()), TypeError, "residual: expected float16, bfloat16 or float32"),
    (dict(eps=-1e-6), ValueError, "eps: expected a finite float >= 0"),
    (dict(eps=float("nan")), ValueError, "eps: expected a finite float >= 0"),
    (dict(eps="1e-6"), TypeError, "eps: expected a finite float >= 0"),
    (dict(norm="group"), ValueError, r"norm: expected one of \('layer', 'rms'\)"),
    (dict(norm=None), TypeError, "norm: expected a str"),
]
if DEVICE == "cuda":
    BAD_INPUTS.append((dict(shift=torch.randn(2, 8)), ValueError, "shift: expected device cuda"))


@pytest.mark.parametrize("overrides, error, message", BAD_INPUTS)
def test_bad_inputs_raise_before_launch(overrides, error, message, path, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel or the reference ran on bad input")

    monkeypatch.setattr(adaln_module, "_launch_fwd", no_launch)
    monkeypatch.setattr(adaln_module.reference, "adaln_modulate", no_launch)
    with pytest.raises(error, match=message):
        tk.adaln_modulate(**_bad_args(**overrides))
