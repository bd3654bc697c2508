"""bench/workloads/common.py: the eager peers the loss suites share, and how a row names what ran."""

import torch

from bench.workloads.common import eager_peers, tfkernels_backend

from ..support import CPU


def test_eager_peers_call_the_function_as_written_and_compiled():
    def function(a, b):
        return a - b

    eager, compiled_eager = eager_peers(function, lambda data: data)
    assert (eager.name, eager.backend_on(CPU), eager.unavailable(CPU, "forward")) == ("eager", "eager", None)
    assert compiled_eager.name == "compiled_eager" and compiled_eager.backend_on(CPU) == "torch.compile"
    assert "CUDA only" in compiled_eager.unavailable(CPU, "forward")
    inputs = type("Inputs", (), {"data": (torch.tensor(5.0), torch.tensor(2.0))})()
    assert eager.prepare(inputs)(inputs).item() == 3.0


def test_tfkernels_backend_names_what_runs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert tfkernels_backend(CPU) == "reference (eager)"
    if torch.cuda.is_available():
        assert tfkernels_backend(torch.device("cuda")) == "triton"
