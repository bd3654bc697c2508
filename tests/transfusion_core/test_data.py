"""The document layout and the packer against the documents it packs, checked position by position."""

import pytest
import torch

import transfusion_core as tc
from transfusion_core.data import patchify, unpatchify

CONFIG = tc.TransfusionConfig(dim=32, n_layers=1, n_heads=2, image_size=4)
BOS, EOS, BOI, EOI = CONFIG.bos_id, CONFIG.eos_id, CONFIG.boi_id, CONFIG.eoi_id


def random_document(generator):
    """Text runs and images of random sizes (multiples of the patch size), in random order."""
    document = []
    for _ in range(int(torch.randint(1, 4, (), generator=generator))):
        if torch.rand((), generator=generator) < 0.5:
            document.append(torch.randint(0, 256, (int(torch.randint(0, 6, (), generator=generator)),),
                                          generator=generator).tolist())
        else:
            h, w = (2 * int(torch.randint(1, 4, (), generator=generator)) for _ in range(2))
            document.append(torch.randn(3, h, w, generator=generator))
    return document


def layout(document):
    """Brute force: the document as a list of positions, each a token id or (image index, patch)."""
    positions = [BOS]
    images = []
    for item in document:
        if isinstance(item, torch.Tensor):
            positions.append(BOI)
            patches = patchify(item, 2)
            positions += [(len(images), k) for k in range(patches.shape[0])]
            images.append(patches)
            positions.append(EOI)
        else:
            positions += list(item)
    return positions + [EOS], images


def unpack_row(batch, row):
    """The documents of one packed row, in the same form as ``layout``, from the batch alone."""
    documents = []
    doc_ids = batch.doc_ids[row].tolist()
    for q, doc in enumerate(doc_ids):
        if doc < 0:
            assert all(d < 0 for d in doc_ids[q:]), "padding only at the end of a row"
            break
        if q == 0 or doc != doc_ids[q - 1]:
            assert doc == len(documents), "documents numbered 0, 1, ... along the row"
            documents.append(([], {}))
        positions, images = documents[-1]
        image = int(batch.image_ids[row, q])
        if image:
            lo, hi = batch.patch_offsets[image - 1], batch.patch_offsets[image]
            k = sum(1 for p in positions if isinstance(p, tuple) and p[0] == image)
            positions.append((image, k))
            images[image] = batch.patches[lo:hi]
        else:
            positions.append(int(batch.tokens[row, q]))
    return documents


def brute_force_mask(batch, row):
    seq_len = batch.tokens.shape[1]
    doc, img = batch.doc_ids[row].tolist(), batch.image_ids[row].tolist()
    dense = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for q in range(seq_len):
        for k in range(seq_len):
            same_doc = doc[q] >= 0 and doc[q] == doc[k]
            same_image = img[q] != 0 and img[q] == img[k]
            dense[q, k] = same_doc and (k <= q or same_image)
    return dense


def test_packed_rows_match_documents():
    generator = torch.Generator().manual_seed(0)
    documents = [random_document(generator) for _ in range(40)]
    documents.append([list(range(64 - 2))])  # exactly one full row: BOS + 62 tokens + EOS
    batch = tc.Packer(CONFIG, 64, seed=1)(documents)
    seq_len = 64
    assert batch.tokens.shape == batch.targets.shape == batch.positions.shape == (batch.tokens.shape[0], seq_len)
    found = []
    for row in range(batch.tokens.shape[0]):
        assert torch.equal(batch.mask.to_dense()[row], brute_force_mask(batch, row))
        start = 0
        for positions, images in unpack_row(batch, row):
            length = len(positions)
            assert batch.positions[row, start:start + length].tolist() == list(range(length))
            # Targets: the next position's token when both are text; BOI is predicted, EOI is not.
            for j, p in enumerate(positions):
                nxt = positions[j + 1] if j + 1 < length else None
                expected = nxt if isinstance(p, int) and isinstance(nxt, int) else tc.IGNORE_INDEX
                assert int(batch.targets[row, start + j]) == expected
            found.append((positions, images))
            start += length
        assert (batch.targets[row, start:] == tc.IGNORE_INDEX).all()
        assert (batch.positions[row, start:] == 0).all()
    # Every document appears exactly once, whole, with its tokens and patches in place.
    assert len(found) == len(documents)
    unmatched = list(range(len(found)))
    for document in documents:
        want_positions, want_images = layout(document)
        for i in unmatched:
            positions, images = found[i]
            if len(positions) != len(want_positions):
                continue
            ids = list(dict.fromkeys(p[0] for p in positions if isinstance(p, tuple)))
            renamed = [(ids.index(p[0]), p[1]) if isinstance(p, tuple) else p for p in positions]
            if renamed == want_positions and all(
                torch.equal(images[image_id], want) for image_id, want in zip(ids, want_images)
            ):
                unmatched.remove(i)
                break
        else:
            raise AssertionError(f"document not found whole in any row: {want_positions}")
    # Images are in row-major order and the grids and offsets agree with the patches.
    grids = batch.image_grids
    assert torch.equal(batch.patch_offsets[1:] - batch.patch_offsets[:-1], grids[:, 0] * grids[:, 1])
    assert batch.patch_offsets[-1] == batch.patches.shape[0] == int((batch.image_ids != 0).sum())
    assert batch.timesteps.shape == (batch.num_images,)
    assert (batch.timesteps >= 0).all() and (batch.timesteps < CONFIG.num_timesteps).all()


def test_first_fit_fills_earlier_rows():
    packer = tc.Packer(CONFIG, 16)
    # Lengths with BOS/EOS: 12, 12, 4 -> the third document fits after the first.
    batch = packer([[list(range(10))], [list(range(10))], [list(range(2))]])
    assert batch.doc_ids.tolist()[0] == [0] * 12 + [1] * 4
    assert batch.doc_ids.tolist()[1] == [0] * 12 + [-1] * 4


def test_document_longer_than_row_is_rejected():
    packer = tc.Packer(CONFIG, 16)
    with pytest.raises(ValueError, match=r"documents\[1\]: takes 18 positions.*seq_len=16.*truncate=True"):
        packer([[[1, 2]], [list(range(16))]])


def test_truncation_keeps_a_prefix_with_whole_images():
    image = torch.randn(3, 4, 4)  # 4 patches
    packer = tc.Packer(CONFIG, 10, truncate=True)
    # BOS, 3 tokens, BOI, 4 patches, EOI = 10: the image fits exactly, the rest is cut.
    batch = packer([[[1, 2, 3], image, [7, 8]]])
    assert batch.tokens[0, :5].tolist() == [BOS, 1, 2, 3, BOI] and int(batch.tokens[0, 9]) == EOI
    assert batch.num_images == 1
    # With one more leading token the image no longer fits: it is dropped with its BOI.
    batch = packer([[[1, 2, 3, 4], image, [7, 8]]])
    assert batch.num_images == 0
    assert batch.tokens[0, :5].tolist() == [BOS, 1, 2, 3, 4]
    assert (batch.doc_ids[0, 5:] == -1).all()
    # Text that fills the row up to the BOI: the BOI goes too (no BOI without its image).
    batch = tc.Packer(CONFIG, 5, truncate=True)([[[1, 2, 3], image]])
    assert batch.num_images == 0 and batch.tokens[0, :4].tolist() == [BOS, 1, 2, 3]
    assert int(batch.doc_ids[0, 4]) == -1 and BOI not in batch.targets.tolist()[0]
    # Text cut mid-run keeps its tokens.
    batch = tc.Packer(CONFIG, 3, truncate=True)([[[1, 2, 3], image]])
    assert batch.tokens[0].tolist() == [BOS, 1, 2]


def test_num_rows_pads_or_rejects():
    batch = tc.Packer(CONFIG, 16, num_rows=3)([[[1, 2]]])
    assert batch.tokens.shape == (3, 16)
    assert (batch.doc_ids[1:] == -1).all() and not batch.mask.to_dense()[1:].any()
    with pytest.raises(ValueError, match=r"need 2 rows of seq_len=16, more than num_rows=1"):
        tc.Packer(CONFIG, 16, num_rows=1)([[list(range(10))], [list(range(10))]])


def test_image_before_its_caption_has_capped_timesteps():
    image = torch.randn(3, 2, 2)
    packer = tc.Packer(CONFIG, 256, seed=0)
    image_first = packer([[image, [5, 6]] for _ in range(60)])
    caption_first = packer([[[5, 6], image] for _ in range(60)])
    assert int(image_first.timesteps.max()) <= 500
    assert int(caption_first.timesteps.max()) > 500
    uncapped = tc.Packer(CONFIG, 256, image_first_t_max=None, seed=0)([[image, [5, 6]] for _ in range(60)])
    assert int(uncapped.timesteps.max()) > 500


def test_caption_first_probability_and_caption_dropout():
    image = torch.randn(3, 2, 2)
    documents = [[image, [5, 6]] for _ in range(1000)]
    batch = tc.Packer(CONFIG, 1024, caption_first_prob=0.8, seed=0)(documents)
    boi_positions = batch.tokens == BOI
    caption_first = int((boi_positions & (batch.positions == 3)).sum())  # BOS, 5, 6, BOI
    assert caption_first + int((boi_positions & (batch.positions == 1)).sum()) == 1000
    assert 740 <= caption_first <= 860  # 0.8 +- 4.7 standard deviations
    batch = tc.Packer(CONFIG, 1024, drop_caption_prob=0.5, seed=0)([[[5, 6], image] for _ in range(1000)])
    dropped = int(((batch.tokens == BOI) & (batch.positions == 1)).sum())
    assert 420 <= dropped <= 580
    assert batch.num_images == 1000


def test_same_seed_same_batch():
    generator = torch.Generator().manual_seed(3)
    documents = [random_document(generator) for _ in range(10)]
    a, b = tc.Packer(CONFIG, 64, seed=5)(documents), tc.Packer(CONFIG, 64, seed=5)(documents)
    assert torch.equal(a.timesteps, b.timesteps) and a.noise_seed == b.noise_seed
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.patches, b.patches)


@pytest.mark.parametrize(
    "document, message",
    [
        ([torch.randn(4, 4, 4)], r"documents\[0\]\[0\]: expected an image \[3, H, W\], got shape \(4, 4, 4\)"),
        ([torch.randn(3, 4, 3)], r"documents\[0\]\[0\]: image size \(4, 3\) is not a multiple of patch_size=2"),
        ([[1, 300]], r"documents\[0\]\[0\]: token ids must lie in \[0, vocab_size=260\)"),
        ([[1, 2**70]], r"documents\[0\]\[0\]: token ids must lie in \[0, vocab_size=260\)"),
        ([torch.tensor([1, -3])], r"documents\[0\]\[0\]: token ids must lie in"),
        ([torch.tensor([[1, 2]])], r"documents\[0\]\[0\]: expected 1-D token ids, got shape \(1, 2\)"),
        ([[1, 2], [3, BOI]], r"documents\[0\]\[1\]: text contains a special token"),
        ([[1], torch.full((3, 2, 2), float("nan"))], r"documents\[0\]\[1\]: image has 12 NaN or infinite values"),
        ([torch.tensor([[[0.0, float("inf")], [0.0, 0.0]]] * 3)], r"image has 3 NaN or infinite values"),
    ],
)
def test_bad_document_values_are_named(document, message):
    with pytest.raises(ValueError, match=message):
        tc.Packer(CONFIG, 64)([document])


@pytest.mark.parametrize(
    "document, message",
    [
        ([[1.5, 2.0]], r"documents\[0\]\[0\]: expected token ids .*, got a list holding float"),
        ([[1, True]], r"documents\[0\]\[0\]: expected token ids .*, got a list holding bool"),
        ([torch.tensor([1 + 2j, 3])], r"documents\[0\]\[0\]: expected token ids .*, got a torch.complex64 tensor"),
        ([torch.tensor([True])], r"documents\[0\]\[0\]: expected token ids .*, got a torch.bool tensor"),
        ([{"text": [1]}], r"documents\[0\]\[0\]: expected token ids .*, got dict"),
        ("some text", r"documents\[0\]: expected a list of token-id lists and image tensors, got str"),
        (torch.tensor([1, 2]), r"documents\[0\]: expected a list of token-id lists and image tensors, got Tensor"),
    ],
)
def test_bad_document_types_are_named(document, message):
    with pytest.raises(TypeError, match=message):
        tc.Packer(CONFIG, 64)([document])


def test_bad_packer_arguments():
    with pytest.raises(ValueError, match=r"seq_len: expected an int in \[2, 2147483647\], got 1"):
        tc.Packer(CONFIG, 1)
    with pytest.raises(ValueError, match="caption_first_prob: expected a finite float in"):
        tc.Packer(CONFIG, 16, caption_first_prob=1.5)
    with pytest.raises(ValueError, match="image_first_t_max"):
        tc.Packer(CONFIG, 16, image_first_t_max=1000)
    with pytest.raises(ValueError, match="documents: expected at least one document"):
        tc.Packer(CONFIG, 16)([])
    with pytest.raises(TypeError, match="documents: expected a list of documents, got str"):
        tc.Packer(CONFIG, 16)("abc")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(seed=1.5), TypeError, r"seed: expected an int in \[0, 18446744073709551615\], got 1.5"),
    (dict(seed=None), TypeError, "seed: expected an int"),
    (dict(seed=-1), ValueError, "seed: expected an int in"),
    (dict(seed=2**64), ValueError, "seed: expected an int in"),
    (dict(drop_caption_prob=None), TypeError, "drop_caption_prob: expected a finite float in"),
    (dict(drop_caption_prob=float("nan")), ValueError, "drop_caption_prob: expected a finite float in"),
    (dict(caption_first_prob="0.5"), TypeError, "caption_first_prob"),
    (dict(truncate=1), TypeError, "truncate: expected a bool, got 1"),
    (dict(num_rows=2.0), TypeError, r"num_rows: expected an int in \[1, 134217727\]"),
    (dict(num_rows=0), ValueError, r"num_rows: expected an int in \[1, 134217727\]"),
    (dict(num_rows=2**27), ValueError, r"num_rows: expected an int in \[1, 134217727\], got 134217728"),
    (dict(image_first_t_max=True), TypeError, "image_first_t_max"),
    (dict(seq_len=16.0), TypeError, "seq_len: expected an int"),
    (dict(seq_len=2**40), ValueError, "seq_len: expected an int in"),
    (dict(config=dict(dim=32)), TypeError, "config: expected a TransfusionConfig, got dict"),
])
def test_packer_argument_errors_follow_the_type_value_rule(kwargs, error, message):
    arguments = dict(config=CONFIG, seq_len=16) | kwargs
    with pytest.raises(error, match=message):
        tc.Packer(arguments.pop("config"), arguments.pop("seq_len"), **arguments)


def test_largest_seed_and_float64_images_are_packed():
    batch = tc.Packer(CONFIG, 16, seed=2**64 - 1)([[[1, 2], torch.randn(3, 2, 2, dtype=torch.float64)]])
    assert batch.patches.dtype == torch.float32 and batch.num_images == 1


def test_patchify_round_trip():
    image = torch.randn(2, 3, 4, 6)
    patches = patchify(image, 2)
    assert patches.shape == (2, 6, 12)
    torch.testing.assert_close(patches[0, 1], image[0, :, 0:2, 2:4].flatten())  # raster order
    assert torch.equal(unpatchify(patches, (2, 3), 2), image)


def test_byte_tokenizer_round_trip():
    tokenizer = tc.ByteTokenizer()
    tokens = tokenizer.encode("a red circle, été")
    assert max(tokens) < 256
    assert tokenizer.decode(tokens + [tokenizer.eos_id]) == "a red circle, été"
    assert tokenizer.vocab_size == CONFIG.vocab_size and tokenizer.boi_id == CONFIG.boi_id


# ------------------------------------------------------------------ retrieval augmentation
def brute_force_retrieval_rows(groups, seq_len, retrieval_mask):
    """Brute force: first fit of the groups (retrieved documents, then their document), as one list per
    row of positions ``(item, span, document, position in span)``; an item is a token id or
    ``(image number in the batch, patch index)``, with ``images`` the patches of every image in order."""
    rows, used, images = [], [], []
    for group in groups:
        laid_out = [layout(document) for document in group]
        length = sum(len(positions) for positions, _ in laid_out)
        r = next((r for r in range(len(rows)) if used[r] + length <= seq_len), len(rows))
        if r == len(rows):
            rows.append([])
            used.append(0)
        rows[r].append(laid_out)
        used[r] += length
    filled = []
    for row in rows:
        positions_of_row, span, document = [], -1, 0
        for laid_out in row:
            for k, (positions, document_images) in enumerate(laid_out):
                if k == 0 or retrieval_mask == "separate":
                    span += 1
                    span_start = len(positions_of_row)
                first_image = len(images)
                images += document_images
                for item in positions:
                    item = (first_image + item[0], item[1]) if isinstance(item, tuple) else item
                    positions_of_row.append((item, span, document, len(positions_of_row) - span_start))
                document += 1
        filled.append(positions_of_row)
    return filled, images


@pytest.mark.parametrize("retrieval_mask", ["visible", "separate"])
def test_retrieved_documents_are_packed_and_masked_as_the_option_says(retrieval_mask):
    """Random documents with 0-3 retrieved documents each, against a brute-force packing: tokens,
    patches, spans, positions, targets and the mask, position by position (the mask also pair by pair
    from its definition: same span, and the key not after the query unless both are one image)."""
    generator = torch.Generator().manual_seed(11)
    seq_len = 96
    documents, retrieved = [], []
    while len(documents) < 24:
        group = [random_document(generator) for _ in range(int(torch.randint(1, 5, (), generator=generator)))]
        if sum(len(layout(document)[0]) for document in group) <= seq_len:
            retrieved.append(group[:-1])
            documents.append(group[-1])
    batch = tc.Packer(CONFIG, seq_len, retrieval_mask=retrieval_mask, seed=2)(documents, retrieved=retrieved)
    rows, images = brute_force_retrieval_rows([r + [d] for r, d in zip(retrieved, documents)], seq_len,
                                              retrieval_mask)
    assert sum(len(r) for r in retrieved) >= 20 and batch.tokens.shape == (len(rows), seq_len)
    assert batch.num_images == len(images)
    dense = batch.mask.to_dense()
    for r, row in enumerate(rows):
        span = torch.full((seq_len,), -1)
        image = torch.zeros(seq_len, dtype=torch.int64)
        for q, (item, span_q, document, position) in enumerate(row):
            span[q] = span_q
            if isinstance(item, tuple):
                image[q] = 1 + item[0]
                lo = int(batch.patch_offsets[item[0]])
                assert int(batch.image_ids[r, q]) == 1 + item[0]
                assert torch.equal(batch.patches[lo + item[1]], images[item[0]][item[1]])
            else:
                assert int(batch.tokens[r, q]) == item and int(batch.image_ids[r, q]) == 0
            assert int(batch.doc_ids[r, q]) == span_q and int(batch.positions[r, q]) == position
            following = row[q + 1] if q + 1 < len(row) else None
            text_follows = following is not None and following[2] == document and isinstance(following[0], int)
            expected = following[0] if isinstance(item, int) and text_follows else tc.IGNORE_INDEX
            assert int(batch.targets[r, q]) == expected, (r, q)
        assert (batch.doc_ids[r, len(row):] == -1).all() and (batch.targets[r, len(row):] == tc.IGNORE_INDEX).all()
        q, k = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
        same_image = (image[:, None] == image[None, :]) & (image[:, None] != 0)
        expected_mask = (span[:, None] == span[None, :]) & (span[:, None] >= 0) & ((k <= q) | same_image)
        assert torch.equal(dense[r], expected_mask)
        if retrieval_mask == "separate":  # the same mask as packing every document on its own
            assert torch.equal(dense[r], brute_force_mask(batch, r))


@pytest.mark.usefixtures("reference_path")
def test_visible_retrieval_shows_the_retrieved_documents_to_the_document_and_separate_does_not():
    """The option in the model: the document's hidden states depend on its retrieved documents when they are
    visible, and are bit-identical whatever was retrieved when they are separate."""
    from tests.transfusion_core.support import tiny_config

    config = tiny_config()
    torch.manual_seed(0)
    model = tc.Transfusion(config).eval()
    document = [[5, 6, 7], torch.randn(3, 4, 4)]
    retrieved_a = [[[1, 2, 3], torch.randn(3, 4, 4)], [[40, 41]]]
    retrieved_b = [[[9, 8, 7], torch.randn(3, 4, 4)], [[50, 51]]]
    for retrieval_mask, depends in (("visible", True), ("separate", False)):
        hidden = []
        for retrieved in (retrieved_a, retrieved_b):
            batch = tc.Packer(config, 48, retrieval_mask=retrieval_mask, seed=0)([document], retrieved=[retrieved])
            batch.timesteps.fill_(300)
            with torch.no_grad():
                h, _ = model.predict(batch, batch.patches)
            start = 1 + 3 + 1 + 4 + 1 + 1 + 1 + 2 + 1  # the retrieved documents' positions
            hidden.append(h[0, start:start + 1 + 3 + 1 + 4 + 1 + 1])
        assert torch.equal(hidden[0], hidden[1]) != depends, retrieval_mask


def test_retrieved_images_read_by_the_document_get_the_image_first_cap():
    image = torch.randn(3, 2, 2)
    documents = [[[5, 6], image] for _ in range(60)]
    retrieved = [[[image]] for _ in range(60)]  # an image alone: nothing of its own document follows it
    for retrieval_mask, capped in (("visible", True), ("separate", False)):
        batch = tc.Packer(CONFIG, 32, image_first_t_max=0, retrieval_mask=retrieval_mask, seed=0)(
            documents, retrieved=retrieved)
        retrieved_t, document_t = batch.timesteps[0::2], batch.timesteps[1::2]  # row-major: retrieved image first
        assert bool((retrieved_t == 0).all()) == capped, retrieval_mask
        assert int(document_t.max()) > 500  # a caption-first document's image is not capped


def test_retrieval_truncation_drops_the_first_listed_retrieved_documents_first():
    packer = tc.Packer(CONFIG, 16, truncate=True)
    # Lengths: the document 6, the retrieved documents 5, 6 and 4: 21 positions, one drop makes 16.
    batch = packer([[[1, 2, 3, 4]]], retrieved=[[[[7, 7, 7]], [[8, 8, 8, 8]], [[9, 9]]]])
    assert batch.tokens[0].tolist() == [BOS, 8, 8, 8, 8, EOS, BOS, 9, 9, EOS, BOS, 1, 2, 3, 4, EOS]
    # Nothing retrieved fits: all go, then the document itself is cut.
    batch = packer([[list(range(20))]], retrieved=[[[[7]]]])
    assert batch.tokens[0].tolist() == [BOS] + list(range(15))
    with pytest.raises(ValueError, match=r"documents\[0\] and its 3 retrieved documents: take 21 positions.*"
                                         r"seq_len=16.*truncate=True"):
        tc.Packer(CONFIG, 16)([[[1, 2, 3, 4]]], retrieved=[[[[7, 7, 7]], [[8, 8, 8, 8]], [[9, 9]]]])


def test_no_retrieval_packs_as_before():
    generator = torch.Generator().manual_seed(5)
    documents = [random_document(generator) for _ in range(12)]
    plain = tc.Packer(CONFIG, 64, caption_first_prob=0.5, seed=3)(documents)
    for retrieved in (None, [[] for _ in documents]):
        for retrieval_mask in ("visible", "separate"):
            batch = tc.Packer(CONFIG, 64, caption_first_prob=0.5, retrieval_mask=retrieval_mask, seed=3)(
                documents, retrieved=retrieved)
            for name in ("tokens", "positions", "targets", "doc_ids", "image_ids", "patches", "timesteps"):
                assert torch.equal(getattr(batch, name), getattr(plain, name)), name
            assert batch.noise_seed == plain.noise_seed


@pytest.mark.parametrize("retrieved, retrieval_mask, error, message", [
    ([[], []], "visible", ValueError, r"retrieved: expected one list of retrieved documents per document \(1\), got 2"),
    ("abc", "visible", TypeError, "retrieved: expected None or one list of documents per document, got str"),
    ([torch.tensor([1])], "visible", TypeError, r"retrieved\[0\]: expected a list of documents .*got Tensor"),
    ([[[[1, 300]]]], "visible", ValueError, r"retrieved\[0\]\[0\]\[0\]: token ids must lie in"),
    ([["text"]], "visible", TypeError, r"retrieved\[0\]\[0\]: expected a list of token-id lists"),
    (None, "both", ValueError, r"retrieval_mask: expected one of \('visible', 'separate'\), got 'both'"),
    (None, True, TypeError, "retrieval_mask: expected a str"),
])
def test_bad_retrieval_arguments_are_named(retrieved, retrieval_mask, error, message):
    with pytest.raises(error, match=message):
        tc.Packer(CONFIG, 64, retrieval_mask=retrieval_mask)([[[1, 2]]], retrieved=retrieved)


# ------------------------------------------------------------------------------ clean image copies
def brute_force_clean_copies_mask(batch, row):
    """The Transfusion mask of the row, with each noisy copy seen by no position outside it."""
    dense = brute_force_mask(batch, row)
    hidden = batch.hidden_ids[row]
    outside = hidden[:, None] != hidden[None, :]  # [q, k]: q is not in k's noisy copy
    return dense & ~((hidden != 0)[None, :] & outside)


def test_clean_image_copies_pack_each_image_twice():
    """Each image: its noisy copy (a hidden span, its drawn t), then its clean copy (t = 0, listed in clean_images)
    at the same RoPE positions and with the same patches. Without the clean copies the row is the plain packing of
    the document: tokens, targets, positions, noisy patches and their timesteps (the same draws)."""
    generator = torch.Generator().manual_seed(3)
    checked = 0
    for _ in range(12):
        document = random_document(generator)
        plain = tc.Packer(CONFIG, 96, seed=4)([document])
        batch = tc.Packer(CONFIG, 96, seed=4, clean_image_copies=True)([document])
        assert batch.num_images == 2 * plain.num_images
        assert batch.clean_images.tolist() == list(range(1, batch.num_images, 2))
        assert torch.equal(batch.timesteps[0::2], plain.timesteps) and (batch.timesteps[1::2] == 0).all()
        assert batch.noise_seed == plain.noise_seed
        for i in range(plain.num_images):
            lo, mid, hi = batch.patch_offsets[2 * i:2 * i + 3].tolist()
            assert torch.equal(batch.patches[lo:mid], batch.patches[mid:hi])
        assert torch.equal(batch.mask.to_dense()[0], brute_force_clean_copies_mask(batch, 0))
        image, hidden = batch.image_ids[0], batch.hidden_ids[0]
        assert torch.equal(hidden != 0, (image % 2 == 1)), "the first copy of each image is hidden"
        clean = (image != 0) & (hidden == 0)
        for name in ("tokens", "targets", "positions", "doc_ids"):
            ours = getattr(batch, name)[0][~clean]
            assert torch.equal(ours[:96 - int(clean.sum())], getattr(plain, name)[0][:96 - int(clean.sum())]), name
        for q in torch.nonzero(clean).flatten().tolist():
            patches = int(batch.patch_offsets[int(image[q])] - batch.patch_offsets[int(image[q]) - 1])
            assert int(batch.positions[0, q]) == int(batch.positions[0, q - patches]), "the noisy copy's position"
        checked += plain.num_images
    assert checked >= 6
    assert not plain.mask.has_holes and (plain.hidden_ids == 0).all() and plain.clean_images.numel() == 0
    assert batch.mask.has_holes and batch.clean_images.dtype == torch.int64


def test_clean_image_copies_count_twice_against_the_row():
    image = torch.randn(3, 4, 4)  # 4 patches
    document = [[1, 2], image]  # BOS, 2 tokens, BOI, 4 patches, EOI, EOS: 10 positions; 14 with a clean copy
    assert tc.Packer(CONFIG, 10)([document]).tokens.shape[0] == 1
    with pytest.raises(ValueError, match=r"documents\[0\]: takes 14 positions"):
        tc.Packer(CONFIG, 10, clean_image_copies=True)([document])
    truncated = tc.Packer(CONFIG, 12, clean_image_copies=True, truncate=True)([document])
    assert truncated.num_images == 0, "an image whose two copies do not fit is dropped whole"
    with pytest.raises(TypeError, match=r"clean_image_copies: expected a bool, got 1"):
        tc.Packer(CONFIG, 10, clean_image_copies=1)
