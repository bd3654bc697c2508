"""bench/workloads/attention.py: the W1 layout the packed workloads use, that every peer computes
what tfkernels computes, and that the TFLOP/s column counts visible (q, k) pairs only."""

import importlib
import random

import pytest
import torch

import tfkernels as tk
from tfkernels.testing import packed_transfusion_layout

from ..support import assert_peers_agree, work

attention_module = importlib.import_module("tfkernels.attention")
QUICK_W1 = dict(doc_len=(64, 128), caption_len=(8, 24), image_len=16)  # bench/workloads/attention.py


def test_packed_transfusion_layout_has_the_w1_composition():
    images, documents = packed_transfusion_layout(random.Random(0), 2, 8192)
    assert (images, documents) == packed_transfusion_layout(random.Random(0), 2, 8192)
    assert (images, documents) != packed_transfusion_layout(random.Random(1), 2, 8192)
    for row_images, row_documents in zip(images, documents):
        assert sum(row_documents) == 8192  # fully packed, no padding
        assert all(512 <= n <= 2048 for n in row_documents[:-1])
        assert 512 <= row_documents[-1] < 1024  # the last document takes the rest
        starts = [sum(row_documents[:i]) for i in range(len(row_documents) + 1)]
        for start, end in row_images:
            assert end - start == 256
            doc = max(i for i, s in enumerate(starts) if s <= start)
            # inside one document, with a caption before it and text after it
            assert start - starts[doc] >= 20 and starts[doc + 1] - end >= 20
        patches = sum(end - start for start, end in row_images)
        assert 0.4 <= patches / 8192 <= 0.6
    mask = tk.IntervalMask.from_spans(8192, images, documents)
    mask.validate()


def test_packed_transfusion_layout_with_clean_copies():
    """W6: every image is a noisy copy (hidden) directly followed by its clean copy, inside its document, with text
    on both sides; about half the tokens are patches, both copies counted."""
    images, documents, hidden = packed_transfusion_layout(random.Random(0), 2, 8192, clean_copies=True)
    assert (images, documents, hidden) == packed_transfusion_layout(random.Random(0), 2, 8192, clean_copies=True)
    for row_images, row_documents, row_hidden in zip(images, documents, hidden):
        assert sum(row_documents) == 8192 and len(row_hidden) == len(row_images) > 0
        assert all(noisy[1] == clean[0] and noisy[1] - noisy[0] == clean[1] - clean[0] == 256
                   for noisy, clean in zip(row_hidden, row_images))
        patches = sum(end - start for start, end in row_images + row_hidden)
        assert 0.4 <= patches / 8192 <= 0.6
    mask = tk.IntervalMask.from_spans(8192, images, documents, hidden=hidden)
    mask.validate()
    assert mask.visible_pairs() < tk.IntervalMask.from_spans(8192, [sorted(i + h) for i, h in zip(images, hidden)],
                                                             documents).visible_pairs()


def test_packed_transfusion_layout_rejects_bad_ranges():
    with pytest.raises(ValueError, match="doc_len"):
        packed_transfusion_layout(random.Random(0), 1, 64, doc_len=(10, 5))
    with pytest.raises(ValueError, match="caption_len"):
        packed_transfusion_layout(random.Random(0), 1, 64, caption_len=(0, 5))


def test_peers_compute_what_tfkernels_computes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # tfkernels' reference path: fast on the CPU
    assert_peers_agree("attention")


def test_attention_tflops_count_visible_pairs(quick_rows):
    images, documents = packed_transfusion_layout(random.Random(0), 2, 256, **QUICK_W1)
    pairs = {
        "W1_packed_hkv16": int(tk.IntervalMask.from_spans(256, images, documents).to_dense().sum()),
        "W3_causal": 256 * 257 // 2,
        "W4_full": 128 * 128,
        "W5_image_vs_cache": 16 * 256,
        "W5_decode": 256,
    }
    factor = {"forward": 1.0, "backward": 2.5, "forward_backward": 3.5}
    head_dim, heads_q = 32, 4
    checked = 0
    for row in quick_rows:
        if row["suite"] != "attention":
            continue
        if row["mode"] == "mask_build":
            assert row["tflops"] is None
            continue
        assert row["gb_per_s"] is None and row["tokens_per_s"] is None
        if row["workload"] in pairs:
            flops = 4 * pairs[row["workload"]] * head_dim * heads_q * factor[row["mode"]]
            assert work(row, "tflops", 1e12) == pytest.approx(flops, rel=1e-4)
            checked += 1
    assert checked >= 30


def test_candidate_configs_run_beside_the_defaults_where_a_gpu_is(monkeypatch):
    """W1 and W3 time two candidate backward configs beside the defaults: they launch with their own configs (the
    call sees them), and on a CPU they are skipped with the reason."""
    from bench.workloads import attention

    for shape in attention.shapes(quick=False):
        names = {impl.name for impl in attention.implementations(shape)}
        assert (set(attention.candidate_configs(128)) <= names) == (shape.name in attention.CANDIDATE_SHAPES)
    shape = next(s for s in attention.shapes(quick=True) if s.name == "W3_causal")
    candidates = [i for i in attention.implementations(shape) if i.name.startswith("tfkernels_cfg_")]
    assert [i.unavailable(torch.device("cpu"), "forward") for i in candidates] == [
        "launch configs compare only on a GPU"] * 2
    seen = []
    impl = candidates[0]
    inputs = attention.setup_for(shape, torch.float32)(torch.device("cpu"), 0)
    monkeypatch.setattr(tk, "attention", lambda q, *args: seen.append(attention_module._configs_for(q, holes=False)))
    impl.prepare(inputs)(inputs)
    assert seen == [attention.candidate_configs(shape.head_dim)[impl.name]]
