"""Helpers for testing code that uses tfkernels, shared by this project's tests and benchmarks.

Assertions:

- ``max_error(x, ref)``: the largest absolute difference, in float64;
- ``assert_anchored(name, ours, ref64, lowp)``: the anchored tolerance the kernels' own tests use:
  an implementation in a low-precision dtype is within twice the error that eager PyTorch makes in
  the same dtype, plus a few ulps. No hand-tuned ``atol``/``rtol`` per test, and a bound that
  tightens by itself when the dtype or the inputs make eager code more precise.

Random layouts of packed Transfusion rows (in the form ``IntervalMask.from_spans`` takes:
``images`` a sorted list of ``(start, end)`` bidirectional spans per row, ``documents`` the lengths
of the documents packed from position 0, what follows them being padding):

- ``random_row_layout`` / ``random_layout``: irregular rows that hit the mask's edge cases;
- ``random_hidden_layout``: the same rows with some spans hidden (``from_spans``' ``hidden``);
- ``packed_transfusion_layout``: fully packed rows of a fixed composition (the benchmark workloads);
- ``segment_ids_from_layout`` (from ``tfkernels.mask``): the same layout as segment-id tensors.
"""

from __future__ import annotations

import random

import torch

from ._checks import check_float, check_int
from .mask import segment_ids_from_layout

__all__ = ["assert_anchored", "max_error", "packed_transfusion_layout", "random_hidden_layout", "random_layout",
           "random_row_layout", "segment_ids_from_layout"]


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |x - ref|`` computed in float64 (0.0 for empty tensors)."""
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_anchored(name: str, ours: torch.Tensor, ref64: torch.Tensor, lowp: torch.Tensor,
                    magnitude: float = 0.0) -> None:
    """Assert that ``ours`` is as close to the exact result as eager PyTorch in ``ours``' dtype is.

    Passes when ``ours`` is finite everywhere and

        max |ours - ref64| <= 2 * max |lowp - ref64| + 4 * eps * max(1, max |ref64|, magnitude)

    Args:
        name: what is compared, for the failure message (e.g. ``"dq"``).
        ours: the result under test, in a float dtype whose ``eps`` sets the ulp term.
        ref64: the same computation in float64 (the reference, on float64 inputs).
        lowp: the same computation done the usual eager way in ``ours``' dtype, on the same inputs:
            its error is the anchor.
        magnitude: the scale of terms that cancel into a small result (e.g. the largest gradient
            when a gradient sums terms that cancel to ~0), so that its ulps are allowed.

    Raises:
        AssertionError naming ``name``, the error and the bound.
    """
    eps = torch.finfo(ours.dtype).eps
    error = max_error(ours, ref64)
    largest = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = 2 * max_error(lowp, ref64) + 4 * eps * max(1.0, largest, magnitude)
    # Raised, not asserted: the check must hold under ``python -O`` too.
    if not error <= bound:  # also when the error is NaN
        raise AssertionError(f"{name}: max error {error:.3g} > bound {bound:.3g}")
    if not torch.isfinite(ours).all():
        raise AssertionError(f"{name}: not finite")


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


def random_hidden_layout(rng: random.Random, batch_size: int, seq_len: int, *, hidden_probability: float = 0.5,
                         **kwargs):
    """``random_layout``'s rows with each bidirectional span hidden with probability ``hidden_probability``:
    ``(images, documents, hidden)`` as ``IntervalMask.from_spans`` takes them. So a row holds several hidden
    spans per document, one-token and adjacent hidden spans, hidden spans next to images, and documents
    that are one hidden span."""
    check_float("hidden_probability", hidden_probability, 0, 1)
    images, documents = random_layout(rng, batch_size, seq_len, **kwargs)
    hidden = [[] for _ in images]
    for row, spans in enumerate(images):
        kept = []
        for span in spans:
            (hidden[row] if rng.random() < hidden_probability else kept).append(span)
        images[row] = kept
    return images, documents, hidden


def packed_transfusion_layout(
    rng: random.Random,
    batch_size: int,
    seq_len: int,
    *,
    doc_len: tuple[int, int] = (512, 2048),
    caption_len: tuple[int, int] = (20, 200),
    image_len: int = 256,
    image_fraction: float = 0.5,
    clean_copies: bool = False,
):
    """Fully packed rows of a fixed composition (the benchmark workloads): ``(images, documents)``;
    with ``clean_copies``, ``(images, documents, hidden)``.

    Every row is filled with documents of ``doc_len`` tokens (uniform; a row's last document takes
    what is left, between ``doc_len[0]`` and ``2 * doc_len[0]`` tokens, so no row is padded and no
    document is a stub). A document is text runs of ``caption_len`` tokens with images of
    ``image_len`` patches between them: an image follows a run while the row's image share is
    below ``image_fraction`` and the document has room for the image and ``caption_len[0]`` more
    tokens, so every document starts and ends with text and about ``image_fraction`` of the row's
    tokens are image patches. With ``clean_copies`` (BAGEL-style training rows) each image is there
    twice, a noisy copy (a hidden span) followed by its clean copy (an image span), both counted as
    image patches. Only ``rng`` draws, so a seed fixes the layout.
    """
    if not 1 <= doc_len[0] <= doc_len[1]:
        raise ValueError(f"doc_len: expected 1 <= low <= high, got {doc_len!r}")
    if not 1 <= caption_len[0] <= caption_len[1]:
        raise ValueError(f"caption_len: expected 1 <= low <= high, got {caption_len!r}")
    check_int("image_len", image_len, 1)
    check_float("image_fraction", image_fraction, 0, 1)
    copies = 2 if clean_copies else 1
    images, documents, hidden = [], [], []
    for _ in range(batch_size):
        row_images, row_documents, row_hidden = [], [], []
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
                room = doc_end - pos >= copies * image_len + caption_len[0]
                if room and image_tokens < image_fraction * pos:
                    if clean_copies:
                        row_hidden.append((pos, pos + image_len))
                        pos += image_len
                    row_images.append((pos, pos + image_len))
                    image_tokens += copies * image_len
                    pos += image_len
            row_documents.append(length)
            doc_start = doc_end
        images.append(row_images)
        documents.append(row_documents)
        hidden.append(row_hidden)
    return (images, documents, hidden) if clean_copies else (images, documents)
