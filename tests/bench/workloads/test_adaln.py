"""bench/workloads/adaln.py: the eager peers compute what tfkernels computes, every given tensor gets a
gradient, the GB/s column counts the [B, T, C] tensors the op must move, and the GPU run schedules it."""

import pytest
import torch

from bench.workloads import SUITES, adaln

from ..support import CPU, assert_peers_agree, work


def test_peers_compute_what_tfkernels_computes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # tfkernels' reference path: fast on the CPU
    assert_peers_agree("adaln")


@pytest.mark.parametrize("gated", [False, True])
def test_gated_workload_returns_the_stream_and_differentiates_every_input(gated, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    (workload,) = [w for w in SUITES["adaln"](True, CPU) if (w.name == "adaln_gated_residual") == gated]
    inputs = workload.setup(CPU, 0)
    assert len(inputs.leaves) == (5 if gated else 3) and inputs.grad_output.shape == inputs.data.x.shape
    outputs = {i.name: i.prepare(inputs)(inputs) for i in workload.implementations if i.name != "compiled_eager"}
    if gated:  # (y, h): h is the new residual stream
        for _, h in outputs.values():
            torch.testing.assert_close(h, inputs.data.residual + inputs.data.gate[:, None] * inputs.data.x)
    grads = {name: torch.autograd.grad(out[0] if gated else out, inputs.leaves, inputs.grad_output)
             for name, out in outputs.items()}
    for mine, theirs in zip(grads["tfkernels"], grads["eager"]):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_memory_bound_throughput(quick_rows):
    elements = 2 * 64 * 96  # quick shapes, float32
    moved = {"adaln_modulate": {"forward": 2, "backward": 3, "forward_backward": 5},
             "adaln_gated_residual": {"forward": 4, "backward": 5, "forward_backward": 9}}
    rows = [r for r in quick_rows if r["suite"] == "adaln"]
    assert {(r["workload"], r["implementation"]) for r in rows} == {
        (w, i) for w in moved for i in ("tfkernels", "eager")}
    for row in rows:
        assert row["tflops"] is None
        assert work(row, "gb_per_s", 1e9) == pytest.approx(moved[row["workload"]][row["mode"]] * elements * 4,
                                                           rel=1e-4)


def test_full_size_is_pixart_alpha_512():
    workloads = SUITES["adaln"](False, torch.device("cuda"))
    assert all(w.dtype == torch.bfloat16 and w.shape.startswith("B=16 T=1024 C=1152") for w in workloads)
    assert {w.name for w in workloads} == {"adaln_modulate", "adaln_gated_residual"}
    assert adaln.TENSORS_MOVED[True]["forward_backward"] == 9
