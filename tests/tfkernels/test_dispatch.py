"""tk.backend (tfkernels._dispatch): which implementation the ops run for a device."""

import pytest
import torch

import tfkernels as tk
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runs_the_kernels():
    assert tk.backend("cuda") == ("triton" if _dispatch.HAS_TRITON else "reference")
