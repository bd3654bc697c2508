"""tfkernels._checks: one rule for every argument check (a wrong type is a TypeError, a wrong value a
ValueError) and messages that start with the argument's name; the autocast helpers of the ops'
autocast rule (the rule per op: tests/tfkernels/test_autocast.py)."""

import math

import pytest
import torch

from tfkernels._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    autocast_cast,
    autocast_dtype,
    autocast_off,
    check_choice,
    check_float,
    check_float_tensor,
    check_index_tensor,
    check_int,
    is_int,
    is_int_dtype,
    is_real,
)


@pytest.mark.parametrize("value, low, high, expected", [
    (3, None, None, True), (-3, None, None, True), (0, 0, None, True), (-1, 0, None, False), (5, 1, 5, True),
    (6, 1, 5, False), (True, None, None, False), (False, 0, 1, False), (3.0, None, None, False),
    ("3", None, None, False), (None, None, None, False), (torch.tensor(3), None, None, False),
])
def test_is_int(value, low, high, expected):
    assert is_int(value, low, high) is expected


def test_is_real_and_is_int_dtype():
    assert is_real(1) and is_real(1.5) and is_real(math.inf) and is_real(math.nan)
    assert not (is_real(True) or is_real("1") or is_real(None) or is_real(torch.tensor(1.0)))
    assert all(is_int_dtype(d) for d in (torch.int8, torch.uint8, torch.int32, torch.int64))
    assert not any(is_int_dtype(d) for d in (torch.bool, torch.float16, torch.float32, torch.complex64))
    assert (torch.float16, torch.bfloat16, torch.float32) == FLOAT_DTYPES
    assert (torch.int32, torch.int64) == INDEX_DTYPES


@pytest.mark.parametrize("value, low, high, error, message", [
    (2.0, None, None, TypeError, r"^n: expected an int, got 2.0$"),
    (True, 0, None, TypeError, r"^n: expected an int >= 0, got True$"),
    ("4", 1, 8, TypeError, r"^n: expected an int in \[1, 8\], got '4'$"),
    (-1, 0, None, ValueError, r"^n: expected an int >= 0, got -1$"),
    (9, 1, 8, ValueError, r"^n: expected an int in \[1, 8\], got 9$"),
    (9, None, 8, ValueError, r"^n: expected an int <= 8, got 9$"),
])
def test_check_int_errors(value, low, high, error, message):
    with pytest.raises(error, match=message):
        check_int("n", value, low, high)


def test_check_int_returns_the_value():
    assert check_int("n", 7) == 7 and check_int("n", 0, 0, 0) == 0


@pytest.mark.parametrize("value, kwargs, error, message", [
    ("0.5", {}, TypeError, r"^scale: expected a finite float, got '0.5'$"),
    (True, {}, TypeError, r"^scale: expected a finite float, got True$"),
    (None, dict(what="a finite float or None"), TypeError, r"^scale: expected a finite float or None, got None$"),
    (math.nan, {}, ValueError, r"^scale: expected a finite float, got nan$"),
    (-math.inf, {}, ValueError, r"^scale: expected a finite float, got -inf$"),
    (-0.5, dict(low=0), ValueError, r"^scale: expected a finite float >= 0, got -0.5$"),
    (1.5, dict(low=0, high=1), ValueError, r"^scale: expected a finite float in \[0, 1\], got 1.5$"),
])
def test_check_float_errors(value, kwargs, error, message):
    with pytest.raises(error, match=message):
        check_float("scale", value, **kwargs)


def test_check_float_returns_a_float():
    assert check_float("scale", 2) == 2.0 and isinstance(check_float("scale", 2), float)
    assert check_float("p", 0.0, 0, 1) == 0.0 and check_float("p", 1, 0, 1) == 1.0


def test_check_choice():
    assert check_choice("reduction", "sum", ("mean", "sum")) == "sum"
    with pytest.raises(ValueError, match=r"^reduction: expected one of \('mean', 'sum'\), got 'avg'$"):
        check_choice("reduction", "avg", ("mean", "sum"))
    with pytest.raises(TypeError, match=r"^reduction: expected a str, one of \('mean', 'sum'\), got NoneType$"):
        check_choice("reduction", None, ("mean", "sum"))


def test_tensor_checks():
    x = torch.zeros(2, dtype=torch.bfloat16)
    assert check_float_tensor("x", x) is x
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor, got list$"):
        check_float_tensor("x", [0.0])
    with pytest.raises(TypeError, match=r"^x: expected float16, bfloat16 or float32, got torch.float64$"):
        check_float_tensor("x", torch.zeros(2, dtype=torch.float64))
    t = torch.zeros(3, dtype=torch.int32)
    assert check_index_tensor("t", t, "[N]") is t
    with pytest.raises(TypeError, match=r"^t: expected an int tensor \[N\], got tuple$"):
        check_index_tensor("t", (1, 2), "[N]")
    with pytest.raises(TypeError, match=r"^t: expected dtype int32 or int64, got torch.int16$"):
        check_index_tensor("t", torch.zeros(3, dtype=torch.int16), "[N]")


def test_autocast_dtype_reads_the_state_of_the_tensor_s_device_type():
    x = torch.ones(2)
    assert autocast_dtype(x) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype(x) == torch.bfloat16
        assert autocast_dtype(torch.ones(2, device="meta")) is None, "no autocast on meta (and no error)"
        assert autocast_dtype([1.0]) is None, "a non-tensor is left for the op's checks"
        with autocast_off(x):
            assert autocast_dtype(x) is None
        with autocast_off(torch.ones(2, device="meta")), autocast_off(None):
            assert autocast_dtype(x) == torch.bfloat16, "a no-op where autocast does not exist"
    with torch.autocast("cpu", dtype=torch.float16):
        assert autocast_dtype(x) == torch.float16


def test_autocast_cast_casts_only_the_kernels_float_dtypes():
    f32, f16, f64, i64 = (torch.ones(2, dtype=d) for d in (torch.float32, torch.float16, torch.float64, torch.int64))
    out = autocast_cast(torch.bfloat16, f32, f16, f64, i64, None, [1.0])
    assert [x.dtype for x in out[:4]] == [torch.bfloat16, torch.bfloat16, torch.float64, torch.int64]
    assert out[4] is None and out[5] == [1.0]
    assert autocast_cast(torch.bfloat16, f64)[0] is f64


def test_autocast_helpers_trace_under_torch_compile():
    def f(x):
        dtype = autocast_dtype(x)
        if dtype is None:
            return x * 2
        (x,) = autocast_cast(dtype, x)
        with autocast_off(x):
            return x * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.ones(3)
    assert compiled(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compiled(x).dtype == torch.bfloat16
