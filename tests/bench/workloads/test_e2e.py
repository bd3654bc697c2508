"""bench/workloads/e2e.py: the packed batch reproduces the fixed layout, the peers' training steps
give tfkernels' loss, and the step's tokens/s and TFLOP/s columns."""

import math

import pytest
import torch

import tfkernels as tk
from bench.workloads import e2e

from ..support import assert_peers_agree, work


def test_e2e_batch_reproduces_the_layout():
    shape = e2e.shape_for(quick=True)
    batch = e2e.packed_batch(shape, seed=3)
    expected = tk.IntervalMask.from_spans(shape.seq_len, *shape.spans)
    assert torch.equal(batch.mask.kv_start, expected.kv_start)
    assert torch.equal(batch.mask.kv_end, expected.kv_end)
    assert int((batch.doc_ids >= 0).sum()) == shape.batch * shape.seq_len


def test_peers_compute_what_tfkernels_computes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # tfkernels' reference path: fast on the CPU
    assert_peers_agree("e2e")


def test_end_to_end_throughput(quick_rows):
    rows = [r for r in quick_rows if r["suite"] == "e2e"]
    assert rows
    for row in rows:
        assert work(row, "tokens_per_s", 1) == pytest.approx(2 * 256, rel=1e-4)
        assert row["tflops"] > 0 and math.isfinite(row["tflops"])
