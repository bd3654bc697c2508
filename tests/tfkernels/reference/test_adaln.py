"""reference.adaln_modulate against DiT-style eager code (F.layer_norm / F.rms_norm without affine)."""

import pytest
import torch
import torch.nn.functional as F

from tfkernels.reference import adaln_modulate


def _randn(*shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("cond_shape", [(2, 16), (2, 1, 16), (2, 5, 16)])
def test_matches_modulate_of_norm_in_float64(norm, cond_shape):
    x, residual = _randn(2, 5, 16, seed=0, dtype=torch.float64), _randn(2, 5, 16, seed=1)
    shift, scale, gate = (_randn(*cond_shape, seed=s) for s in (2, 3, 4))
    rows = (lambda c: c[:, None]) if len(cond_shape) == 2 else (lambda c: c)
    normalise = F.layer_norm if norm == "layer" else F.rms_norm
    y, h = adaln_modulate(x, shift, scale, gate, residual, eps=1e-5, norm=norm)
    expected_h = residual + rows(gate) * x
    torch.testing.assert_close(h, expected_h)
    torch.testing.assert_close(y, normalise(expected_h, (16,), eps=1e-5) * (1 + rows(scale)) + rows(shift))
    plain = adaln_modulate(x, shift, scale, eps=1e-5, norm=norm)
    torch.testing.assert_close(plain, normalise(x, (16,), eps=1e-5) * (1 + rows(scale)) + rows(shift))


def test_h_is_rounded_to_the_residual_dtype_before_the_norm():
    x, residual = _randn(1, 3, 8, seed=5, dtype=torch.float16), _randn(1, 3, 8, seed=6, dtype=torch.float16)
    shift, scale = _randn(1, 8, seed=7, dtype=torch.float32), _randn(1, 8, seed=8, dtype=torch.float32)
    y, h = adaln_modulate(x, shift, scale, residual=residual)
    assert h.dtype == y.dtype == torch.float16
    assert torch.equal(h, (residual.float() + x.float()).half())
    assert torch.equal(y, adaln_modulate(h, shift, scale))


def test_float32_inside_autocast_and_gate_needs_residual():
    x, shift, scale = _randn(2, 3, 8, seed=9, dtype=torch.float32), _randn(2, 8, seed=10), _randn(2, 8, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = adaln_modulate(x, shift.float(), scale.float())
    assert inside.dtype == torch.float32 and torch.equal(inside, adaln_modulate(x, shift.float(), scale.float()))
    with pytest.raises(ValueError, match="gate: multiplies x in residual"):
        adaln_modulate(x, shift, scale, gate=shift)
    with pytest.raises(ValueError, match="norm: expected one of"):
        adaln_modulate(x, shift, scale, norm="batch")
