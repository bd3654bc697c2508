"""bench/workloads/lm_loss.py: the eager peers compute what tfkernels computes, and the TFLOP/s
column counts the projection's FLOPs."""

import pytest

from ..support import assert_peers_agree, work


def test_peers_compute_what_tfkernels_computes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # tfkernels' reference path: fast on the CPU
    assert_peers_agree("lm_loss")


def test_tflops_count_the_projections(quick_rows):
    rows = [r for r in quick_rows if r["suite"] == "lm_loss"]
    assert rows
    for row in rows:
        projections = {"forward": 1, "backward": 2, "forward_backward": 3}[row["mode"]]
        assert work(row, "tflops", 1e12) == pytest.approx(2 * 256 * 64 * 512 * projections, rel=1e-4)
