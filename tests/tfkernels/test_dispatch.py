"""tk.backend (tfkernels._dispatch): which implementation the ops run for a device."""

import pytest
import torch

import tfkernels as tk
from tests.support import gpu_only
from tfkernels import _dispatch


def test_cpu_runs_the_kernels_in_the_interpreter_only_when_asked(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tk.backend("cpu") == tk.backend(torch.device("cpu")) == ("triton" if _dispatch.HAS_TRITON else "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert tk.backend("cpu") == "reference"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert tk.backend("cpu") == "reference"


def test_other_devices_and_no_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tk.backend("meta") == "reference"
    monkeypatch.setattr(_dispatch, "HAS_TRITON", False)
    assert tk.backend("cpu") == "reference"


def test_the_ops_follow_it(monkeypatch):
    """The answer is what the ops do: with the reference backend, tk.attention is the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 5, 2, 8)
    mask = tk.IntervalMask.causal(1, 5)
    assert tk.backend(q.device) == "reference"
    assert torch.equal(tk.attention(q, q, q, mask), tk.reference.attention(q, q, q, mask)[0])


@gpu_only
def test_cuda_runs_the_kernels():
    assert tk.backend("cuda") == ("triton" if _dispatch.HAS_TRITON else "reference")


@pytest.mark.parametrize("triton_version, numpy_version, works", [
    ("3.6.0", "2.4.6", False), ("3.6.0", "2.3.5", True), ("3.9.0", "2.4.6", True), ("3.7.1", "2.4.0", True),
    ("3.6.0", "3.0.0rc1", False), ("3.10.0+git1234", "2.4.0", True),
])
def test_the_interpreter_floor_is_a_clear_error(triton_version, numpy_version, works):
    """Triton 3.6's interpreter with numpy >= 2.4 fails deep inside a kernel (checked by hand with both
    versions installed); tfkernels says why before any launch instead."""
    if works:
        _dispatch.check_interpreter(triton_version, numpy_version)
    else:
        with pytest.raises(RuntimeError, match=rf"Triton {triton_version}'s interpreter cannot run tfkernels' kernels "
                                               rf"with numpy {numpy_version} \(it needs numpy < 2.4\)"):
            _dispatch.check_interpreter(triton_version, numpy_version)
