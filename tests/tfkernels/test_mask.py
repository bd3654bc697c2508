"""tfkernels.mask: IntervalMask against brute-force per-(query, key) definitions of each mask, and
segment_ids_from_layout."""

import importlib
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tfkernels as tk
from tests.support import both_paths_fixture
from tfkernels.mask import DenseMaskReader, NotAnIntervalError, canonical_bounds, segment_ids_from_layout
from tfkernels.testing import assert_anchored, random_hidden_layout, random_layout

SETTINGS = settings(max_examples=60, deadline=None)


def brute_force_transfusion(seq_len, images, documents):
    """bool [B, S, S] from the definition: same document, and key <= query or both in one image."""
    batch = len(documents)
    dense = torch.zeros(batch, seq_len, seq_len, dtype=torch.bool)
    for row in range(batch):
        doc_of = [-1] * seq_len
        offset = 0
        for doc, length in enumerate(documents[row]):
            for p in range(offset, offset + length):
                doc_of[p] = doc
            offset += length
        image_of = [-1] * seq_len
        for i, (s, e) in enumerate(images[row]):
            for p in range(s, e):
                image_of[p] = i
        for q in range(seq_len):
            for k in range(seq_len):
                same_doc = doc_of[q] >= 0 and doc_of[q] == doc_of[k]
                same_image = image_of[q] >= 0 and image_of[q] == image_of[k]
                dense[row, q, k] = same_doc and (k <= q or same_image)
    return dense


def brute_force(kind, batch, seq_q, seq_k, param=None):
    """bool [B, Sq, Sk] for the standard masks, queries at positions i + Sk - Sq."""
    dense = torch.zeros(batch, seq_q, seq_k, dtype=torch.bool)
    for b in range(batch):
        for i in range(seq_q):
            p = i + seq_k - seq_q
            for k in range(seq_k):
                if kind == "causal":
                    ok = k <= p
                elif kind == "full":
                    ok = True
                elif kind == "prefix_lm":
                    prefix = param[b] if isinstance(param, list) else param
                    ok = p >= 0 and (k < prefix or k <= p)
                else:  # sliding window
                    ok = p - param < k <= p
                dense[b, i, k] = ok
    return dense


@st.composite
def layouts(draw, max_len=48, max_batch=3):
    seq_len = draw(st.integers(1, max_len))
    batch = draw(st.integers(1, max_batch))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    images, documents = random_layout(
        rng, batch, seq_len, max_image_len=draw(st.integers(1, 12)), padding=draw(st.booleans())
    )
    return seq_len, images, documents


@SETTINGS
@given(layouts())
def test_from_spans_matches_brute_force(layout):
    seq_len, images, documents = layout
    mask = tk.IntervalMask.from_spans(seq_len, images=images, documents=documents)
    assert mask.kv_start.dtype == torch.int32 and mask.kv_start.shape == (len(documents), seq_len)
    assert torch.equal(mask.to_dense(), brute_force_transfusion(seq_len, images, documents))
    mask.validate()


@SETTINGS
@given(layouts())
def test_from_segment_ids_reads_runs_not_values(layout):
    """Any id values work: documents are runs of one doc id (any negative one is padding), images runs of one
    non-zero image id, which may recur in other documents and elsewhere in the same one."""
    seq_len, images, documents = layout
    doc_ids, image_ids = segment_ids_from_layout(seq_len, images, documents)
    doc_ids = torch.where(doc_ids >= 0, 3 * doc_ids + 10, -7)
    image_ids = torch.where(image_ids > 0, 2 * (image_ids % 2) - 1, 0)  # images alternate ids 1 and -1
    mask = tk.IntervalMask.from_segment_ids(doc_ids, image_ids)
    assert mask.seq_len_k == seq_len
    assert torch.equal(mask.to_dense(), brute_force_transfusion(seq_len, images, documents))


def test_segment_ids_from_layout_values():
    doc_ids, image_ids = segment_ids_from_layout(8, [[(1, 3), (4, 5)], []], [[4, 2], [8]])
    assert doc_ids.dtype == image_ids.dtype == torch.int64
    assert doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, -1, -1], [0] * 8], "padding gets doc id -1"
    assert image_ids.tolist() == [[0, 1, 1, 0, 2, 0, 0, 0], [0] * 8], "image i gets id i + 1"


@SETTINGS
@given(layouts())
def test_key_intervals_are_the_dense_columns(layout):
    seq_len, images, documents = layout
    mask = tk.IntervalMask.from_spans(seq_len, images=images, documents=documents)
    q_start, q_end = mask.key_intervals()
    assert q_start.dtype == torch.int32 and q_start.shape == (len(documents), seq_len)
    queries = torch.arange(seq_len)
    from_intervals = (queries[None, :, None] >= q_start[:, None, :]) & (queries[None, :, None] < q_end[:, None, :])
    assert torch.equal(from_intervals, mask.to_dense())
    assert (q_start <= q_end).all()
    assert (q_start[:, 1:] >= q_start[:, :-1]).all() and (q_end[:, 1:] >= q_end[:, :-1]).all()


@SETTINGS
@given(layouts())
def test_visible_pairs_counts_the_dense_mask(layout):
    seq_len, images, documents = layout
    mask = tk.IntervalMask.from_spans(seq_len, images=images, documents=documents)
    assert mask.visible_pairs() == int(brute_force_transfusion(seq_len, images, documents).sum())


@SETTINGS
@given(st.integers(1, 3), st.integers(0, 40), st.integers(0, 40))
def test_causal_and_full_rectangular(batch, seq_q, seq_k):
    causal = tk.IntervalMask.causal(batch, seq_q, seq_k)
    assert torch.equal(causal.to_dense(), brute_force("causal", batch, seq_q, seq_k))
    causal.validate()
    full = tk.IntervalMask.full(batch, seq_q, seq_k)
    assert torch.equal(full.to_dense(), brute_force("full", batch, seq_q, seq_k))
    full.validate()


@SETTINGS
@given(st.integers(1, 40), st.integers(0, 8), st.data())
def test_prefix_lm_and_sliding_window(seq_k, extra_q, data):
    seq_q = data.draw(st.integers(0, seq_k + extra_q))  # Sq > Sk: rows before key 0 see nothing
    prefix = data.draw(st.lists(st.integers(0, seq_k), min_size=2, max_size=2))
    mask = tk.IntervalMask.prefix_lm(prefix, 2, seq_q, seq_k)
    assert torch.equal(mask.to_dense(), brute_force("prefix_lm", 2, seq_q, seq_k, prefix))
    mask.validate()
    scalar = tk.IntervalMask.prefix_lm(prefix[0], 2, seq_q, seq_k)
    assert torch.equal(scalar.to_dense(), brute_force("prefix_lm", 2, seq_q, seq_k, prefix[0]))
    window = data.draw(st.integers(1, seq_k + extra_q + 1))
    sliding = tk.IntervalMask.sliding_window(window, 2, seq_q, seq_k)
    assert torch.equal(sliding.to_dense(), brute_force("window", 2, seq_q, seq_k, window))
    sliding.validate()


@SETTINGS
@given(layouts(), st.data())
def test_slice_queries_is_a_kv_cache_step(layout, data):
    seq_len, images, documents = layout
    mask = tk.IntervalMask.from_spans(seq_len, images=images, documents=documents)
    # A step may end anywhere except strictly inside an image (its keys would be cut off).
    inside_image = {p for spans in images for (s, e) in spans for p in range(s + 1, e)}
    end = data.draw(st.sampled_from([e for e in range(seq_len + 1) if e not in inside_image]))
    start = data.draw(st.integers(0, end))
    step = mask.slice_queries(start, end)
    assert step.seq_len_q == end - start and step.seq_len_k == end
    assert torch.equal(step.to_dense(), mask.to_dense()[:, start:end, :end])


def test_slice_queries_of_causal_matches_rectangular_causal():
    full_sequence = tk.IntervalMask.causal(2, 50)
    step = full_sequence.slice_queries(43, 50)
    rectangular = tk.IntervalMask.causal(2, 7, 50)
    assert torch.equal(step.kv_start, rectangular.kv_start) and torch.equal(step.kv_end, rectangular.kv_end)


def test_slice_queries_mid_image_is_rejected():
    mask = tk.IntervalMask.from_spans(20, images=[[(4, 12)]])
    with pytest.raises(ValueError, match=r"mask.kv_end: batch row 0, query 2: expected kv_end <= seq_len_k=10"):
        mask.slice_queries(2, 10)


def test_from_segment_ids_compiles_without_host_sync():
    """fullgraph=True fails on any .item()/host sync or Python loop over tensor values."""
    rng = random.Random(0)
    images, documents = random_layout(rng, 2, 64)
    doc_ids, image_ids = segment_ids_from_layout(64, images, documents)

    def bounds(d, i):
        mask = tk.IntervalMask.from_segment_ids(d, i)
        return mask.kv_start, mask.kv_end

    compiled = torch.compile(bounds, fullgraph=True, backend="eager")
    start, end = compiled(doc_ids, image_ids)
    expected = tk.IntervalMask.from_spans(64, images=images, documents=documents)
    assert torch.equal(start, expected.kv_start) and torch.equal(end, expected.kv_end)


def test_padding_rows_see_nothing_and_are_seen_by_nothing():
    mask = tk.IntervalMask.from_spans(10, images=[[(2, 5)]], documents=[[6]])
    dense = mask.to_dense()
    assert not dense[0, 6:].any() and not dense[0, :, 6:].any()
    assert mask.kv_start[0, 6:].tolist() == mask.kv_end[0, 6:].tolist() == [6, 7, 8, 9]


# ------------------------------------------------------------------------------ validation errors
def _mask(start, end, seq_len_k):
    return tk.IntervalMask(torch.tensor([start], dtype=torch.int32), torch.tensor([end], dtype=torch.int32), seq_len_k)


@pytest.mark.parametrize(
    "mask, error, message",
    [
        (_mask([0, -1, 0], [1, 2, 3], 3), ValueError, r"mask.kv_start: batch row 0, query 1: expected kv_start >= 0, got \[-1, 2\)"),
        (_mask([0, 0, 0], [1, 2, 4], 3), ValueError, r"mask.kv_end: batch row 0, query 2: expected kv_end <= seq_len_k=3, got \[0, 4\)"),
        (_mask([0, 2, 2], [1, 1, 3], 3), ValueError, r"mask.kv_end: batch row 0, query 1: expected kv_start <= kv_end, got \[2, 1\)"),
        (_mask([0, 1, 0], [1, 2, 3], 3), ValueError,
         r"mask.kv_start: batch row 0, query 2: expected kv_start non-decreasing along queries, got \[0, 3\) after \[1, 2\)"),
        (_mask([0, 0, 0], [2, 1, 3], 3), ValueError,
         r"mask.kv_end: batch row 0, query 1: expected kv_end non-decreasing along queries, got \[0, 1\) after \[0, 2\)"),
        # A wrong dtype or Python type is a TypeError (it was a ValueError before the one rule).
        (tk.IntervalMask(torch.zeros(1, 3, dtype=torch.int64), torch.ones(1, 3, dtype=torch.int32), 3), TypeError,
         r"mask.kv_start: expected dtype torch.int32, got torch.int64"),
        (tk.IntervalMask(torch.zeros(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32), 3), ValueError,
         r"mask.kv_start: expected shape \[B, Sq\], got \(3,\)"),
        (tk.IntervalMask(torch.zeros(1, 3, dtype=torch.int32), torch.ones(1, 4, dtype=torch.int32), 3), ValueError,
         r"mask: kv_start \(1, 3\) and kv_end \(1, 4\) differ in shape"),
        (tk.IntervalMask(torch.zeros(1, 3, dtype=torch.int32), torch.ones(1, 3, dtype=torch.int32), -1), ValueError,
         r"mask.seq_len_k: expected an int in \[0, 2147483647\], got -1"),
        (tk.IntervalMask(torch.zeros(1, 3, dtype=torch.int32), torch.ones(1, 3, dtype=torch.int32), 3.0), TypeError,
         r"mask.seq_len_k: expected an int in \[0, 2147483647\], got 3.0"),
        (tk.IntervalMask([0, 0], torch.ones(1, 3, dtype=torch.int32), 3), TypeError,
         r"mask.kv_start: expected an int32 tensor \[B, Sq\], got list"),
    ],
)
def test_validation_errors(mask, error, message):
    with pytest.raises(error, match=message):
        mask.validate()


def test_validation_names_the_second_batch_row():
    start = torch.zeros(2, 4, dtype=torch.int32)
    end = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 4]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"batch row 1, query 2: expected kv_end <= seq_len_k=4"):
        tk.IntervalMask(start, end, 4).validate()


def test_validation_against_the_inputs():
    mask = tk.IntervalMask.causal(2, 8)
    with pytest.raises(ValueError, match=r"mask.batch_size: is 2 but the inputs need 3"):
        mask.validate(batch_size=3)
    with pytest.raises(ValueError, match=r"mask.seq_len_q: is 8 but the inputs need 9"):
        mask.validate(seq_len_q=9)
    with pytest.raises(ValueError, match=r"mask.seq_len_k: is 8 but the inputs need 16"):
        mask.validate(seq_len_k=16)
    with pytest.raises(ValueError, match=r"mask: tensors are on cpu but the inputs are on meta"):
        mask.validate(device="meta")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: tk.IntervalMask.from_spans(10), ValueError, r"^images, documents: expected one or both"),
        (lambda: tk.IntervalMask.from_spans(10, images=[[(3, 2)]]), ValueError,
         r"images\[0\]\[0\]: expected 0 <= start < end <= seq_len=10, got \(3, 2\)"),
        (lambda: tk.IntervalMask.from_spans(10, images=[[(3, 4.0)]]), TypeError,
         r"images\[0\]\[0\]: expected 0 <= start < end <= seq_len=10, got \(3, 4.0\)"),
        (lambda: tk.IntervalMask.from_spans(10, images=[[(2, 5), (4, 6)]]), ValueError,
         r"images\[0\]\[1\]: span \(4, 6\) overlaps or precedes the previous span"),
        (lambda: tk.IntervalMask.from_spans(10, images=[[(2, 6)]], documents=[[4, 6]]), ValueError,
         r"images\[0\]\[0\]: span \(2, 6\) is not inside one document"),
        (lambda: tk.IntervalMask.from_spans(10, images=[[(8, 10)]], documents=[[8]]), ValueError,
         r"images\[0\]\[0\]: span \(8, 10\) is not inside one document"),
        (lambda: tk.IntervalMask.from_spans(10, documents=[[6, 6]]), ValueError,
         r"documents\[0\]: lengths sum to 12, more than seq_len=10"),
        (lambda: tk.IntervalMask.from_spans(10, documents=[[6, -1]]), ValueError,
         r"^documents\[0\]: expected a list of non-negative int lengths \(one list per batch row\), got \[6, -1\]$"),
        (lambda: tk.IntervalMask.from_spans(10, documents=[[6, True]]), TypeError,
         r"^documents\[0\]: expected a list of non-negative int lengths \(one list per batch row\), got \[6, True\]$"),
        (lambda: tk.IntervalMask.from_spans(10, images=[[], []], documents=[[10]]), ValueError,
         r"^images: expected one list of \(start, end\) spans per batch row, as many rows as documents \(1\), got 2$"),
        (lambda: tk.IntervalMask.from_segment_ids(torch.zeros(4, dtype=torch.long)), ValueError,
         r"doc_ids: expected an int tensor \[B, S\]"),
        (lambda: tk.IntervalMask.from_segment_ids([[0, 0]]), TypeError,
         r"doc_ids: expected an int tensor \[B, S\], got list"),
        # A wrong dtype or Python type is a TypeError (it was a ValueError before the one rule).
        (lambda: tk.IntervalMask.from_segment_ids(torch.zeros(1, 4), None), TypeError,
         r"doc_ids: expected an integer dtype, got torch.float32"),
        (lambda: tk.IntervalMask.from_segment_ids(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)),
         ValueError, r"image_ids: expected a tensor of doc_ids' shape \(1, 4\)"),
        (lambda: tk.IntervalMask.from_segment_ids(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.bool)),
         TypeError, r"image_ids: expected an integer dtype, got torch.bool"),
        (lambda: tk.IntervalMask.causal(2, -1), ValueError, r"seq_len_q: expected an int in \[0, 2147483647\], got -1"),
        (lambda: tk.IntervalMask.causal(2, 8.0), TypeError, r"seq_len_q: expected an int in \[0, 2147483647\], got 8.0"),
        (lambda: tk.IntervalMask.full(True, 8), TypeError, r"batch_size: expected an int in \[0, 2147483647\], got True"),
        (lambda: tk.IntervalMask.sliding_window(0, 1, 4), ValueError, r"window: expected an int >= 1, got 0"),
        (lambda: tk.IntervalMask.prefix_lm([1, 2, 3], 2, 4), ValueError, r"prefix_len: expected 2 values \(one per row\), got 3"),
        (lambda: tk.IntervalMask.prefix_lm(9, 1, 4), ValueError, r"prefix_len: expected values in \[0, seq_len_k=4\]"),
        (lambda: tk.IntervalMask.prefix_lm(1.5, 1, 4), TypeError, r"prefix_len: expected an int or a \[batch_size\] int list"),
        (lambda: tk.IntervalMask.causal(1, 8).slice_queries(5, 3), ValueError, r"slice_queries: expected 0 <= start <= end"),
        (lambda: tk.IntervalMask.prefix_lm(2**70, 1, 4), ValueError, r"prefix_len: expected values in \[0, seq_len_k=4\]"),
        (lambda: tk.IntervalMask.prefix_lm([2**70], 1, 4), ValueError, r"prefix_len: expected values in \[0, seq_len_k=4\]"),
        (lambda: tk.IntervalMask.prefix_lm(None, 1, 4), TypeError, r"prefix_len: expected an int or a \[batch_size\] int list"),
        (lambda: tk.IntervalMask.prefix_lm("3", 1, 4), TypeError, r"prefix_len: expected an int or a \[batch_size\] int list"),
    ],
)
def test_constructor_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "layout, error, message",
    [
        # One level of nesting missing: a row given where the list of rows is due.
        ({"documents": [5]}, TypeError,
         r"^documents\[0\]: expected a list of non-negative int lengths \(one list per batch row\), got 5$"),
        ({"images": [(0, 2)]}, TypeError,
         r"^images\[0\]\[0\]: expected a \(start, end\) pair \(images holds, per batch row, a list of \(start, end\) "
         r"spans\), got 0$"),
        ({"images": [[3]]}, TypeError, r"^images\[0\]\[0\]: expected a \(start, end\) pair .*, got 3$"),
        ({"images": [[(1, 2, 3)]]}, ValueError, r"^images\[0\]\[0\]: expected a \(start, end\) pair .*, got \(1, 2, 3\)$"),
        ({"images": [[(1, 3)], 4]}, TypeError,
         r"^images\[1\]: expected a list of \(start, end\) spans \(one list per batch row\), got 4$"),
        ({"images": 5}, TypeError, r"^images: expected one list of \(start, end\) spans per batch row, got int$"),
        ({"documents": "8"}, TypeError, r"^documents: expected one list of non-negative int lengths per batch row"),
        ({"documents": torch.tensor([[8]])}, TypeError,
         r"^documents: expected one list of non-negative int lengths per batch row, got tensor \(1, 1\)"),
    ],
)
def test_from_spans_names_the_argument_and_its_nesting(layout, error, message):
    with pytest.raises(error, match=message):
        tk.IntervalMask.from_spans(8, **layout)
    with pytest.raises(error, match=message):
        segment_ids_from_layout(8, **layout)


EMPTY_BATCH = {
    "window": lambda: tk.IntervalMask.window((2, 1), 0, 5, 7),
    "causal": lambda: tk.IntervalMask.causal(0, 5, 7),
    "full": lambda: tk.IntervalMask.full(0, 5, 7),
    "sliding_window": lambda: tk.IntervalMask.sliding_window(2, 0, 5, 7),
    "prefix_lm, a list": lambda: tk.IntervalMask.prefix_lm([], 0, 5, 7),
    "prefix_lm, a tensor": lambda: tk.IntervalMask.prefix_lm(torch.zeros(0, dtype=torch.long), 0, 5, 7),
    "prefix_lm, an int": lambda: tk.IntervalMask.prefix_lm(3, 0, 5, 7),
    "from_spans, documents": lambda: tk.IntervalMask.from_spans(5, documents=[]),
    "from_spans, images": lambda: tk.IntervalMask.from_spans(5, images=[], documents=[]),
    "from_segment_ids": lambda: tk.IntervalMask.from_segment_ids(torch.zeros(0, 5, dtype=torch.long)),
    "from_cache_seqlens": lambda: tk.IntervalMask.from_cache_seqlens([], 5, 7),
    "from_key_lengths": lambda: tk.IntervalMask.from_key_lengths(torch.zeros(0, dtype=torch.long), 5, 7),
    "block_diagonal": lambda: tk.IntervalMask.block_diagonal([], 5),
    "from_position_ids": lambda: tk.IntervalMask.from_position_ids(torch.zeros(0, 5, dtype=torch.long)),
    "from_dense": lambda: tk.IntervalMask.from_dense(torch.zeros(0, 5, 7, dtype=torch.bool)),
}


@pytest.mark.parametrize("call", EMPTY_BATCH.values(), ids=EMPTY_BATCH.keys())
def test_every_batched_constructor_takes_an_empty_batch(call):
    """A batch of no rows is a mask of no rows (``[0, Sq]`` bounds), as an empty batch of tensors is."""
    mask = call().validate()
    assert mask.kv_start.shape == mask.kv_end.shape == (0, 5)
    assert mask.kv_start.dtype == mask.kv_end.dtype == torch.int32
    assert mask.seq_len_k in (5, 7) and mask.to_dense().shape == (0, 5, mask.seq_len_k)
    assert mask.visible_pairs() == 0


# ------------------------------------------------------------------------------ int32 sizes
TOO_BIG = [2**31, 2**32 + 6, 2**63, 2**70]


@pytest.mark.parametrize("size", TOO_BIG)
@pytest.mark.parametrize(
    "name, call",
    [
        ("seq_len_k", lambda n: tk.IntervalMask.causal(1, 4, n)),
        ("seq_len_q", lambda n: tk.IntervalMask.causal(1, n, 4)),
        ("batch_size", lambda n: tk.IntervalMask.causal(n, 4)),
        ("seq_len_k", lambda n: tk.IntervalMask.full(1, 3, n)),
        ("seq_len_q", lambda n: tk.IntervalMask.full(1, n)),
        ("seq_len_k", lambda n: tk.IntervalMask.prefix_lm(0, 1, 3, n)),
        ("seq_len_q", lambda n: tk.IntervalMask.prefix_lm(0, 1, n, 4)),
        ("seq_len_k", lambda n: tk.IntervalMask.sliding_window(2, 1, 3, n)),
        ("batch_size", lambda n: tk.IntervalMask.sliding_window(2, n, 3)),
        ("seq_len", lambda n: tk.IntervalMask.from_spans(n, documents=[[1]])),
        ("mask.seq_len_k", lambda n: tk.IntervalMask(torch.zeros(1, 2, dtype=torch.int32),
                                                     torch.ones(1, 2, dtype=torch.int32), n).validate()),
    ],
)
def test_sizes_past_int32_are_rejected_by_name(name, call, size):
    """Positions are int32: unchecked, causal(1, 4, 2**32 + 6) would wrap and full(1, 3, 2**31) would build a
    mask its own validate() rejects. Every constructor names the size that does not fit."""
    with pytest.raises(ValueError, match=rf"^{name}: expected an int in \[0, 2147483647\], got {size}$"):
        call(size)


def test_from_segment_ids_rejects_rows_past_int32():
    doc_ids = torch.zeros(1, 2**31, dtype=torch.long, device="meta")  # shapes only, nothing allocated
    with pytest.raises(ValueError, match=r"^doc_ids: expected at most 2\*\*31 - 1 tokens per row"):
        tk.IntervalMask.from_segment_ids(doc_ids)


def test_largest_int32_sizes_are_accepted_and_huge_windows_are_causal():
    big = 2**31 - 1
    mask = tk.IntervalMask.causal(1, 2, big).validate()
    assert mask.kv_end.tolist() == [[big - 1, big]] and mask.seq_len_k == big
    assert tk.IntervalMask.full(1, 1, big).validate().kv_end.tolist() == [[big]]
    for window in (big, 2**31, 2**70):  # wider than the keys: the causal mask, no overflow
        wide = tk.IntervalMask.sliding_window(window, 2, 5, 7)
        causal = tk.IntervalMask.causal(2, 5, 7)
        assert torch.equal(wide.kv_start, causal.kv_start) and torch.equal(wide.kv_end, causal.kv_end)


# ------------------------------------------------------------------------------ validation policy
def test_validation_names_the_first_bad_query_in_row_major_order():
    """Several violations: the first (batch row, query) is named, whichever check it fails."""
    start = torch.tensor([[0, 0, 0, 0], [0, 0, 0, -1]], dtype=torch.int32)
    end = torch.tensor([[1, 2, 3, 5], [1, 1, 3, 4]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"mask.kv_end: batch row 0, query 3: expected kv_end <= seq_len_k=4"):
        tk.IntervalMask(start, end, 4).validate()
    end[0, 3] = 4
    start[0, 2:] = 4  # row 0 now fails first at query 2 (start past end); row 1 still fails at query 1
    with pytest.raises(ValueError, match=r"mask.kv_end: batch row 0, query 2: expected kv_start <= kv_end, got \[4, 3\)"):
        tk.IntervalMask(start, end, 4).validate()


def _count_value_checks(monkeypatch):
    calls = []
    original = tk.IntervalMask._check_values

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(tk.IntervalMask, "_check_values", counting)
    return calls


def test_values_are_checked_once_until_the_tensors_change(monkeypatch):
    calls = _count_value_checks(monkeypatch)
    mask = tk.IntervalMask.causal(1, 4)
    mask.validate()
    mask.validate()
    assert len(calls) == 1, "an unchanged mask is checked once (one host sync per mask, not per layer)"
    mask.kv_end[0, 0] = 1  # an in-place edit that keeps the mask valid: re-checked, passes
    mask.validate()
    assert len(calls) == 2
    mask.validate()
    assert len(calls) == 2


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.kv_end.__setitem__((0, 0), 9), r"mask.kv_end: batch row 0, query 0: expected kv_end <= seq_len_k=4"),
        (lambda m: m.kv_start[0].fill_(-1), r"mask.kv_start: batch row 0, query 0: expected kv_start >= 0"),  # via a view
        (lambda m: m.kv_start.copy_(torch.tensor([[0, 2, 1, 3]])), r"query 2: expected kv_start non-decreasing"),
        (lambda m: m.kv_end.add_(2**31 - 5), r"query 0: expected kv_end <= seq_len_k=4"),
        (lambda m: setattr(m, "kv_end", torch.full((1, 4), 5, dtype=torch.int32)), r"query 0: expected kv_end <= seq_len_k"),
        (lambda m: setattr(m, "kv_start", m.kv_end.clone()), None),  # swapped for a valid tensor: checked, passes
        (lambda m: (setattr(m, "kv_start", m.kv_end), setattr(m, "kv_end", m.kv_start.clone().sub_(1))),
         r"expected kv_start <= kv_end"),  # swapped start and end
        (lambda m: setattr(m, "seq_len_k", 3), r"query 3: expected kv_end <= seq_len_k=3"),
    ],
)
def test_values_are_rechecked_after_in_place_edits_and_swaps(edit, message):
    """A mask edited in place (its version counter moves) or given other tensors after its
    first check is checked again; the error names the first bad row."""
    mask = tk.IntervalMask.causal(1, 4)
    mask.validate()
    edit(mask)
    if message is None:
        mask.validate()
    else:
        with pytest.raises(ValueError, match=message):
            mask.validate()
        with pytest.raises(ValueError, match=message):  # and on every later call until fixed
            mask.validate()


def _is_valid(start, end, seq_len_k):
    return (bool((start >= 0).all() and (end <= seq_len_k).all() and (start <= end).all())
            and bool((start[:, 1:] >= start[:, :-1]).all() and (end[:, 1:] >= end[:, :-1]).all()))


@SETTINGS
@given(layouts())
def test_canonical_bounds_is_the_identity_on_valid_masks(layout):
    seq_len, images, documents = layout
    mask = tk.IntervalMask.from_spans(seq_len, images=images, documents=documents)
    start, end = canonical_bounds(mask.kv_start, mask.kv_end, seq_len)
    assert torch.equal(start, mask.kv_start) and torch.equal(end, mask.kv_end)
    for other in (tk.IntervalMask.causal(2, 5, 9), tk.IntervalMask.causal(2, 9, 5), tk.IntervalMask.full(1, 3, 0),
                  tk.IntervalMask.prefix_lm([2, 7], 2, 6, 8), tk.IntervalMask.sliding_window(3, 1, 7, 5)):
        start, end = canonical_bounds(other.kv_start, other.kv_end, other.seq_len_k)
        assert torch.equal(start, other.kv_start) and torch.equal(end, other.kv_end)


INT32_EDGES = [-(2**31), -(2**31) + 1, -1, 0, 1, 2**31 - 2, 2**31 - 1]


@SETTINGS
@given(st.integers(1, 3), st.integers(0, 12), st.integers(0, 12), st.data())
def test_canonical_bounds_turns_any_values_into_a_valid_mask(batch, seq_q, seq_k, data):
    values = st.one_of(st.integers(-3, seq_k + 3), st.sampled_from(INT32_EDGES))
    start = torch.tensor(data.draw(st.lists(st.lists(values, min_size=seq_q, max_size=seq_q), min_size=batch,
                                            max_size=batch)), dtype=torch.int32).reshape(batch, seq_q)
    end = torch.tensor(data.draw(st.lists(st.lists(values, min_size=seq_q, max_size=seq_q), min_size=batch,
                                          max_size=batch)), dtype=torch.int32).reshape(batch, seq_q)
    new_start, new_end = canonical_bounds(start, end, seq_k)
    assert new_start.dtype == new_end.dtype == torch.int32 and new_start.shape == start.shape
    assert _is_valid(new_start, new_end, seq_k)
    tk.IntervalMask(new_start, new_end, seq_k).validate()
    # The rule, row by row: running maxima clamped into [0, Sk]; a start past its end empties the row.
    for b in range(batch):
        run_s = run_e = -(2**40)
        for i in range(seq_q):
            run_s, run_e = max(run_s, int(start[b, i])), max(run_e, int(end[b, i]))
            s_i = min(max(run_s, 0), seq_k)
            assert int(new_start[b, i]) == s_i and int(new_end[b, i]) == max(min(max(run_e, 0), seq_k), s_i)


def test_compiled_ops_use_the_canonical_bounds_and_can_assert(monkeypatch):
    """Under torch.compile values cannot be read back: ops compute with the canonical bounds; with
    TFKERNELS_MASK_ASSERT=1 (read at trace time) an invalid mask fails a device-side assertion."""
    start = torch.tensor([[0, 3, 1, 2**31 - 1]], dtype=torch.int32)
    end = torch.tensor([[-5, 4, 2, 2**31 - 1]], dtype=torch.int32)

    def bounds(kv_start, kv_end):
        mask = tk.IntervalMask(kv_start, kv_end, 6).validate(seq_len_k=6)
        return mask._op_bounds()

    compiled = torch.compile(bounds, fullgraph=True, backend="aot_eager")
    got = compiled(start, end)
    assert [t.tolist() for t in got] == [[[0, 3, 3, 6]], [[0, 4, 4, 6]]]
    assert [t.tolist() for t in got] == [t.tolist() for t in canonical_bounds(start, end, 6)]
    with pytest.raises(ValueError, match="batch row 0, query 0: expected kv_start <= kv_end"):
        bounds(start, end)  # eager: the same mask is rejected by name
    valid = tk.IntervalMask.causal(1, 4, 6)
    monkeypatch.setenv("TFKERNELS_MASK_ASSERT", "1")
    torch._dynamo.reset()
    asserting = torch.compile(bounds, fullgraph=True, backend="aot_eager")
    assert [t.tolist() for t in asserting(valid.kv_start, valid.kv_end)] == [valid.kv_start.tolist(),
                                                                          valid.kv_end.tolist()]
    with pytest.raises(RuntimeError, match="TFKERNELS_MASK_ASSERT"):
        asserting(start, end)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ interop
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # uncompiled on purpose
def test_flex_block_mask_matches_reference_attention():
    from torch.nn.attention.flex_attention import flex_attention

    rng = random.Random(1)
    seq_len = 96
    images, documents = random_layout(rng, 2, seq_len, max_image_len=20)
    mask = tk.IntervalMask.from_spans(seq_len, images=images, documents=documents)
    block_mask = mask.to_flex_block_mask(block_size=32)
    torch.manual_seed(0)
    q = torch.randn(2, seq_len, 4, 16, dtype=torch.float64)
    k = torch.randn(2, seq_len, 2, 16, dtype=torch.float64)
    v = torch.randn(2, seq_len, 2, 16, dtype=torch.float64)
    expected, _ = tk.reference.attention(q, k, v, mask)
    out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                         block_mask=block_mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # The block structure itself: a block is listed iff the dense mask has a pair in it.
    dense = mask.to_dense()
    blocks = dense.reshape(2, 3, 32, 3, 32).any(dim=(2, 4))
    listed = block_mask.to_dense().bool()[:, 0, :3, :3]
    assert torch.equal(listed, blocks)


# ------------------------------------------------------------------------------ constructors from other libraries
# (the masks FlashAttention, Hugging Face and SDPA users hold; PixArt-alpha's cross-attention and
# multi-aspect packed images). Each against a per-(query, key) definition written out in Python loops.
def in_window(key, pos, left, right, causal):
    """FlashAttention's window rule: key within [pos - left, pos + right] (-1 unbounded; causal sets right = 0)."""
    right = 0 if causal else right
    return (left < 0 or key >= pos - left) and (right < 0 or key <= pos + right)


window_sizes = st.tuples(st.integers(-1, 6), st.integers(-1, 6))


def assert_mask(mask, dense, seq_len_k):
    assert mask.kv_start.dtype == mask.kv_end.dtype == torch.int32
    assert mask.kv_start.is_contiguous() and mask.kv_end.is_contiguous()
    assert mask.seq_len_k == seq_len_k
    assert torch.equal(mask.to_dense(), dense)
    mask.validate()


@SETTINGS
@given(st.integers(1, 3), st.integers(0, 24), st.integers(0, 24), window_sizes, st.booleans())
def test_window_matches_brute_force(batch, seq_q, seq_k, window_size, causal):
    mask = tk.IntervalMask.window(window_size, batch, seq_q, seq_k, causal=causal)
    dense = torch.zeros(batch, seq_q, seq_k, dtype=torch.bool)
    for i in range(seq_q):
        for k in range(seq_k):
            dense[:, i, k] = in_window(k, i + seq_k - seq_q, *window_size, causal)
    assert_mask(mask, dense, seq_k)


def test_window_special_cases_are_the_existing_masks():
    for seq_q, seq_k in ((7, 7), (3, 9), (9, 4)):
        for window_mask, other in (
            (tk.IntervalMask.window((-1, -1), 2, seq_q, seq_k), tk.IntervalMask.full(2, seq_q, seq_k)),
            (tk.IntervalMask.window((-1, 5), 2, seq_q, seq_k, causal=True), tk.IntervalMask.causal(2, seq_q, seq_k)),
            (tk.IntervalMask.window((2, 0), 2, seq_q, seq_k), tk.IntervalMask.sliding_window(3, 2, seq_q, seq_k)),
            (tk.IntervalMask.window((2**70, -1), 2, seq_q, seq_k), tk.IntervalMask.full(2, seq_q, seq_k)),
        ):
            assert torch.equal(window_mask.kv_start, other.kv_start) and torch.equal(window_mask.kv_end, other.kv_end)


@st.composite
def varlen_layouts(draw):
    """Documents with their own query and key lengths (0 included), and optional padding after them."""
    lengths = draw(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=0, max_size=5))
    cu_q = [0]
    cu_k = [0]
    for len_q, len_k in lengths:
        cu_q.append(cu_q[-1] + len_q)
        cu_k.append(cu_k[-1] + len_k)
    pad_q, pad_k = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    return cu_q, cu_k, pad_q, pad_k


@SETTINGS
@given(varlen_layouts(), window_sizes, st.booleans(), st.sampled_from([torch.int32, torch.int64, list]))
def test_from_cu_seqlens_matches_brute_force(layout, window_size, causal, kind):
    cu_q, cu_k, pad_q, pad_k = layout
    seq_q, seq_k = cu_q[-1] + pad_q, cu_k[-1] + pad_k
    dense = torch.zeros(1, seq_q, seq_k, dtype=torch.bool)
    for d in range(len(cu_q) - 1):
        len_q, len_k = cu_q[d + 1] - cu_q[d], cu_k[d + 1] - cu_k[d]
        for j in range(len_q):
            for kk in range(len_k):  # local key kk; local query j sits at key j + len_k - len_q
                dense[0, cu_q[d] + j, cu_k[d] + kk] = in_window(kk, j + len_k - len_q, *window_size, causal)
    convert = (lambda x: x) if kind is list else (lambda x: torch.tensor(x, dtype=kind))
    mask = tk.IntervalMask.from_cu_seqlens(convert(cu_q), convert(cu_k), causal=causal, window_size=window_size,
                                           seq_len_q=seq_q, seq_len_k=seq_k)
    assert mask.batch_size == 1 and mask.seq_len_q == seq_q
    assert_mask(mask, dense, seq_k)
    if pad_q == pad_k == 0:  # the lengths default to the last offsets
        default = tk.IntervalMask.from_cu_seqlens(convert(cu_q), convert(cu_k), causal=causal, window_size=window_size)
        assert_mask(default, dense, seq_k)


def test_from_cu_seqlens_self_attention_is_the_packed_document_mask():
    cu = torch.tensor([0, 5, 5, 12, 20], dtype=torch.int32)
    mask = tk.IntervalMask.from_cu_seqlens(cu, causal=True, seq_len_q=24)
    expected = tk.IntervalMask.from_spans(24, documents=[[5, 0, 7, 8]])
    assert mask.seq_len_k == 20 and torch.equal(mask.to_dense(), expected.to_dense()[:, :, :20])


def test_from_cu_seqlens_without_documents_has_two_separate_bound_tensors():
    """Every row is padding; kv_start and kv_end are two tensors, so writing one in place (as masks are
    edited, e.g. by a cached decoding loop) leaves the other as it was."""
    mask = tk.IntervalMask.from_cu_seqlens([0], seq_len_q=3, seq_len_k=4)
    assert mask.kv_start.tolist() == mask.kv_end.tolist() == [[0, 0, 0]]
    mask.kv_end.fill_(4)
    assert mask.kv_start.tolist() == [[0, 0, 0]]


@SETTINGS
@given(st.integers(1, 4), st.integers(0, 10), st.integers(0, 12), window_sizes, st.booleans(), st.data())
def test_from_cache_seqlens_matches_brute_force(batch, seq_q, seq_k, window_size, causal, data):
    lengths = data.draw(st.lists(st.integers(0, seq_k), min_size=batch, max_size=batch))
    dense = torch.zeros(batch, seq_q, seq_k, dtype=torch.bool)
    for b, length in enumerate(lengths):
        for i in range(seq_q):
            for k in range(length):
                dense[b, i, k] = in_window(k, i + length - seq_q, *window_size, causal)
    for given_lengths in (lengths, torch.tensor(lengths, dtype=torch.int32)):
        mask = tk.IntervalMask.from_cache_seqlens(given_lengths, seq_q, seq_k, causal=causal, window_size=window_size)
        assert_mask(mask, dense, seq_k)


def test_from_cache_seqlens_full_caches_are_the_rectangular_masks():
    causal = tk.IntervalMask.from_cache_seqlens([9, 9], 3, 9, causal=True)
    expected = tk.IntervalMask.causal(2, 3, 9)
    assert torch.equal(causal.kv_start, expected.kv_start) and torch.equal(causal.kv_end, expected.kv_end)


@SETTINGS
@given(st.integers(1, 4), st.integers(0, 10), st.integers(0, 12), st.data())
def test_from_key_lengths_matches_brute_force(batch, seq_q, seq_k, data):
    lengths = data.draw(st.lists(st.integers(0, seq_k), min_size=batch, max_size=batch))
    dense = torch.zeros(batch, seq_q, seq_k, dtype=torch.bool)
    for b, length in enumerate(lengths):
        dense[b, :, :length] = True
    assert_mask(tk.IntervalMask.from_key_lengths(torch.tensor(lengths), seq_q, seq_k), dense, seq_k)


@SETTINGS
@given(st.integers(1, 30), st.data())
def test_block_diagonal_matches_brute_force(seq_len, data):
    batch = data.draw(st.integers(1, 3))
    lengths = []
    for _ in range(batch):
        row, room = [], seq_len
        for _ in range(data.draw(st.integers(0, 4))):
            row.append(data.draw(st.integers(0, room)))
            room -= row[-1]
        lengths.append(row)
    dense = torch.zeros(batch, seq_len, seq_len, dtype=torch.bool)
    for b, row in enumerate(lengths):
        offset = 0
        for n in row:
            dense[b, offset:offset + n, offset:offset + n] = True
            offset += n
    assert_mask(tk.IntervalMask.block_diagonal(lengths, seq_len), dense, seq_len)


@st.composite
def position_id_rows(draw, first_position=0):
    """[B, S] position ids of packed documents restarting at first_position (documents of any length)."""
    batch, seq_len = draw(st.integers(1, 3)), draw(st.integers(1, 24))
    rows = []
    for _ in range(batch):
        row = [draw(st.integers(first_position, first_position + 5))]  # a row may start mid-document
        while len(row) < seq_len:
            row.append(first_position if draw(st.integers(0, 3)) == 0 else row[-1] + 1)
        rows.append(row)
    return rows


@SETTINGS
@given(st.integers(0, 2).flatmap(lambda first: position_id_rows(first)), st.booleans())
def test_from_position_ids_matches_brute_force(rows, causal):
    batch, seq_len = len(rows), len(rows[0])
    smallest = min(min(row) for row in rows)
    dense = torch.zeros(batch, seq_len, seq_len, dtype=torch.bool)
    for b, row in enumerate(rows):
        doc = [0] * seq_len
        for p in range(1, seq_len):
            doc[p] = doc[p - 1] + (row[p] == smallest)
        for q in range(seq_len):
            for k in range(seq_len):
                dense[b, q, k] = doc[q] == doc[k] and (k <= q or not causal)
    assert_mask(tk.IntervalMask.from_position_ids(torch.tensor(rows), causal=causal), dense, seq_len)


def test_from_position_ids_with_images_and_under_compile():
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    image_ids = torch.tensor([[0, 1, 1, 1, 0, 0, 0, 2, 2, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    expected = tk.IntervalMask.from_spans(10, images=[[(1, 4), (7, 9)], []], documents=[[6, 4], [10]])
    mask = tk.IntervalMask.from_position_ids(position_ids, image_ids=image_ids)
    assert torch.equal(mask.kv_start, expected.kv_start) and torch.equal(mask.kv_end, expected.kv_end)

    def bounds(ids, images):
        m = tk.IntervalMask.from_position_ids(ids, image_ids=images)
        return m.kv_start, m.kv_end

    start, end = torch.compile(bounds, fullgraph=True, backend="eager")(position_ids, image_ids)  # no host sync
    assert torch.equal(start, expected.kv_start) and torch.equal(end, expected.kv_end)


def from_dense_oracle(dense):
    """Row by row and key by key from the definition: a row's interval runs from its first to its last visible key
    (an empty row sits at the largest end so far) and the bounds never decrease; a key that some query's interval
    spans without the query seeing it is seen by one run of the queries spanning it, its [key_q_start, key_q_end)
    (every other key: all queries). Returns (bounds, key bounds or None) or (None, (batch, query)) for the first
    row that breaks it: decreasing bounds, or a hole at a key seen by queries before and after it."""
    batch, seq_q, seq_k = dense.shape
    starts, ends, key_starts, key_ends, bad_rows = [], [], [], [], set()
    for b in range(batch):
        last_start = last_end = 0
        row_starts, row_ends = [], []
        for q in range(seq_q):
            keys = dense[b, q].nonzero().flatten().tolist()
            s, e = (keys[0], keys[-1] + 1) if keys else (last_end, last_end)
            if s < last_start or e < last_end:
                bad_rows.add((b, q))
            last_start, last_end = s, e
            row_starts.append(s)
            row_ends.append(e)
        row_key_starts, row_key_ends = [], []
        for k in range(seq_k):
            spanning = [q for q in range(seq_q) if row_starts[q] <= k < row_ends[q]]
            viewers = [q for q in range(seq_q) if dense[b, q, k]]
            if viewers == spanning:
                row_key_starts.append(0)
                row_key_ends.append(seq_q)
                continue
            lo, hi = (viewers[0], viewers[-1] + 1) if viewers else (0, 0)
            bad_rows.update((b, q) for q in spanning if lo <= q < hi and q not in viewers)
            row_key_starts.append(lo)
            row_key_ends.append(hi)
        starts.append(row_starts)
        ends.append(row_ends)
        key_starts.append(row_key_starts)
        key_ends.append(row_key_ends)
    if bad_rows:
        return None, min(bad_rows)
    holes = any(s != 0 or e != seq_q for row in zip(key_starts, key_ends) for s, e in zip(*row))
    return (starts, ends, (key_starts, key_ends) if holes else None), None


@st.composite
def dense_masks(draw):
    """Dense masks of random valid interval masks (empty rows included), some with holes (keys seen by a run of
    the queries whose intervals span them), some with bits flipped."""
    batch, seq_q, seq_k = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 12))
    dense = torch.zeros(batch, seq_q, seq_k, dtype=torch.bool)
    for b in range(batch):
        start = end = 0
        for q in range(seq_q):
            start = draw(st.integers(start, seq_k))
            end = draw(st.integers(max(start, end), seq_k))
            if draw(st.integers(0, 4)) > 0:  # else an empty row here
                dense[b, q, start:end] = True
    for _ in range(draw(st.integers(0, 3))):  # a key hidden from the queries outside a run
        b, k = draw(st.integers(0, batch - 1)), draw(st.integers(0, seq_k - 1))
        lo = draw(st.integers(0, seq_q))
        hi = draw(st.integers(lo, seq_q))
        dense[b, :lo, k] = dense[b, hi:, k] = False
    for _ in range(draw(st.integers(0, 2))):
        b, q, k = draw(st.integers(0, batch - 1)), draw(st.integers(0, seq_q - 1)), draw(st.integers(0, seq_k - 1))
        dense[b, q, k] = ~dense[b, q, k]
    return dense


@settings(max_examples=200, deadline=None)
@given(dense_masks(), st.sampled_from(["3d", "4d", "2d"]))
def test_from_dense_matches_the_oracle(dense, form):
    if form == "2d":
        dense = dense[:1]
    given_mask = {"3d": dense, "4d": dense[:, None], "2d": dense[0]}[form]
    bounds, bad = from_dense_oracle(dense)
    if bad is not None:
        with pytest.raises(NotAnIntervalError, match=rf"^dense: batch row {bad[0]}, query {bad[1]}: ") as caught:
            tk.IntervalMask.from_dense(given_mask)
        assert (caught.value.batch, caught.value.query) == bad
        return
    mask = tk.IntervalMask.from_dense(given_mask)
    assert mask.kv_start.tolist() == bounds[0] and mask.kv_end.tolist() == bounds[1]
    if bounds[2] is None:
        assert not mask.has_holes
    else:
        assert mask.key_q_start.tolist() == bounds[2][0] and mask.key_q_end.tolist() == bounds[2][1]
    assert_mask(mask, dense, dense.shape[-1])


def test_from_dense_reads_blocks_of_rows_as_one():
    """DenseMaskReader takes a mask a block of rows at a time (the Hugging Face builder's way) and gives what one
    block gives, holes and errors included."""
    rng = random.Random(5)
    images, documents, hidden = random_hidden_layout(rng, 2, 40, max_image_len=8)
    dense = tk.IntervalMask.from_spans(40, images=images, documents=documents, hidden=hidden).to_dense()

    def read(dense, block):
        reader = DenseMaskReader(*dense.shape, dense.device)
        blocks = lambda: [dense[:, i:i + block] for i in range(0, dense.shape[1], block)]  # noqa: E731
        for part in blocks():
            reader.add(part)
        return reader.mask(blocks)

    whole = tk.IntervalMask.from_dense(dense)
    assert whole.has_holes
    for block in (1, 3, 7, 40):
        mask = read(dense, block)
        for name in ("kv_start", "kv_end", "key_q_start", "key_q_end"):
            assert torch.equal(getattr(mask, name), getattr(whole, name)), (block, name)
    broken = dense.clone()
    broken[:, 30, 1] = ~broken[:, 30, 1]  # key 1 seen across a document, or a hole in a causal row
    with pytest.raises(NotAnIntervalError) as expected:
        tk.IntervalMask.from_dense(broken)
    for block in (1, 3, 7):
        with pytest.raises(NotAnIntervalError) as caught:
            read(broken, block)
        assert str(caught.value) == str(expected.value)


def test_from_dense_round_trips_every_constructor():
    rng = random.Random(3)
    images, documents = random_layout(rng, 3, 40, max_image_len=10)
    for mask in (tk.IntervalMask.from_spans(40, images=images, documents=documents),
                 tk.IntervalMask.causal(2, 5, 9), tk.IntervalMask.causal(2, 9, 5), tk.IntervalMask.prefix_lm([2, 7], 2, 6, 8),
                 tk.IntervalMask.window((2, 3), 1, 7, 11), tk.IntervalMask.from_key_lengths([0, 3], 4, 5),
                 tk.IntervalMask.from_cu_seqlens([0, 3, 3, 9], [0, 4, 6, 6], causal=True),
                 tk.IntervalMask.from_spans(40, **dict(zip(("images", "documents", "hidden"),
                                                           random_hidden_layout(rng, 3, 40, max_image_len=10))))):
        again = tk.IntervalMask.from_dense(mask.to_dense())
        assert torch.equal(again.to_dense(), mask.to_dense())
        again.validate()


def test_dense_mask_reader_names_blocks_that_do_not_fit():
    reader = DenseMaskReader(2, 5, 7, "cpu")
    with pytest.raises(ValueError, match=r"^dense block: expected \[B, n, Sk\] = \[2, n <= 5, 7\], got \[2, 3, 6\]"):
        reader.add(torch.ones(2, 3, 6, dtype=torch.bool))
    reader.add(torch.ones(2, 3, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^dense block: expected \[B, n, Sk\] = \[2, n <= 2, 7\], got \[2, 3, 7\]"):
        reader.add(torch.ones(2, 3, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^dense: 3 of 5 query rows were added"):
        reader.mask(lambda: ())


@pytest.mark.parametrize(
    "rows, message",
    [
        ([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0]],
         r"query 1: its visible keys are not one interval \(key 1 is hidden between visible keys 0 and 2\), and the "
         r"queries that see key 1 are not one interval either \(queries 0 and 2 see it, this one does not\)"),
        ([[0, 1, 1, 0], [1, 1, 0, 0]], r"query 1: it sees keys \[0, 2\) but query 0 sees \[1, 3\): an interval mask needs"),
        ([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]],
         r"query 2: it sees keys \[0, 3\) but query 1 sees nothing, after rows that see keys up to 2: an interval mask "
         r"can hold an empty row only between rows whose intervals do not overlap"),
    ],
)
def test_from_dense_names_the_first_row_that_is_not_an_interval(rows, message):
    dense = torch.zeros(2, len(rows), 4, dtype=torch.bool)
    dense[1] = torch.tensor(rows, dtype=torch.bool)  # batch row 1: row 0 is all visible
    dense[0] = True
    with pytest.raises(NotAnIntervalError, match=r"^dense: batch row 1, " + message):
        tk.IntervalMask.from_dense(dense)
    assert issubclass(NotAnIntervalError, ValueError)


# ------------------------------------------------------------------------------ the constructors' masks in attention
attention_path = both_paths_fixture(importlib.import_module("tfkernels.attention"))


def dense_attention(q, k, v, dense):
    """SDPA under the dense mask, in q's dtype; a row that sees nothing outputs zeros (SDPA would give NaN, so
    such a row attends to every key and is zeroed after: its gradients are zero too)."""
    sees_any = dense.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=(dense | ~sees_any)[:, None], enable_gqa=True).transpose(1, 2)
    return torch.where(sees_any[..., None], out, 0)


def check_against_dense(mask, batch, seq_q, seq_k, heads_q=4, heads_kv=2, head_dim=16, squeeze_batch=False):
    """tk.attention under ``mask`` against SDPA under ``mask.to_dense()``, forward and gradients, in float32
    anchored on SDPA's own float32 error. ``squeeze_batch``: q, k, v are varlen-packed ``[total, H, D]`` tensors
    passed as ``x[None]`` views."""
    torch.manual_seed(seq_q * 1000 + seq_k)
    shapes = ((batch, seq_q, heads_q, head_dim), (batch, seq_k, heads_kv, head_dim), (batch, seq_k, heads_kv, head_dim))
    qkv = [torch.randn(shape[1:] if squeeze_batch else shape) for shape in shapes]
    d_out = torch.randn(shapes[0])
    dense = mask.to_dense()

    def run(attend, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in qkv]
        out = attend(*[t[None] for t in inputs] if squeeze_batch else inputs)
        return (out, *torch.autograd.grad(out, inputs, d_out.to(dtype).reshape(out.shape)))

    ours = run(lambda q, k, v: tk.attention(q, k, v, mask), torch.float32)
    exact = run(lambda q, k, v: dense_attention(q, k, v, dense), torch.float64)
    lowp = run(lambda q, k, v: dense_attention(q, k, v, dense), torch.float32)
    for name, a, ref64, low in zip(("out", "dq", "dk", "dv"), ours, exact, lowp):
        assert_anchored(name, a, ref64, low)
    return ours


def test_from_dense_empty_rows_run_in_attention(attention_path):
    """Rows that see nothing (padding between documents, rows before the first key) are empty intervals:
    attention outputs zeros there and gives them zero gradients, on both paths."""
    dense = tk.IntervalMask.from_spans(20, images=[[(2, 6)]], documents=[[7, 9]]).to_dense()
    dense[0, 7] = dense[0, 13:16] = False  # a fully masked row at a document's start, and three at its end
    dense[0, 8:13, 7] = False  # (the rows after row 7 then must not see key 7: else not an interval mask)
    mask = tk.IntervalMask.from_dense(dense)
    assert mask.kv_start[0, 13:].tolist() == mask.kv_end[0, 13:].tolist() == [13] * 7  # padding rows 16-19 too
    out, dq, _, _ = check_against_dense(mask, 1, 20, 20)
    assert not out[0, 13:16].any() and not dq[0, 13:16].any() and not out[0, 7].any()


def test_from_dense_holes_run_in_attention(attention_path):
    """Dense masks whose rows have holes that per-key query intervals express: padding keys in the middle of
    causal rows (no query sees them), a decoder's rows over its own keys (causal) and an encoder's (all of them)
    concatenated, hidden spans (BAGEL's noisy copies). Attention equals SDPA on the dense mask, forward and
    gradients (GQA; Sq != Sk)."""
    padded = torch.ones(2, 24, 24, dtype=torch.bool).tril()
    padded[0, :, 9:11] = padded[1, :, 3] = False
    decoder = torch.ones(12, 32, dtype=torch.bool)
    decoder[:, :12] = torch.ones(12, 12, dtype=torch.bool).tril()
    images, documents, hidden = random_hidden_layout(random.Random(11), 2, 40, max_image_len=9,
                                                     hidden_probability=0.7)
    hidden = tk.IntervalMask.from_spans(40, images=images, documents=documents, hidden=hidden).to_dense()
    for dense in (padded, decoder[None], hidden):
        mask = tk.IntervalMask.from_dense(dense)
        assert mask.has_holes and torch.equal(mask.to_dense(), dense)
        check_against_dense(mask, *dense.shape)


def test_cross_attention_with_key_lengths(attention_path):
    """PixArt-alpha: image queries attend to captions padded to the longest one (GQA, Sq != Sk,
    an empty caption)."""
    mask = tk.IntervalMask.from_key_lengths(torch.tensor([13, 5, 0]), 24, 13)
    out = check_against_dense(mask, 3, 24, 13, heads_q=4, heads_kv=1)[0]
    assert not out[2].any()


def test_multi_aspect_images_in_one_call(attention_path):
    """PixArt-alpha's multi-aspect batches: images of 4x3, 2x5 and 3x3 patches packed in one row (and 6x2
    with padding in another), each bidirectional within itself and blind to the others, in one call."""
    mask = tk.IntervalMask.block_diagonal([[12, 10, 9], [12]], 32)
    check_against_dense(mask, 2, 32, 32)


def test_varlen_packed_row_in_attention(attention_path):
    """FlashAttention's varlen layout: [total, H, D] tensors passed as q[None] views, documents with their own
    query and key lengths, causal and windowed, padding queries after the last document."""
    mask = tk.IntervalMask.from_cu_seqlens([0, 6, 6, 15, 19], [0, 9, 12, 17, 26], causal=True, window_size=(4, -1),
                                           seq_len_q=21)
    check_against_dense(mask, 1, 21, 26, squeeze_batch=True)


def test_kv_cache_lengths_in_attention(attention_path):
    mask = tk.IntervalMask.from_cache_seqlens([17, 3, 24], 3, 24, causal=True, window_size=(8, 0))
    check_against_dense(mask, 3, 3, 24)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: tk.IntervalMask.window((2,), 1, 4), ValueError, r"^window_size: expected a \(left, right\) pair of ints >= -1"),
        (lambda: tk.IntervalMask.window((2, -2), 1, 4), ValueError, r"^window_size: expected .* got \(2, -2\)"),
        (lambda: tk.IntervalMask.window((2, 1.0), 1, 4), TypeError, r"^window_size: expected .* got \(2, 1.0\)"),
        (lambda: tk.IntervalMask.window(3, 1, 4), TypeError, r"^window_size: expected .* got 3"),
        (lambda: tk.IntervalMask.window((1, 1), 1, 4, causal=1), TypeError, r"^causal: expected a bool, got 1"),
        (lambda: tk.IntervalMask.window((1, 1), 1, -4), ValueError, r"^seq_len_q: expected an int"),
        (lambda: tk.IntervalMask.from_cu_seqlens([1, 3]), ValueError, r"^cu_seqlens_q\[0\]: expected 0, got 1"),
        (lambda: tk.IntervalMask.from_cu_seqlens(torch.tensor([0, 5, 3])), ValueError,
         r"^cu_seqlens_q\[2\]: expected non-decreasing offsets, got 3 after 5"),
        (lambda: tk.IntervalMask.from_cu_seqlens([0, 3], [0, -3]), ValueError,
         r"^cu_seqlens_k\[1\]: expected an int in \[0, 2147483647\], got -3"),
        (lambda: tk.IntervalMask.from_cu_seqlens([0, 3], torch.tensor([0, 2**40])), ValueError,
         r"^cu_seqlens_k\[1\]: expected an int in \[0, 2147483647\], got 1099511627776"),
        (lambda: tk.IntervalMask.from_cu_seqlens([0, 3], [0, 2, 4]), ValueError,
         r"^cu_seqlens_k: expected 2 offsets like cu_seqlens_q \(one document each\), got 3"),
        (lambda: tk.IntervalMask.from_cu_seqlens([0, 3], seq_len_q=2), ValueError,
         r"^cu_seqlens_q\[-1\]: expected at most seq_len_q=2, got 3"),
        (lambda: tk.IntervalMask.from_cu_seqlens(torch.zeros(0, dtype=torch.int32)), ValueError,
         r"^cu_seqlens_q: expected N \+ 1 >= 1 offsets starting at 0"),
        (lambda: tk.IntervalMask.from_cu_seqlens(torch.tensor([[0, 3]])), ValueError,
         r"^cu_seqlens_q: expected a 1-D int tensor, got shape \(1, 2\)"),
        (lambda: tk.IntervalMask.from_cu_seqlens(torch.tensor([0.0, 3.0])), TypeError,
         r"^cu_seqlens_q: expected an integer dtype, got torch.float32"),
        (lambda: tk.IntervalMask.from_cu_seqlens([0, 3.0]), TypeError,
         r"^cu_seqlens_q: expected a list of ints or a 1-D int tensor, got \[0, 3.0\]"),
        (lambda: tk.IntervalMask.from_cu_seqlens([0, 3], causal=None), TypeError, r"^causal: expected a bool"),
        (lambda: tk.IntervalMask.from_cache_seqlens([3, 9], 1, 8), ValueError,
         r"^cache_seqlens\[1\]: expected an int in \[0, 8\], got 9"),
        (lambda: tk.IntervalMask.from_cache_seqlens(torch.tensor([3, -1]), 1, 8), ValueError,
         r"^cache_seqlens\[1\]: expected an int in \[0, 8\], got -1"),
        (lambda: tk.IntervalMask.from_cache_seqlens(4, 1, 8), TypeError,
         r"^cache_seqlens: expected a list of ints or a 1-D int tensor, got 4"),
        (lambda: tk.IntervalMask.from_cache_seqlens([4], 1, 2**31), ValueError, r"^seq_len_k: expected an int"),
        (lambda: tk.IntervalMask.from_key_lengths(torch.tensor([3, 12]), 4, 8), ValueError,
         r"^key_lengths\[1\]: expected an int in \[0, 8\], got 12"),
        (lambda: tk.IntervalMask.from_key_lengths(torch.tensor([True]), 4, 8), TypeError,
         r"^key_lengths: expected an integer dtype, got torch.bool"),
        (lambda: tk.IntervalMask.block_diagonal([[4, 5]], 8), ValueError,
         r"^lengths\[0\]: lengths sum to 9, more than seq_len=8"),
        (lambda: tk.IntervalMask.block_diagonal([[4], [2, -1]], 8), ValueError,
         r"^lengths\[1\]: expected a list of non-negative int block lengths \(one list per batch row\), got \[2, -1\]$"),
        (lambda: tk.IntervalMask.block_diagonal([[4, 2.0]], 8), TypeError,
         r"^lengths\[0\]: expected a list of non-negative int block lengths \(one list per batch row\), got \[4, 2.0\]$"),
        (lambda: tk.IntervalMask.block_diagonal(torch.tensor([[4]]), 8), TypeError,
         r"^lengths: expected one list of non-negative int block lengths per batch row, got tensor"),
        (lambda: tk.IntervalMask.from_position_ids(torch.zeros(4, dtype=torch.long)), ValueError,
         r"^position_ids: expected an int tensor \[B, S\]"),
        (lambda: tk.IntervalMask.from_position_ids(torch.zeros(1, 4)), TypeError,
         r"^position_ids: expected an integer dtype, got torch.float32"),
        (lambda: tk.IntervalMask.from_position_ids(torch.zeros(1, 4, dtype=torch.long), causal=False,
                                                   image_ids=torch.zeros(1, 4, dtype=torch.long)), ValueError,
         r"^image_ids: only with causal=True"),
        (lambda: tk.IntervalMask.from_position_ids(torch.zeros(1, 4, dtype=torch.long),
                                                   image_ids=torch.zeros(1, 5, dtype=torch.long)), ValueError,
         r"^image_ids: expected a tensor of doc_ids' shape"),
        (lambda: tk.IntervalMask.from_dense(torch.zeros(2, 3, 3)), TypeError,
         r"^dense: expected dtype torch.bool \(True = visible; an additive float mask converts with dense == 0\)"),
        (lambda: tk.IntervalMask.from_dense(torch.zeros(2, 4, 3, 3, dtype=torch.bool)), ValueError,
         r"^dense: expected shape \[B, Sq, Sk\], \[B, 1, Sq, Sk\] or \[Sq, Sk\] \(one mask for all heads\), "
         r"got \(2, 4, 3, 3\)"),
        (lambda: tk.IntervalMask.from_dense([[True]]), TypeError, r"^dense: expected a bool tensor \[B, Sq, Sk\], got list"),
    ],
)
def test_new_constructor_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_from_cu_seqlens_under_compile_needs_the_lengths():
    """While torch.compile traces, offsets cannot be read back: the lengths must be given, and then the mask is
    built on the device without a graph break."""
    cu_q, cu_k = torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 4, 6], dtype=torch.int32)

    def bounds(q_offsets, k_offsets):
        m = tk.IntervalMask.from_cu_seqlens(q_offsets, k_offsets, causal=True, seq_len_q=8, seq_len_k=6)
        return m.kv_start, m.kv_end

    expected = tk.IntervalMask.from_cu_seqlens(cu_q, cu_k, causal=True)
    start, end = torch.compile(bounds, fullgraph=True, backend="eager")(cu_q, cu_k)
    assert torch.equal(start, expected.kv_start) and torch.equal(end, expected.kv_end)

    def without_lengths(q_offsets):
        return tk.IntervalMask.from_cu_seqlens(q_offsets).kv_end

    with pytest.raises(Exception, match=r"seq_len_q: give it while torch.compile traces"):
        torch.compile(without_lengths, fullgraph=True, backend="eager")(cu_q)


# ------------------------------------------------------------------------------ hidden spans (rows with holes)
def brute_force_hidden(seq_len, images, documents, hidden):
    """bool [B, S, S] from the definition: the Transfusion mask of the layout with the hidden spans as
    bidirectional spans, and a hidden key seen only by the queries of its own span."""
    spans = [sorted(i + h) for i, h in zip(images, hidden)]
    dense = brute_force_transfusion(seq_len, spans, documents)
    for row, row_hidden in enumerate(hidden):
        for start, end in row_hidden:
            outside = torch.ones(seq_len, dtype=torch.bool)
            outside[start:end] = False
            dense[row, outside, start:end] = False
    return dense


@st.composite
def hidden_layouts(draw, max_len=48, max_batch=3):
    seq_len = draw(st.integers(1, max_len))
    batch = draw(st.integers(1, max_batch))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    images, documents, hidden = random_hidden_layout(
        rng, batch, seq_len, max_image_len=draw(st.integers(1, 12)), padding=draw(st.booleans()),
        image_probability=draw(st.sampled_from([0.5, 0.9])))
    return seq_len, images, documents, hidden


@SETTINGS
@given(hidden_layouts())
def test_hidden_spans_match_brute_force(layout):
    """A hidden span is bidirectional within itself, sees its document's causal context before it except
    earlier hidden spans, and no query outside it sees it; its keys' intervals hold that exactly."""
    seq_len, images, documents, hidden = layout
    mask = tk.IntervalMask.from_spans(seq_len, images=images, documents=documents, hidden=hidden)
    dense = brute_force_hidden(seq_len, images, documents, hidden)
    assert mask.has_holes and mask.key_q_start.dtype == torch.int32 and mask.key_q_start.shape == (len(documents),
                                                                                                     seq_len)
    assert torch.equal(mask.to_dense(), dense)
    mask.validate()
    # The row envelopes are the Transfusion mask with the hidden spans as images (the holes come from the keys).
    as_images = tk.IntervalMask.from_spans(seq_len, images=[sorted(i + h) for i, h in zip(images, hidden)],
                                           documents=documents)
    assert torch.equal(mask.kv_start, as_images.kv_start) and torch.equal(mask.kv_end, as_images.kv_end)
    # Every key is still seen by one interval of queries, and key_intervals gives it.
    q_start, q_end = mask.key_intervals()
    queries = torch.arange(seq_len)
    from_intervals = (queries[None, :, None] >= q_start[:, None, :]) & (queries[None, :, None] < q_end[:, None, :])
    assert torch.equal(from_intervals, dense) and (q_start <= q_end).all()
    assert mask.visible_pairs() == int(dense.sum())
    assert not tk.IntervalMask.from_spans(seq_len, images=images, documents=documents).has_holes


@SETTINGS
@given(hidden_layouts())
def test_hidden_ids_read_runs_not_values(layout):
    """from_segment_ids: any non-zero hidden id names a span (distinct per span of a row); the same mask as
    from_spans, and the same tensors as a Transfusion mask when no span is hidden."""
    seq_len, images, documents, hidden = layout
    doc_ids, image_ids, hidden_ids = segment_ids_from_layout(seq_len, images, documents, hidden=hidden)
    mask = tk.IntervalMask.from_segment_ids(doc_ids, image_ids, torch.where(hidden_ids > 0, 7 - 3 * hidden_ids, 0))
    assert torch.equal(mask.to_dense(), brute_force_hidden(seq_len, images, documents, hidden))
    mask.validate()
    none_hidden = tk.IntervalMask.from_segment_ids(doc_ids, image_ids, torch.zeros_like(doc_ids))
    plain = tk.IntervalMask.from_segment_ids(doc_ids, image_ids)
    assert torch.equal(none_hidden.to_dense(), plain.to_dense())


def test_segment_ids_from_layout_values_with_hidden_spans():
    doc_ids, image_ids, hidden_ids = segment_ids_from_layout(8, [[(4, 5)], []], [[6], [8]],
                                                             hidden=[[(1, 3), (3, 4)], [(0, 8)]])
    assert hidden_ids.dtype == torch.int64
    assert image_ids.tolist() == [[0, 0, 0, 0, 1, 0, 0, 0], [0] * 8]
    assert hidden_ids.tolist() == [[0, 1, 1, 2, 0, 0, 0, 0], [1] * 8], "hidden span i gets id i + 1"
    mask = tk.IntervalMask.from_spans(8, images=[[(4, 5)], []], documents=[[6], [8]], hidden=[[(1, 3), (3, 4)], [(0, 8)]])
    assert mask.key_q_start.tolist() == [[0, 1, 1, 3, 0, 0, 0, 0], [0] * 8]
    assert mask.key_q_end.tolist() == [[8, 3, 3, 4, 8, 8, 8, 8], [8] * 8]
    assert mask.to_dense()[0, 5].tolist() == [True, False, False, False, True, True, False, False]
    assert mask.to_dense()[0, 3].tolist() == [True, False, False, True, False, False, False, False]


@SETTINGS
@given(hidden_layouts(), st.data())
def test_slice_queries_of_a_mask_with_holes(layout, data):
    seq_len, images, documents, hidden = layout
    mask = tk.IntervalMask.from_spans(seq_len, images=images, documents=documents, hidden=hidden)
    inside = {p for spans in (*images, *hidden) for (s, e) in spans for p in range(s + 1, e)}
    end = data.draw(st.sampled_from([e for e in range(seq_len + 1) if e not in inside]))
    start = data.draw(st.integers(0, end))
    step = mask.slice_queries(start, end)
    assert step.has_holes and step.seq_len_q == end - start and step.seq_len_k == end
    assert torch.equal(step.to_dense(), mask.to_dense()[:, start:end, :end])


def test_a_mask_with_holes_on_another_device_and_shared_by_a_batch():
    mask = tk.IntervalMask.from_spans(12, images=[[(2, 4)]], hidden=[[(5, 9)]])
    moved = mask.to("meta")
    assert moved.key_q_start.device.type == moved.key_q_end.device.type == "meta"
    expanded = mask._expand_batch(3)
    assert torch.equal(expanded.to_dense(), mask.to_dense().expand(3, -1, -1))
    assert "holes" in repr(mask) and "holes" not in repr(tk.IntervalMask.causal(1, 4))


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"images": [[(2, 5)]], "hidden": [[(4, 6)]]},
         r"^hidden\[0\]\[0\]: span \(4, 6\) overlaps image \(2, 5\) \(hidden spans and images are disjoint\)$"),
        ({"documents": [[4, 6]], "hidden": [[(2, 6)]]}, r"^hidden\[0\]\[0\]: span \(2, 6\) is not inside one document$"),
        ({"documents": [[8]], "hidden": [[(7, 9)]]}, r"^hidden\[0\]\[0\]: span \(7, 9\) is not inside one document$"),
        ({"hidden": [[(3, 5), (1, 2)]]}, r"^hidden\[0\]\[1\]: span \(1, 2\) overlaps or precedes the previous span"),
        ({"hidden": [[(3, 3)]]}, r"^hidden\[0\]\[0\]: expected 0 <= start < end <= seq_len=10, got \(3, 3\)$"),
        ({"documents": [[10]], "hidden": [[], []]},
         r"^hidden: expected one list of \(start, end\) spans per batch row, as many rows as documents \(1\), got 2$"),
    ],
)
def test_bad_hidden_spans_are_named(layout, message):
    with pytest.raises(ValueError, match=message):
        tk.IntervalMask.from_spans(10, **layout)


HIDDEN_ID_ERRORS = [
    # (doc_ids, image_ids, hidden_ids, message)
    ([[0, 0, 0, 0, 0, 0]], [[0, 1, 1, 0, 0, 0]], [[0, 0, 2, 2, 0, 0]],
     r"^hidden_ids: batch row 0, position 2: expected 0 where image_ids is not \(hidden spans and images are "
     r"disjoint\)$"),
    ([[0, 0, 0, 1, 1, 1]], None, [[0, 0, 3, 3, 0, 0]],
     r"^hidden_ids: batch row 0, position 3: expected each hidden span inside one document, but this one continues "
     r"across a document start$"),
    ([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], None, [[0, 0, 0, 0, 0, 0], [4, 4, 0, 5, 4, 0]],
     r"^hidden_ids: batch row 1, position 4: expected each non-zero id to be one run of positions, but this id "
     r"appeared before, in another run$"),
    ([[0, 0, 1, 1, -1, -1]], None, [[0, 0, 0, 0, 0, 1]], r"^hidden_ids: batch row 0, position 5: expected 0 on "
                                                          r"padding \(doc_ids < 0\)$"),
]


@pytest.mark.parametrize("doc_ids, image_ids, hidden_ids, message", HIDDEN_ID_ERRORS)
def test_bad_hidden_ids_are_named_before_any_launch_on_both_paths(doc_ids, image_ids, hidden_ids, message,
                                                                  attention_path):
    """from_segment_ids checks the hidden ids on the device (no host sync while building the mask); validate(),
    which every op calls before any launch, reads the result back and names the first bad position."""
    doc_ids, hidden_ids = torch.tensor(doc_ids), torch.tensor(hidden_ids)
    mask = tk.IntervalMask.from_segment_ids(doc_ids, None if image_ids is None else torch.tensor(image_ids), hidden_ids)
    with pytest.raises(ValueError, match=message):
        mask.validate()
    q = torch.randn(doc_ids.shape[0], doc_ids.shape[1], 2, 8)
    with pytest.raises(ValueError, match=message):
        tk.attention(q, q, q, mask)


@pytest.mark.parametrize(
    "holes, error, message",
    [
        ((torch.zeros(1, 4, dtype=torch.int32), None), TypeError,
         r"^mask.key_q_end: expected an int32 tensor \[B, Sk\] \(with holes, key_q_start and key_q_end are both "
         r"given\), got NoneType$"),
        ((torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int32)), TypeError,
         r"^mask.key_q_start: expected dtype torch.int32, got torch.int64$"),
        ((torch.zeros(1, 3, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int32)), ValueError,
         r"^mask.key_q_start: expected shape \[B, Sk\] = \[1, 4\], got \[1, 3\]$"),
        ((torch.tensor([[0, 0, -1, 0]], dtype=torch.int32), torch.full((1, 4), 3, dtype=torch.int32)), ValueError,
         r"^mask.key_q_start: batch row 0, key 2: expected key_q_start >= 0, got \[-1, 3\)$"),
        ((torch.zeros(1, 4, dtype=torch.int32), torch.tensor([[3, 3, 3, 4]], dtype=torch.int32)), ValueError,
         r"^mask.key_q_end: batch row 0, key 3: expected key_q_end <= seq_len_q=3, got \[0, 4\)$"),
        ((torch.tensor([[0, 2, 0, 0]], dtype=torch.int32), torch.tensor([[3, 1, 3, 3]], dtype=torch.int32)), ValueError,
         r"^mask.key_q_end: batch row 0, key 1: expected key_q_start <= key_q_end, got \[2, 1\)$"),
    ],
)
def test_validation_of_the_key_bounds(holes, error, message):
    causal = tk.IntervalMask.causal(1, 3, 4)
    with pytest.raises(error, match=message):
        tk.IntervalMask(causal.kv_start, causal.kv_end, 4, *holes).validate()


def test_hidden_ids_compile_without_host_sync_and_compiled_ops_clamp_the_key_bounds():
    images, documents, hidden = random_hidden_layout(random.Random(5), 2, 64)
    ids = segment_ids_from_layout(64, images, documents, hidden=hidden)

    def bounds(d, i, h):
        mask = tk.IntervalMask.from_segment_ids(d, i, h)
        return mask.kv_start, mask.kv_end, mask.key_q_start, mask.key_q_end

    got = torch.compile(bounds, fullgraph=True, backend="eager")(*ids)
    expected = tk.IntervalMask.from_spans(64, images=images, documents=documents, hidden=hidden)
    for a, b in zip(got, (expected.kv_start, expected.kv_end, expected.key_q_start, expected.key_q_end)):
        assert torch.equal(a, b)

    def holes(key_q_start, key_q_end):
        causal = tk.IntervalMask.causal(1, 4, 6)
        return tk.IntervalMask(causal.kv_start, causal.kv_end, 6, key_q_start, key_q_end).validate()._op_holes()

    start = torch.tensor([[-3, 0, 2, 9, 1, 0]], dtype=torch.int32)
    end = torch.tensor([[2, -1, 1, 9, 4, 5]], dtype=torch.int32)
    clamped = torch.compile(holes, fullgraph=True, backend="aot_eager")(start, end)
    assert [t.tolist() for t in clamped] == [[[0, 0, 2, 4, 1, 0]], [[2, 0, 2, 4, 4, 4]]]
    with pytest.raises(ValueError, match="key 0: expected key_q_start >= 0"):
        holes(start, end)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # uncompiled on purpose
def test_flex_block_mask_of_a_mask_with_holes():
    from torch.nn.attention.flex_attention import flex_attention

    seq_len = 96
    images, documents, hidden = random_hidden_layout(random.Random(3), 2, seq_len, max_image_len=20)
    mask = tk.IntervalMask.from_spans(seq_len, images=images, documents=documents, hidden=hidden)
    block_mask = mask.to_flex_block_mask(block_size=32)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, seq_len, 2, 16, dtype=torch.float64) for _ in range(3))
    expected, _ = tk.reference.attention(q, k, v, mask)
    out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                         block_mask=block_mask).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    blocks = mask.to_dense().reshape(2, 3, 32, 3, 32).any(dim=(2, 4))
    assert torch.equal(block_mask.to_dense().bool()[:, 0, :3, :3], blocks)


def test_mask_with_holes_in_attention_against_dense(attention_path):
    """Both paths against SDPA under the dense mask: documents of one hidden span, one-token and adjacent hidden
    spans, a noisy copy followed by its clean copy, hidden spans across the interpreter's tile borders."""
    mask = tk.IntervalMask.from_spans(
        96, images=[[(40, 56), (70, 71)], [(10, 20)]], documents=[[6, 26, 56], [64, 30]],
        hidden=[[(0, 6), (8, 9), (9, 12), (20, 32), (63, 65), (80, 88)], [(0, 10), (30, 34), (64, 94)]])
    check_against_dense(mask, 2, 96, 96)
