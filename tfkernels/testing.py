"""Random packed Transfusion layouts, shared by the tests and the benchmarks.

A layout of one row is ``(images, documents)`` in the form ``IntervalMask.from_spans`` takes:
``images`` a sorted list of ``(start, end)`` bidirectional spans, ``documents`` the lengths of
the documents packed from position 0 (what follows them is padding).
"""

from __future__ import annotations

import random

import torch

__all__ = ["packed_transfusion_layout", "random_row_layout", "random_layout", "segment_ids_from_layout"]


def random_row_layout(
    rng: random.Random,
    seq_len: int,
    *,
    max_documents: int = 4,
    max_image_len: int = 48,
    image_probability: float = 0.5,
    padding: bool = True,
) -> tuple[list[tuple[int, int]], list[int]]:
    """One row: up to ``max_documents`` documents, each an alternation of text runs and images.

    Covers what the mask must get right: images at document starts and ends, one-token images,
    adjacent images, documents with no image, and (when ``padding``) a padded tail.
    """
    used = rng.randint(max(1, seq_len // 2), seq_len) if padding else seq_len
    cuts = sorted(rng.sample(range(1, used), min(max_documents - 1, max(0, used - 1))))
    cuts = cuts[: rng.randint(0, len(cuts))]
    bounds = [0, *cuts, used]
    documents = [b - a for a, b in zip(bounds, bounds[1:])]
    images = []
    for doc_start, doc_end in zip(bounds, bounds[1:]):
        pos = doc_start
        while pos < doc_end:
            if rng.random() < image_probability:
                end = min(doc_end, pos + rng.choice([1, rng.randint(1, max_image_len)]))
                images.append((pos, end))
                pos = end
            else:
                pos = min(doc_end, pos + rng.randint(1, max_image_len))
    return images, documents


def random_layout(rng: random.Random, batch_size: int, seq_len: int, **kwargs):
    """``batch_size`` independent rows: ``(images per row, documents per row)``."""
    rows = [random_row_layout(rng, seq_len, **kwargs) for _ in range(batch_size)]
    return [r[0] for r in rows], [r[1] for r in rows]


def segment_ids_from_layout(seq_len: int, images, documents, device=None):
    """The ``(doc_ids, image_ids)`` tensors of a layout, for ``IntervalMask.from_segment_ids``.

    Padding gets doc id -1; image ``i`` of a row gets image id ``i + 1``.
    """
    doc_ids = torch.full((len(documents), seq_len), -1, dtype=torch.int64)
    image_ids = torch.zeros((len(documents), seq_len), dtype=torch.int64)
    for row, (spans, lengths) in enumerate(zip(images, documents)):
        offset = 0
        for doc, length in enumerate(lengths):
            doc_ids[row, offset : offset + length] = doc
            offset += length
        for i, (start, end) in enumerate(spans):
            image_ids[row, start:end] = i + 1
    return doc_ids.to(device), image_ids.to(device)


def packed_transfusion_layout(
    rng: random.Random,
    batch_size: int,
    seq_len: int,
    *,
    doc_len: tuple[int, int] = (512, 2048),
    caption_len: tuple[int, int] = (20, 200),
    image_len: int = 256,
    image_fraction: float = 0.5,
):
    """Fully packed rows of a fixed composition (the benchmark workloads): ``(images, documents)``.

    Every row is filled with documents of ``doc_len`` tokens (uniform; a row's last document takes
    what is left, between ``doc_len[0]`` and ``2 * doc_len[0]`` tokens, so no row is padded and no
    document is a stub). A document is text runs of ``caption_len`` tokens with images of
    ``image_len`` patches between them: an image follows a run while the row's image share is
    below ``image_fraction`` and the document has room for the image and ``caption_len[0]`` more
    tokens, so every document starts and ends with text and about ``image_fraction`` of the row's
    tokens are image patches. Only ``rng`` draws, so a seed fixes the layout.
    """
    if not 1 <= doc_len[0] <= doc_len[1]:
        raise ValueError(f"doc_len: expected 1 <= low <= high, got {doc_len!r}")
    if not 1 <= caption_len[0] <= caption_len[1]:
        raise ValueError(f"caption_len: expected 1 <= low <= high, got {caption_len!r}")
    if image_len < 1 or not 0 <= image_fraction <= 1:
        raise ValueError(f"image_len >= 1 and 0 <= image_fraction <= 1 expected, got {image_len}, {image_fraction}")
    images, documents = [], []
    for _ in range(batch_size):
        row_images, row_documents = [], []
        image_tokens = 0
        doc_start = 0
        while doc_start < seq_len:
            left = seq_len - doc_start
            if left < 2 * doc_len[0]:  # no room for two documents: this one takes the rest
                length = left
            else:
                length = rng.randint(doc_len[0], min(doc_len[1], left - doc_len[0]))
            doc_end = doc_start + length
            pos = doc_start
            while pos < doc_end:
                pos += min(rng.randint(*caption_len), doc_end - pos)
                room = doc_end - pos >= image_len + caption_len[0]
                if room and image_tokens < image_fraction * pos:
                    row_images.append((pos, pos + image_len))
                    image_tokens += image_len
                    pos += image_len
            row_documents.append(length)
            doc_start = doc_end
        images.append(row_images)
        documents.append(row_documents)
    return images, documents
