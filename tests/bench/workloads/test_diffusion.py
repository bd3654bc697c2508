"""bench/workloads/diffusion.py: the eager peers compute what tfkernels computes, and the GB/s
column counts the bytes the ops must move."""

import pytest

from ..support import assert_peers_agree, work


def test_peers_compute_what_tfkernels_computes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # tfkernels' reference path: fast on the CPU
    assert_peers_agree("diffusion")


def test_memory_bound_throughput(quick_rows):
    elements = {"diffusion_4x8x8": 8 * 4 * 8 * 8, "diffusion_8x8x8": 8 * 8 * 8 * 8}
    moved = {"forward": 4, "backward": 4, "forward_backward": 8, "copy": 8}  # float32 tensors
    rows = [r for r in quick_rows if r["suite"] == "diffusion"]
    assert rows
    for row in rows:
        assert row["tflops"] is None
        assert work(row, "gb_per_s", 1e9) == pytest.approx(moved[row["mode"]] * elements[row["workload"]] * 4,
                                                           rel=1e-4)
