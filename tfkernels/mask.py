"""The attention mask as one key interval per query row.

Transfusion attention is causal over the sequence, bidirectional inside each image, and blind
across packed documents. For every query row ``q`` the visible keys are one contiguous interval

    visible(q) = [kv_start(q), kv_end(q))

and both bounds never decrease as ``q`` grows. The same two ``int32 [B, Sq]`` vectors express
causal, full, prefix-LM, sliding-window, packed-document and KV-cache decoding masks. Because the
bounds are monotone, each key column is also seen by one contiguous interval of queries
(``key_intervals``), which is what the backward pass walks.

Rectangular masks (``Sq != Sk``) are bottom-right aligned, as in FlashAttention: query row ``i``
sits at absolute position ``i + Sk - Sq``, so the last query is the last key's position.

Padding tokens see nothing: their interval is empty, ``[p, p)`` at their own position ``p`` (which
keeps both bounds monotone wherever the padding sits). Their attention output is zero.

Holds ``IntervalMask`` and ``segment_ids_from_layout``, which turns a layout of span lists (as
``IntervalMask.from_spans`` takes it) into the per-token segment ids ``from_segment_ids`` takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import check_int, is_int, is_int_dtype

__all__ = ["IntervalMask", "segment_ids_from_layout"]


def _positions(seq_len_q: int, seq_len_k: int, device) -> torch.Tensor:
    """Absolute key-space position of each query row, bottom-right aligned: ``[Sq]`` int64."""
    return torch.arange(seq_len_q, device=device) + (seq_len_k - seq_len_q)


def _check_shape(batch_size, seq_len_q, seq_len_k) -> int:
    """The constructors' sizes: ints >= 0. Returns ``seq_len_k`` (``seq_len_q`` when ``None``)."""
    check_int("batch_size", batch_size, 0)
    check_int("seq_len_q", seq_len_q, 0)
    return seq_len_q if seq_len_k is None else check_int("seq_len_k", seq_len_k, 0)


class IntervalMask:
    """Per-query key interval ``[kv_start, kv_end)``.

    Attributes:
        kv_start: int32 ``[B, Sq]``, first visible key of each query row.
        kv_end: int32 ``[B, Sq]``, one past the last visible key.
        seq_len_k: number of keys ``Sk``.

    Build one with a constructor (``causal``, ``full``, ``prefix_lm``, ``sliding_window``,
    ``from_spans``, ``from_segment_ids``) or directly from two tensors; ``validate()`` checks the
    contract and every public op calls it before any kernel launch.
    """

    def __init__(self, kv_start: torch.Tensor, kv_end: torch.Tensor, seq_len_k: int):
        self.kv_start = kv_start
        self.kv_end = kv_end
        self.seq_len_k = seq_len_k
        # Value checks read the tensors back to the host; once a mask passed them, later calls
        # (every layer of a model uses the same mask) skip the sync.
        self._values_checked = False

    # ------------------------------------------------------------------ shape helpers
    @property
    def batch_size(self) -> int:
        return self.kv_start.shape[0]

    @property
    def seq_len_q(self) -> int:
        return self.kv_start.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_start.device

    def __repr__(self) -> str:
        return (
            f"IntervalMask(batch_size={self.batch_size}, seq_len_q={self.seq_len_q}, "
            f"seq_len_k={self.seq_len_k}, device={self.device})"
        )

    def to(self, device) -> IntervalMask:
        """The same mask with its tensors on ``device``."""
        return IntervalMask(self.kv_start.to(device), self.kv_end.to(device), self.seq_len_k)

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def _from_bounds(start: torch.Tensor, end: torch.Tensor, batch_size: int, seq_len_k: int):
        """Broadcast ``[Sq]`` or ``[B, Sq]`` int64 bounds to an int32 ``[B, Sq]`` mask."""
        seq_len_q = start.shape[-1]
        start = start.expand(batch_size, seq_len_q).to(torch.int32).contiguous()
        end = end.expand(batch_size, seq_len_q).to(torch.int32).contiguous()
        return IntervalMask(start, end, seq_len_k)

    @classmethod
    def causal(cls, batch_size: int, seq_len_q: int, seq_len_k: int | None = None, *, device=None):
        """Causal mask; with ``seq_len_k > seq_len_q`` the queries are the last ``seq_len_q``
        positions (KV-cache decoding). Rows placed before key 0 (``Sq > Sk``) see nothing."""
        seq_len_k = _check_shape(batch_size, seq_len_q, seq_len_k)
        end = (_positions(seq_len_q, seq_len_k, device) + 1).clamp(min=0)
        return cls._from_bounds(torch.zeros_like(end), end, batch_size, seq_len_k)

    @classmethod
    def full(cls, batch_size: int, seq_len_q: int, seq_len_k: int | None = None, *, device=None):
        """Every query sees every key (bidirectional encoder, DiT, cross-attention)."""
        seq_len_k = _check_shape(batch_size, seq_len_q, seq_len_k)
        start = torch.zeros(seq_len_q, dtype=torch.int64, device=device)
        return cls._from_bounds(start, start + seq_len_k, batch_size, seq_len_k)

    @classmethod
    def prefix_lm(
        cls,
        prefix_len,
        batch_size: int,
        seq_len_q: int,
        seq_len_k: int | None = None,
        *,
        device=None,
    ):
        """Bidirectional over the first ``prefix_len`` keys, causal after them.

        ``prefix_len`` is an int or one int per row (list or ``[B]`` tensor).
        """
        seq_len_k = _check_shape(batch_size, seq_len_q, seq_len_k)
        prefix = torch.as_tensor(prefix_len, device=device)
        if not is_int_dtype(prefix.dtype):
            raise TypeError(f"prefix_len: expected an int or a [batch_size] int list, got {prefix_len!r}")
        if prefix.ndim > 1:
            raise ValueError(f"prefix_len: expected an int or a [batch_size] int list, got {prefix_len!r}")
        if prefix.ndim == 1 and prefix.shape[0] != batch_size:
            raise ValueError(f"prefix_len: expected {batch_size} values (one per row), got {prefix.shape[0]}")
        if bool(((prefix < 0) | (prefix > seq_len_k)).any()):
            raise ValueError(f"prefix_len: expected values in [0, seq_len_k={seq_len_k}], got {prefix_len!r}")
        pos = _positions(seq_len_q, seq_len_k, device)
        end = torch.maximum(prefix.to(torch.int64).reshape(-1, 1), pos + 1).clamp(max=seq_len_k)
        end = torch.where(pos + 1 > 0, end, 0)  # rows placed before key 0 see nothing, as in causal
        end = end.expand(batch_size, seq_len_q)
        return cls._from_bounds(torch.zeros_like(end), end, batch_size, seq_len_k)

    @classmethod
    def sliding_window(
        cls,
        window: int,
        batch_size: int,
        seq_len_q: int,
        seq_len_k: int | None = None,
        *,
        device=None,
    ):
        """Causal with a window: position ``p`` sees ``[p - window + 1, p]`` (``window`` keys,
        itself included)."""
        check_int("window", window, 1)
        seq_len_k = _check_shape(batch_size, seq_len_q, seq_len_k)
        pos = _positions(seq_len_q, seq_len_k, device)
        end = (pos + 1).clamp(min=0)
        start = (pos + 1 - window).clamp(min=0).minimum(end)
        return cls._from_bounds(start, end, batch_size, seq_len_k)

    @classmethod
    def from_spans(
        cls,
        seq_len: int,
        images: Sequence[Sequence[tuple[int, int]]] | None = None,
        documents: Sequence[Sequence[int]] | None = None,
        *,
        device=None,
    ):
        """Square Transfusion mask from Python lists, one entry per batch row.

        Args:
            seq_len: row length ``S``.
            images: per row, the bidirectional image spans ``(start, end)`` in token positions,
                sorted, not overlapping, each inside one document. ``None``: no images.
            documents: per row, the document lengths, packed from position 0; positions past
                the last document are padding and see nothing. ``None``: one document per row.
        """
        check_int("seq_len", seq_len, 0)
        if images is None and documents is None:
            raise ValueError("from_spans: give images, documents or both (one list per batch row)")
        batch_size = len(images) if images is not None else len(documents)
        if images is not None and documents is not None and len(images) != len(documents):
            raise ValueError(
                f"from_spans: images has {len(images)} rows but documents has {len(documents)}"
            )
        starts, ends = [], []
        for row in range(batch_size):
            doc_lens = [seq_len] if documents is None else list(documents[row])
            spans = [] if images is None else [tuple(s) for s in images[row]]
            start, end = cls._row_from_spans(row, seq_len, spans, doc_lens)
            starts.append(start)
            ends.append(end)
        return IntervalMask(
            torch.tensor(starts, dtype=torch.int32, device=device).reshape(batch_size, seq_len),
            torch.tensor(ends, dtype=torch.int32, device=device).reshape(batch_size, seq_len),
            seq_len,
        )

    @staticmethod
    def _row_from_spans(row: int, seq_len: int, spans, doc_lens):
        for length in doc_lens:
            if not is_int(length, 0):
                error = ValueError if is_int(length) else TypeError
                raise error(f"documents[{row}]: expected non-negative int lengths, got {doc_lens!r}")
        if sum(doc_lens) > seq_len:
            raise ValueError(
                f"documents[{row}]: lengths sum to {sum(doc_lens)}, more than seq_len={seq_len}"
            )
        start = list(range(seq_len))  # padding default: the empty interval [p, p)
        end = list(range(seq_len))
        doc_of = [-1] * seq_len
        offset = 0
        for doc, length in enumerate(doc_lens):
            for p in range(offset, offset + length):
                start[p], end[p], doc_of[p] = offset, p + 1, doc
            offset += length
        previous_end = 0
        for i, span in enumerate(spans):
            if len(span) != 2:
                raise ValueError(f"images[{row}][{i}]: expected a (start, end) pair, got {span!r}")
            s, e = span
            if not (is_int(s, 0) and is_int(e, 0, seq_len) and s < e):
                raise (ValueError if is_int(s) and is_int(e) else TypeError)(
                    f"images[{row}][{i}]: expected 0 <= start < end <= seq_len={seq_len}, got {span!r}"
                )
            if s < previous_end:
                raise ValueError(
                    f"images[{row}][{i}]: span {span!r} overlaps or precedes the previous span "
                    f"(spans must be sorted and disjoint)"
                )
            if doc_of[s] < 0 or doc_of[e - 1] != doc_of[s]:
                raise ValueError(f"images[{row}][{i}]: span {span!r} is not inside one document")
            for p in range(s, e):
                end[p] = e
            previous_end = e
        return start, end

    @classmethod
    def from_segment_ids(cls, doc_ids: torch.Tensor, image_ids: torch.Tensor | None = None):
        """Square Transfusion mask from per-token segment ids, vectorised (no host sync).

        Args:
            doc_ids: int ``[B, S]``; a run of equal values is one document, a negative value
                marks padding (sees nothing, seen by nothing).
            image_ids: int ``[B, S]`` or ``None``; 0 for text, and a run of equal non-zero values
                inside one document is one bidirectional image span.
        """
        if not isinstance(doc_ids, torch.Tensor) or doc_ids.ndim != 2:
            error = ValueError if isinstance(doc_ids, torch.Tensor) else TypeError
            raise error(f"doc_ids: expected an int tensor [B, S], got {_describe(doc_ids)}")
        if not is_int_dtype(doc_ids.dtype):
            raise TypeError(f"doc_ids: expected an integer dtype, got {doc_ids.dtype}")
        if image_ids is None:
            image_ids = torch.zeros_like(doc_ids)
        if not isinstance(image_ids, torch.Tensor) or image_ids.shape != doc_ids.shape:
            error = ValueError if isinstance(image_ids, torch.Tensor) else TypeError
            raise error(f"image_ids: expected a tensor of doc_ids' shape {tuple(doc_ids.shape)}, "
                        f"got {_describe(image_ids)}")
        if not is_int_dtype(image_ids.dtype):
            raise TypeError(f"image_ids: expected an integer dtype, got {image_ids.dtype}")
        if image_ids.device != doc_ids.device:
            raise ValueError(f"image_ids: expected device {doc_ids.device}, got {image_ids.device}")
        batch_size, seq_len = doc_ids.shape
        device = doc_ids.device
        pos = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
        if seq_len == 0:
            empty = torch.zeros(batch_size, 0, dtype=torch.int32, device=device)
            return IntervalMask(empty, empty.clone(), 0)
        doc_ids = doc_ids.long()
        image_ids = image_ids.long()
        # Document start: the latest position where the doc id changed (a running max).
        doc_begins = torch.ones_like(doc_ids, dtype=torch.bool)
        doc_begins[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        doc_start = torch.where(doc_begins, pos, torch.zeros_like(pos)).cummax(dim=1).values
        # Image end: the next position where (doc id, image id) changes (a reversed running min).
        run_ends = torch.ones_like(doc_ids, dtype=torch.bool)
        run_ends[:, :-1] = (doc_ids[:, 1:] != doc_ids[:, :-1]) | (image_ids[:, 1:] != image_ids[:, :-1])
        next_change = torch.where(run_ends, pos + 1, torch.full_like(pos, seq_len))
        run_end = next_change.flip(1).cummin(dim=1).values.flip(1)
        is_image = image_ids != 0
        start = doc_start
        end = torch.where(is_image, run_end, pos + 1)
        padding = doc_ids < 0
        start = torch.where(padding, pos, start)
        end = torch.where(padding, pos, end)
        return IntervalMask(start.to(torch.int32), end.to(torch.int32), seq_len)

    # ------------------------------------------------------------------ views
    def slice_queries(self, start: int, end: int) -> IntervalMask:
        """Rows ``[start, end)`` against the keys up to the last of them (bottom-right aligned).

        This is the mask of a KV-cache step: with a square mask for the whole sequence, the
        queries at positions ``[start, end)`` attend to the ``end`` cached and new keys.
        """
        check_int("start", start, 0)
        check_int("end", end, 0)
        if not start <= end <= self.seq_len_q:
            raise ValueError(
                f"slice_queries: expected 0 <= start <= end <= seq_len_q={self.seq_len_q}, "
                f"got start={start}, end={end}"
            )
        seq_len_k = end + self.seq_len_k - self.seq_len_q
        if seq_len_k < 0:
            raise ValueError(f"slice_queries: rows [{start}, {end}) lie before key 0")
        sliced = IntervalMask(
            self.kv_start[:, start:end].contiguous(), self.kv_end[:, start:end].contiguous(), seq_len_k
        )
        sliced.validate()
        return sliced

    def to_dense(self) -> torch.Tensor:
        """bool ``[B, Sq, Sk]``: ``True`` where the query sees the key."""
        keys = torch.arange(self.seq_len_k, device=self.device)
        return (keys >= self.kv_start[..., None]) & (keys < self.kv_end[..., None])

    def to_flex_block_mask(self, block_size: int = 128):
        """torch's ``BlockMask`` for ``flex_attention`` (interop and benchmarks)."""
        from torch.nn.attention.flex_attention import create_block_mask

        kv_start, kv_end = self.kv_start, self.kv_end
        last_row = self.seq_len_q - 1

        def mask_mod(b, h, q_idx, kv_idx):
            # create_block_mask evaluates whole blocks, so q_idx may run past Sq.
            row = q_idx.clamp(max=last_row)
            return (kv_idx >= kv_start[b, row]) & (kv_idx < kv_end[b, row]) & (q_idx <= last_row)

        return create_block_mask(
            mask_mod,
            self.batch_size,
            None,
            self.seq_len_q,
            self.seq_len_k,
            device=self.device,
            BLOCK_SIZE=block_size,
        )

    def key_intervals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-key query interval ``[q_start, q_end)``: int32 ``[B, Sk]`` each, in O(S log S).

        Query ``q`` sees key ``k`` iff ``kv_start(q) <= k < kv_end(q)``; both bounds are sorted,
        so the queries with ``kv_end > k`` start at a ``searchsorted`` and those with
        ``kv_start <= k`` end at another. Keys seen by no query get an empty interval.
        """
        keys = torch.arange(self.seq_len_k, device=self.device, dtype=torch.int32)
        keys = keys.expand(self.batch_size, self.seq_len_k).contiguous()
        q_start = torch.searchsorted(self.kv_end.contiguous(), keys, right=True, out_int32=True)
        q_end = torch.searchsorted(self.kv_start.contiguous(), keys, right=True, out_int32=True)
        return q_start, torch.maximum(q_start, q_end)

    def visible_pairs(self) -> int:
        """Exact number of visible (query, key) pairs over the batch (for FLOP counts)."""
        return int((self.kv_end.long() - self.kv_start.long()).sum())

    # ------------------------------------------------------------------ validation
    def validate(self, *, batch_size=None, seq_len_q=None, seq_len_k=None, device=None) -> IntervalMask:
        """Check the contract: ``TypeError`` for a wrong type or dtype, else ``ValueError`` naming the
        first violation (for values, the first bad batch row and query).

        The optional arguments are what the caller's tensors need (an op passes its q/k shapes).
        Structure (type, dtype, shape, device) is checked on every call; values (range and
        monotonicity) once per mask and not while ``torch.compile`` traces, where they would
        force a host sync and a graph break.
        """
        start, end = self.kv_start, self.kv_end
        for name, t in (("kv_start", start), ("kv_end", end)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"mask.{name}: expected an int32 tensor [B, Sq], got {_describe(t)}")
            if t.dtype != torch.int32:
                raise TypeError(f"mask.{name}: expected dtype torch.int32, got {t.dtype}")
            if t.ndim != 2:
                raise ValueError(f"mask.{name}: expected shape [B, Sq], got {tuple(t.shape)}")
        if start.shape != end.shape:
            raise ValueError(
                f"mask: kv_start {tuple(start.shape)} and kv_end {tuple(end.shape)} differ in shape"
            )
        if start.device != end.device:
            raise ValueError(f"mask: kv_start on {start.device} but kv_end on {end.device}")
        check_int("mask.seq_len_k", self.seq_len_k, 0)
        expected = (("batch_size", batch_size, self.batch_size), ("seq_len_q", seq_len_q, self.seq_len_q),
                    ("seq_len_k", seq_len_k, self.seq_len_k))
        for name, want, have in expected:
            if want is not None and want != have:
                raise ValueError(f"mask.{name}: is {have} but the inputs need {want}")
        if device is not None and torch.device(device) != start.device:
            raise ValueError(f"mask: tensors are on {start.device} but the inputs are on {torch.device(device)}")
        if not self._values_checked and not torch.compiler.is_compiling():
            self._check_values()
            self._values_checked = True
        return self

    def _check_values(self) -> None:
        start, end, sk = self.kv_start, self.kv_end, self.seq_len_k
        checks = [
            ("kv_start", start < 0, "expected kv_start >= 0"),
            ("kv_end", end > sk, f"expected kv_end <= seq_len_k={sk}"),
            ("kv_end", end < start, "expected kv_start <= kv_end"),
            ("kv_start", start[:, 1:] < start[:, :-1], "expected kv_start non-decreasing along queries"),
            ("kv_end", end[:, 1:] < end[:, :-1], "expected kv_end non-decreasing along queries"),
        ]
        if start.numel() == 0:
            return
        failed = torch.stack([bad.any() for _, bad, _ in checks]).tolist()  # one host sync
        for (name, bad, what), is_bad in zip(checks, failed):
            if not is_bad:
                continue
            row, col = bad.nonzero()[0].tolist()
            looks_back = bad.shape[1] != start.shape[1]  # monotonicity compares with the row before
            col += looks_back
            got = f"[{int(start[row, col])}, {int(end[row, col])})"
            if looks_back:
                got += f" after [{int(start[row, col - 1])}, {int(end[row, col - 1])})"
            raise ValueError(f"mask.{name}: batch row {row}, query {col}: {what}, got {got}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {tuple(x.shape)} {x.dtype} on {x.device}"
    return type(x).__name__


def segment_ids_from_layout(seq_len: int, images, documents, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(doc_ids, image_ids)`` int64 ``[B, S]`` tensors of a layout, for ``IntervalMask.from_segment_ids``.

    ``images`` and ``documents`` are per-row lists as ``IntervalMask.from_spans`` takes them, so
    ``from_segment_ids(*segment_ids_from_layout(S, images, documents))`` equals
    ``from_spans(S, images, documents)``. Padding gets doc id -1; image ``i`` of a row gets image id
    ``i + 1``.
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
