"""tfkernels.testing: the public assertion helpers (they must fail when they should) and the
random layout generators (every layout they make is a valid Transfusion layout)."""

import random

import pytest
import torch

import tfkernels as tk
from tfkernels.testing import (
    assert_anchored,
    max_error,
    packed_transfusion_layout,
    random_hidden_layout,
    random_layout,
    random_row_layout,
    segment_ids_from_layout,
)


# ------------------------------------------------------------------------------ max_error
def test_max_error_is_the_largest_absolute_difference_in_float64():
    x = torch.tensor([1.0, -2.0, 3.5], dtype=torch.float16)
    ref = torch.tensor([1.0, -2.25, 3.0], dtype=torch.float64)
    assert max_error(x, ref) == 0.5
    assert max_error(torch.zeros(0), torch.zeros(0, dtype=torch.float64)) == 0.0
    big = torch.tensor([2.0**24 + 1], dtype=torch.float64)  # not representable in float32
    assert max_error(big, torch.tensor([2.0**24], dtype=torch.float64)) == 1.0


# ------------------------------------------------------------------------------ assert_anchored
def _case(eager_error: float, dtype=torch.float32, n: int = 64):
    """ref64 in [-1, 1] and an eager result off by ``eager_error`` at one element."""
    ref64 = torch.linspace(-1, 1, n, dtype=torch.float64)
    lowp = ref64.to(dtype).clone()
    lowp[3] += eager_error
    return ref64, lowp


def test_assert_anchored_passes_within_twice_the_eager_error():
    ref64, lowp = _case(1e-3)
    ours = ref64.float().clone()
    ours[10] += 1.9e-3  # < 2 * 1e-3 + 4 eps
    assert_anchored("out", ours, ref64, lowp)
    assert_anchored("exact", ref64.float(), ref64, ref64.float())  # no error at all


def test_assert_anchored_fails_past_the_bound_and_names_what_it_compared():
    ref64, lowp = _case(1e-3)
    ours = ref64.float().clone()
    ours[10] += 2.1e-3  # > 2 * 1e-3 + 4 eps(float32)
    with pytest.raises(AssertionError, match=r"dq: max error 0\.0021 > bound 0\.002"):
        assert_anchored("dq", ours, ref64, lowp)


def test_assert_anchored_allows_a_few_ulps_of_the_magnitude_and_no_more():
    ref64 = torch.full((8,), 1e-4, dtype=torch.float64)  # a small result: eager exact here
    eps = torch.finfo(torch.float32).eps
    ours = ref64.float().clone()
    ours[0] += 3 * eps * 100.0  # 3 ulps of terms of size 100 that cancelled
    with pytest.raises(AssertionError, match="dk: max error"):
        assert_anchored("dk", ours, ref64, ref64.float())  # floor max(1, |ref|) = 1: 4 eps is too small
    assert_anchored("dk", ours, ref64, ref64.float(), magnitude=100.0)
    ours[0] += 2 * eps * 100.0  # 5 ulps of the magnitude: past 4
    with pytest.raises(AssertionError):
        assert_anchored("dk", ours, ref64, ref64.float(), magnitude=100.0)


def test_assert_anchored_ulp_term_follows_the_dtype_of_ours():
    ref64 = torch.zeros(4, dtype=torch.float64)
    ours = torch.tensor([3e-3, 0, 0, 0], dtype=torch.float16)  # < 4 eps(float16) = 3.9e-3
    assert_anchored("fp16", ours, ref64, ref64.half())
    with pytest.raises(AssertionError, match="fp32"):
        assert_anchored("fp32", ours.float(), ref64, ref64.float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_assert_anchored_fails_on_non_finite_values(bad):
    ref64, lowp = _case(1e-3)
    ours = ref64.float().clone()
    ours[0] = bad
    with pytest.raises(AssertionError, match="lse"):
        assert_anchored("lse", ours, ref64, lowp)
    # Even where the reference has the same non-finite value.
    ref_bad = torch.tensor([bad, 1.0], dtype=torch.float64)
    with pytest.raises(AssertionError, match="lse"):
        assert_anchored("lse", torch.tensor([bad, 1.0]), ref_bad, torch.tensor([bad, 1.0]))


def test_assert_anchored_holds_under_python_dash_o():
    """A failing check raises AssertionError itself, not through an assert statement."""
    import inspect

    import tfkernels.testing

    source = inspect.getsource(tfkernels.testing.assert_anchored)
    assert "raise AssertionError" in source and "\n    assert " not in source


# ------------------------------------------------------------------------------ layouts
def _check_layout(seq_len, images, documents, *, padded: bool):
    assert len(images) == len(documents)
    for spans, lengths in zip(images, documents):
        assert all(length >= 1 for length in lengths) and sum(lengths) <= seq_len
        if not padded:
            assert sum(lengths) == seq_len
        assert spans == sorted(spans)
        assert all(s < e for s, e in spans) and all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))
    # from_spans checks the rest (spans inside one document) and raises otherwise.
    mask = tk.IntervalMask.from_spans(seq_len, images=images, documents=documents).validate()
    ids_mask = tk.IntervalMask.from_segment_ids(*segment_ids_from_layout(seq_len, images, documents))
    assert torch.equal(ids_mask.kv_start, mask.kv_start) and torch.equal(ids_mask.kv_end, mask.kv_end)


@pytest.mark.parametrize("seed", range(20))
def test_random_layouts_are_valid_and_seeded(seed):
    seq_len = 1 + seed * 13
    images, documents = random_layout(random.Random(seed), 3, seq_len, max_image_len=9)
    _check_layout(seq_len, images, documents, padded=True)
    assert (images, documents) == random_layout(random.Random(seed), 3, seq_len, max_image_len=9)
    row_images, row_documents = random_row_layout(random.Random(seed), seq_len, padding=False)
    _check_layout(seq_len, [row_images], [row_documents], padded=False)


@pytest.mark.parametrize("seed", range(10))
def test_random_hidden_layouts_split_the_random_layouts_spans(seed):
    """The same rows as random_layout with the same seed, each span either an image or hidden; valid."""
    seq_len = 1 + seed * 17
    images, documents, hidden = random_hidden_layout(random.Random(seed), 3, seq_len, max_image_len=9)
    all_images, all_documents = random_layout(random.Random(seed), 3, seq_len, max_image_len=9)
    assert documents == all_documents
    assert [sorted(i + h) for i, h in zip(images, hidden)] == all_images
    tk.IntervalMask.from_spans(seq_len, images=images, documents=documents, hidden=hidden).validate()
    none_hidden = random_hidden_layout(random.Random(seed), 3, seq_len, max_image_len=9, hidden_probability=0.0)
    assert none_hidden == (all_images, all_documents, [[], [], []])
    with pytest.raises(ValueError, match=r"hidden_probability: expected"):
        random_hidden_layout(random.Random(seed), 1, 8, hidden_probability=1.5)


def test_random_layouts_cover_the_edge_cases():
    """Over a few seeds: one-token images, images at document starts and ends, padded rows."""
    rng = random.Random(0)
    one_token = at_start = at_end = padded = 0
    for _ in range(50):
        images, documents = random_row_layout(rng, 64, max_image_len=8)
        starts = {sum(documents[:i]) for i in range(len(documents))}
        ends = {sum(documents[: i + 1]) for i in range(len(documents))}
        one_token += any(e - s == 1 for s, e in images)
        at_start += any(s in starts for s, _ in images)
        at_end += any(e in ends for _, e in images)
        padded += sum(documents) < 64
    assert min(one_token, at_start, at_end, padded) > 0


@pytest.mark.parametrize("seq_len, doc_len, fraction", [(2048, (512, 2048), 0.5), (4096, (300, 900), 0.3),
                                                         (1024, (1024, 1024), 0.0)])
def test_packed_transfusion_layout_composition(seq_len, doc_len, fraction):
    images, documents = packed_transfusion_layout(random.Random(5), 2, seq_len, doc_len=doc_len,
                                                  caption_len=(20, 200), image_len=128, image_fraction=fraction)
    _check_layout(seq_len, images, documents, padded=False)
    for spans, lengths in zip(images, documents):
        assert all(e - s == 128 for s, e in spans)
        assert all(doc_len[0] <= n <= max(doc_len[1], 2 * doc_len[0]) for n in lengths)
        bounds = {0} | {sum(lengths[: i + 1]) for i in range(len(lengths))}
        assert not any(s in bounds or e in bounds for s, e in spans), "documents start and end with text"
        share = 128 * len(spans) / seq_len
        assert share <= fraction + 128 / seq_len and (fraction == 0) == (share == 0)
    assert (images, documents) == packed_transfusion_layout(
        random.Random(5), 2, seq_len, doc_len=doc_len, caption_len=(20, 200), image_len=128, image_fraction=fraction)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(doc_len=(0, 10)), ValueError, r"doc_len: expected 1 <= low <= high"),
    (dict(caption_len=(30, 20)), ValueError, r"caption_len: expected 1 <= low <= high"),
    (dict(image_len=0), ValueError, r"image_len: expected an int >= 1, got 0"),
    (dict(image_len=2.5), TypeError, r"image_len: expected an int >= 1, got 2.5"),
    (dict(image_fraction=1.5), ValueError, r"image_fraction: expected a finite float in \[0, 1\], got 1.5"),
])
def test_packed_transfusion_layout_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        packed_transfusion_layout(random.Random(0), 1, 1024, **kwargs)
