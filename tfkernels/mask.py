"""The attention mask as one key interval per query row (docs/design.md#the-mask).

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

Validation policy (what every op taking a mask relies on; docs/design.md#mask-validation):

* In eager mode the values are checked (``validate``) on first use and again whenever ``kv_start``
  or ``kv_end`` changed since the last check: another tensor object (swapped tensors) or a changed
  version counter (``tensor._version``, bumped by every in-place edit through PyTorch, views
  included). An invalid mask raises a ``ValueError`` naming the first bad row, before any launch.
  Edits that bypass the version counter (through ``.data``, a NumPy or DLPack alias) are not seen.
* While ``torch.compile`` traces, values cannot be read back without a graph break, so both the
  kernels and the reference compute with ``canonical_bounds`` of the mask: the identity on every
  valid mask, and a valid mask for every invalid one (bounds made monotone and clamped into
  ``[0, Sk]``; a row whose start passes its end becomes empty). ``TFKERNELS_MASK_ASSERT=1`` (read
  when the graph is traced) adds a device-side assertion that the mask was valid: a
  ``RuntimeError`` on the CPU, a device-side assert on CUDA (fatal for the process's CUDA context).
* Whatever the values, the kernels never touch memory outside their tensors and never loop longer
  than a valid mask of the same shape would make them (they clamp every bound they read).

Constructors from the masks other libraries' users already hold (FlashAttention's ``window_size``,
varlen ``cu_seqlens`` and ``cache_seqlens``, Hugging Face's packed ``position_ids``, SDPA's dense
boolean mask, padded cross-attention keys, packed images) build the same two vectors on the device;
those that take offsets or lengths read them back once to name a bad value, except while
``torch.compile`` traces or a CUDA graph is captured. A varlen packed batch (FlashAttention's
``[total, H, D]``) is one row of our ``[B, S, H, D]`` layout: ``q[None]``, a view.

Rows with holes (hidden spans: BAGEL-style noisy copies that no token outside them sees; docs/design.md#hidden-spans)
keep these row intervals and add one interval per key, ``[key_q_start[k], key_q_end[k])``: the queries allowed to
see key ``k``. Query ``q`` sees key ``k`` iff each lies in the other's interval; every key is still seen by one
interval of queries (``key_intervals``).

Holds ``IntervalMask``, ``NotAnIntervalError`` (a dense mask that intervals cannot express),
``canonical_bounds`` and ``segment_ids_from_layout``, which turns a layout of span lists (as
``IntervalMask.from_spans`` takes it) into the per-token segment ids ``from_segment_ids`` takes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ._checks import check_int, is_int, is_int_dtype

__all__ = ["DenseMaskReader", "IntervalMask", "NotAnIntervalError", "canonical_bounds", "segment_ids_from_layout"]

# Positions are stored as int32: every size and bound must fit.
INT32_MAX = 2**31 - 1


def _positions(seq_len_q: int, seq_len_k: int, device) -> torch.Tensor:
    """Absolute key-space position of each query row, bottom-right aligned: ``[Sq]`` int64."""
    return torch.arange(seq_len_q, device=device) + (seq_len_k - seq_len_q)


def _check_size(name: str, value) -> int:
    """A size: an int in ``[0, 2**31 - 1]`` (the mask stores int32 positions)."""
    return check_int(name, value, 0, INT32_MAX)


def _check_shape(batch_size, seq_len_q, seq_len_k) -> int:
    """The constructors' sizes: ints in ``[0, 2**31 - 1]``. Returns ``seq_len_k`` (``seq_len_q`` when ``None``)."""
    _check_size("batch_size", batch_size)
    _check_size("seq_len_q", seq_len_q)
    return seq_len_q if seq_len_k is None else _check_size("seq_len_k", seq_len_k)


def canonical_bounds(kv_start: torch.Tensor, kv_end: torch.Tensor, seq_len_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid mask nearest to any ``[B, Sq]`` bounds, on the device, with no host sync.

    ``start' = clamp(cummax(start), 0, Sk)`` and ``end' = max(clamp(cummax(end), 0, Sk), start')``
    along the queries: the identity on every valid mask; for an invalid one, bounds that are
    monotone and in range, where a row whose start passes its end becomes empty. Ops compute with
    it while ``torch.compile`` traces (both the kernels and the reference), where ``validate``
    cannot read the values.
    """
    if kv_start.shape[-1] == 0:
        return kv_start, kv_end
    start = kv_start.cummax(dim=-1).values.clamp(0, seq_len_k)
    end = torch.maximum(kv_end.cummax(dim=-1).values.clamp(0, seq_len_k), start)
    return start, end


class IntervalMask:
    """Per-query key interval ``[kv_start, kv_end)``, and for a mask with holes a per-key query interval.

    Attributes:
        kv_start: int32 ``[B, Sq]``, first visible key of each query row.
        kv_end: int32 ``[B, Sq]``, one past the last visible key.
        seq_len_k: number of keys ``Sk``.
        key_q_start, key_q_end: ``None`` (no holes), or int32 ``[B, Sk]`` each: the queries allowed to
            see key ``k`` are ``[key_q_start[k], key_q_end[k])`` (query row indices). Query ``q`` then
            sees key ``k`` iff ``k`` lies in ``q``'s interval and ``q`` in ``k``'s: a hidden span's keys
            get the span itself, every other key ``[0, Sq)``. ``from_spans(..., hidden=...)`` and
            ``from_segment_ids(..., hidden_ids=...)`` build them (docs/design.md#hidden-spans).

    Build one with a constructor (``window`` and its cases ``causal``, ``full`` and ``sliding_window``;
    ``prefix_lm``, ``from_spans``, ``from_segment_ids``; from other libraries' masks: ``from_cu_seqlens``,
    ``from_cache_seqlens``, ``from_key_lengths``, ``block_diagonal``, ``from_position_ids``,
    ``from_dense``) or directly from two tensors; ``validate()`` checks the contract and every public
    op calls it before any kernel launch.
    """

    def __init__(self, kv_start: torch.Tensor, kv_end: torch.Tensor, seq_len_k: int,
                 key_q_start: torch.Tensor | None = None, key_q_end: torch.Tensor | None = None):
        self.kv_start = kv_start
        self.kv_end = kv_end
        self.seq_len_k = seq_len_k
        self.key_q_start = key_q_start
        self.key_q_end = key_q_end
        # Value checks read the tensors back to the host; the state they passed in (tensor objects,
        # version counters, seq_len_k) lets later calls (every layer of a model uses the same mask)
        # skip the sync until something changes.
        self._checked_state = None
        # Checks of the segment ids a constructor read (from_segment_ids' hidden_ids), computed on the
        # device and read back with the value checks, so that building the mask needs no host sync:
        # (argument name, bool [B, S] where the ids break the rule, the rule).
        self._layout_checks: tuple[tuple[str, torch.Tensor, str], ...] = ()

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

    @property
    def has_holes(self) -> bool:
        """Whether some keys are hidden from some queries inside their intervals (``key_q_start`` set)."""
        return self.key_q_start is not None or self.key_q_end is not None

    def __repr__(self) -> str:
        holes = ", holes" if self.has_holes else ""
        return (
            f"IntervalMask(batch_size={self.batch_size}, seq_len_q={self.seq_len_q}, "
            f"seq_len_k={self.seq_len_k}, device={self.device}{holes})"
        )

    def to(self, device) -> IntervalMask:
        """The same mask with its tensors on ``device``."""
        moved = IntervalMask(self.kv_start.to(device), self.kv_end.to(device), self.seq_len_k,
                             *(None if t is None else t.to(device) for t in (self.key_q_start, self.key_q_end)))
        moved._layout_checks = tuple((name, bad.to(device), what) for name, bad, what in self._layout_checks)
        return moved

    def _expand_batch(self, batch_size: int) -> IntervalMask:
        """A batch-1 mask as ``batch_size`` identical rows (views, nothing copied)."""
        keys = (None if t is None else t.expand(batch_size, -1) for t in (self.key_q_start, self.key_q_end))
        return IntervalMask(self.kv_start.expand(batch_size, -1), self.kv_end.expand(batch_size, -1),
                            self.seq_len_k, *keys)

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def _from_bounds(start: torch.Tensor, end: torch.Tensor, batch_size: int, seq_len_k: int):
        """Broadcast ``[Sq]`` or ``[B, Sq]`` int64 bounds to an int32 ``[B, Sq]`` mask."""
        seq_len_q = start.shape[-1]
        start = start.expand(batch_size, seq_len_q).to(torch.int32).contiguous()
        end = end.expand(batch_size, seq_len_q).to(torch.int32).contiguous()
        return IntervalMask(start, end, seq_len_k)

    @classmethod
    def window(
        cls,
        window_size,
        batch_size: int,
        seq_len_q: int,
        seq_len_k: int | None = None,
        *,
        causal: bool = False,
        device=None,
    ):
        """FlashAttention's ``window_size=(left, right)``: the query at position ``p = i + Sk - Sq`` sees
        keys ``p - left`` to ``p + right`` inclusive (clipped to ``[0, Sk)``), ``-1`` meaning unbounded on
        that side. ``causal=True`` sets ``right = 0``, as FlashAttention does. ``(-1, -1)`` is ``full``,
        ``(-1, 0)`` is ``causal`` and ``(w - 1, 0)`` is ``sliding_window(w)``.
        """
        left, right = _check_window_size(window_size, causal)
        seq_len_k = _check_shape(batch_size, seq_len_q, seq_len_k)
        pos = _positions(seq_len_q, seq_len_k, device)
        start, end = _window_bounds(pos, torch.zeros_like(pos), torch.full_like(pos, seq_len_k), left, right)
        return cls._from_bounds(start, end, batch_size, seq_len_k)

    @classmethod
    def causal(cls, batch_size: int, seq_len_q: int, seq_len_k: int | None = None, *, device=None):
        """Causal mask; with ``seq_len_k > seq_len_q`` the queries are the last ``seq_len_q``
        positions (KV-cache decoding). Rows placed before key 0 (``Sq > Sk``) see nothing.
        ``window((-1, 0), ...)``."""
        return cls.window((-1, 0), batch_size, seq_len_q, seq_len_k, device=device)

    @classmethod
    def full(cls, batch_size: int, seq_len_q: int, seq_len_k: int | None = None, *, device=None):
        """Every query sees every key (bidirectional encoder, DiT, cross-attention).
        ``window((-1, -1), ...)``."""
        return cls.window((-1, -1), batch_size, seq_len_q, seq_len_k, device=device)

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
        expected = "an int or a [batch_size] int list"
        try:
            prefix = torch.as_tensor(prefix_len, device=device)
        except ValueError as error:  # an int past int64
            raise ValueError(
                f"prefix_len: expected values in [0, seq_len_k={seq_len_k}], got {prefix_len!r}"
            ) from error
        except (TypeError, RuntimeError) as error:  # None, str, objects
            raise TypeError(f"prefix_len: expected {expected}, got {prefix_len!r}") from error
        if prefix.numel() == 0 and not isinstance(prefix_len, torch.Tensor):
            prefix = prefix.long()  # an empty batch's list, which torch types float32 (it holds no values)
        if not is_int_dtype(prefix.dtype):
            raise TypeError(f"prefix_len: expected {expected}, got {prefix_len!r}")
        if prefix.ndim > 1:
            raise ValueError(f"prefix_len: expected {expected}, got {prefix_len!r}")
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
        itself included). ``window((window - 1, 0), ...)``."""
        check_int("window", window, 1)
        return cls.window((window - 1, 0), batch_size, seq_len_q, seq_len_k, device=device)

    @classmethod
    def from_spans(
        cls,
        seq_len: int,
        images: Sequence[Sequence[tuple[int, int]]] | None = None,
        documents: Sequence[Sequence[int]] | None = None,
        *,
        hidden: Sequence[Sequence[tuple[int, int]]] | None = None,
        device=None,
    ):
        """Square Transfusion mask from Python lists, one entry per batch row:
        ``from_segment_ids(*segment_ids_from_layout(seq_len, images, documents, hidden=hidden))``.

        Args:
            seq_len: row length ``S``.
            images: per row, the bidirectional image spans ``(start, end)`` in token positions,
                sorted, not overlapping, each inside one document. ``None``: no images.
            documents: per row, the document lengths, packed from position 0; positions past
                the last document are padding and see nothing. ``None``: one document per row.
            hidden: per row, the hidden spans ``(start, end)`` (e.g. the noisy copy of an image that
                a clean copy follows), sorted, not overlapping each other or an image, each inside
                one document. A hidden span is bidirectional within itself, sees its document's
                causal context before it except earlier hidden spans, and no query outside it sees
                it. ``None``: a mask without holes.
        """
        return cls.from_segment_ids(*segment_ids_from_layout(seq_len, images, documents, device, hidden=hidden))

    @classmethod
    def from_segment_ids(cls, doc_ids: torch.Tensor, image_ids: torch.Tensor | None = None,
                         hidden_ids: torch.Tensor | None = None):
        """Square Transfusion mask from per-token segment ids, vectorised (no host sync).

        Args:
            doc_ids: int ``[B, S]``; a run of equal values is one document, a negative value
                marks padding (sees nothing, seen by nothing).
            image_ids: int ``[B, S]`` or ``None``; 0 for text, and a run of equal non-zero values
                inside one document is one bidirectional image span.
            hidden_ids: int ``[B, S]`` or ``None`` (a mask without holes); 0 for visible tokens, and each
                non-zero value of a row marks one hidden span (``from_spans``' ``hidden``): one run of
                positions inside one document, where ``image_ids`` is 0. Ids that break this are named
                by a ``ValueError`` from ``validate()``, which every op calls before any launch: the ids
                are checked on the device and read back with the mask's value checks.
        """
        if not isinstance(doc_ids, torch.Tensor) or doc_ids.ndim != 2:
            error = ValueError if isinstance(doc_ids, torch.Tensor) else TypeError
            raise error(f"doc_ids: expected an int tensor [B, S], got {_describe(doc_ids)}")
        if not is_int_dtype(doc_ids.dtype):
            raise TypeError(f"doc_ids: expected an integer dtype, got {doc_ids.dtype}")
        if image_ids is None:
            image_ids = torch.zeros_like(doc_ids)
        _check_segment_ids("image_ids", image_ids, doc_ids)
        if hidden_ids is not None:
            _check_segment_ids("hidden_ids", hidden_ids, doc_ids)
        batch_size, seq_len = doc_ids.shape
        if seq_len > INT32_MAX:
            raise ValueError(f"doc_ids: expected at most 2**31 - 1 tokens per row (the mask holds int32 positions), "
                             f"got {seq_len}")
        device = doc_ids.device
        pos = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
        if seq_len == 0:
            empty = torch.zeros(batch_size, 0, dtype=torch.int32, device=device)
            holes = () if hidden_ids is None else (empty.clone(), empty.clone())
            return IntervalMask(empty, empty.clone(), 0, *holes)
        doc_ids = doc_ids.long()
        image_ids = image_ids.long()
        hidden = None if hidden_ids is None else hidden_ids.long()
        # Document start: the latest position where the doc id changed (a running max).
        doc_start = _run_start(pos, _changes(doc_ids))
        # Span end: the next position where (doc id, image id, hidden id) changes (a reversed running min).
        # A hidden span is bidirectional within itself, as an image is.
        span_changes = _changes(doc_ids) | _changes(image_ids)
        is_span = image_ids != 0
        if hidden is not None:
            span_changes |= _changes(hidden)
            is_span |= hidden != 0
        run_ends = torch.ones_like(span_changes)
        run_ends[:, :-1] = span_changes[:, 1:]
        next_change = torch.where(run_ends, pos + 1, torch.full_like(pos, seq_len))
        run_end = next_change.flip(1).cummin(dim=1).values.flip(1)
        start = doc_start
        end = torch.where(is_span, run_end, pos + 1)
        padding = doc_ids < 0
        start = torch.where(padding, pos, start)
        end = torch.where(padding, pos, end)
        if hidden is None:
            return IntervalMask(start.to(torch.int32), end.to(torch.int32), seq_len)
        # The holes, from the key side: a hidden key is seen by its own span's queries only, every other
        # key by any query its row interval allows.
        is_hidden = (hidden != 0) & ~padding
        key_q_start = torch.where(is_hidden, _run_start(pos, span_changes), 0)
        key_q_end = torch.where(is_hidden, run_end, seq_len)
        mask = IntervalMask(start.to(torch.int32), end.to(torch.int32), seq_len, key_q_start.to(torch.int32),
                            key_q_end.to(torch.int32))
        mask._layout_checks = _hidden_id_checks(doc_ids, image_ids, hidden, pos)
        return mask

    # ------------------------------------------------------------------ constructors from other libraries' masks
    @classmethod
    def from_cu_seqlens(
        cls,
        cu_seqlens_q,
        cu_seqlens_k=None,
        *,
        causal: bool = False,
        window_size=(-1, -1),
        seq_len_q: int | None = None,
        seq_len_k: int | None = None,
        device=None,
    ):
        """FlashAttention's varlen layout (``flash_attn_varlen_func``) as a batch-1 mask.

        Varlen packs the documents of a batch one after another: ``q [total_q, Hq, D]``, ``k``/``v
        [total_k, Hkv, D]``, document ``d`` owning queries ``cu_seqlens_q[d]:cu_seqlens_q[d + 1]`` and
        keys ``cu_seqlens_k[d]:cu_seqlens_k[d + 1]``. Here that packed buffer is ONE row of the
        ``[B, S, H, D]`` layout: pass ``q[None]``, ``k[None]``, ``v[None]`` (views, nothing copied) and
        take ``out[0]``. Each document attends only to its own keys, bottom-right aligned inside the
        document as in FlashAttention when its query and key lengths differ (local query ``j`` sits at
        key ``j + len_k - len_q``), fully (``causal=False``, the default as in FlashAttention), causally,
        or in a ``window_size`` window (see ``window``).

        Args:
            cu_seqlens_q: int ``[N + 1]`` tensor or list, ``0 = cu[0] <= cu[1] <= ...``: query offsets.
            cu_seqlens_k: key offsets, ``[N + 1]`` (same number of documents); ``None``: ``cu_seqlens_q``
                (self-attention).
            seq_len_q, seq_len_k: the packed row lengths; default the last offsets. Rows past the
                last query offset (padding of a fixed-size buffer) see nothing.

        The offsets are read back once to check them (skipped while ``torch.compile`` traces and during
        CUDA graph capture, where ``seq_len_q`` and ``seq_len_k`` must then be given); the bounds
        themselves are computed on the device.
        """
        left, right = _check_window_size(window_size, causal)
        cu_q = _int_vector("cu_seqlens_q", cu_seqlens_q, device, 0, INT32_MAX)
        cu_k = cu_q if cu_seqlens_k is None else _int_vector("cu_seqlens_k", cu_seqlens_k, cu_q.device, 0, INT32_MAX)
        seq_len_q = _offsets_length("cu_seqlens_q", cu_q, "seq_len_q", seq_len_q)
        seq_len_k = _offsets_length("cu_seqlens_k", cu_k, "seq_len_k", seq_len_k)
        if cu_k.shape != cu_q.shape:
            raise ValueError(f"cu_seqlens_k: expected {cu_q.shape[0]} offsets like cu_seqlens_q (one document each), "
                             f"got {cu_k.shape[0]}")
        num_docs = cu_q.shape[0] - 1
        rows = torch.arange(seq_len_q, device=cu_q.device)
        if num_docs == 0:  # no documents: every row is padding
            empty = torch.zeros(1, seq_len_q, dtype=torch.int32, device=cu_q.device)
            return IntervalMask(empty, empty.clone(), seq_len_k)
        # The document of each query row: the last one starting at or before it (skips empty documents).
        doc = (torch.searchsorted(cu_q, rows, right=True) - 1).clamp(max=num_docs - 1)
        q_begin, key_begin, key_end = cu_q[doc], cu_k[doc], cu_k[doc + 1]
        pos = key_begin + (rows - q_begin) + (key_end - key_begin) - (cu_q[doc + 1] - q_begin)
        start, end = _window_bounds(pos, key_begin, key_end, left, right)
        padding = rows >= cu_q[-1]  # after every document: empty, placed after the last document's keys
        start = torch.where(padding, cu_k[-1], start)
        end = torch.where(padding, cu_k[-1], end)
        return cls._from_bounds(start, end, 1, seq_len_k)

    @classmethod
    def from_cache_seqlens(
        cls,
        cache_seqlens,
        seq_len_q: int,
        seq_len_k: int,
        *,
        causal: bool = False,
        window_size=(-1, -1),
        device=None,
    ):
        """Per-row KV-cache lengths (``flash_attn_with_kvcache``'s ``cache_seqlens``), bottom-right aligned.

        Row ``b`` holds ``cache_seqlens[b]`` valid keys at the front of a cache of ``seq_len_k`` slots; its
        ``seq_len_q`` queries are the last ``seq_len_q`` positions of those keys (query ``i`` at
        ``i + cache_seqlens[b] - seq_len_q``) and see them fully (``causal=False``, FlashAttention's
        default), causally, or in a ``window_size`` window; slots past ``cache_seqlens[b]`` are never
        seen. ``cache_seqlens`` counts the keys attended to: FlashAttention appends ``k``/``v`` passed to
        ``flash_attn_with_kvcache`` after ``cache_seqlens``, so after writing ``n`` new keys into the
        cache yourself pass ``cache_seqlens + n``.

        Args:
            cache_seqlens: int ``[B]`` tensor or list, each in ``[0, seq_len_k]`` (read back once to check
                it, skipped while ``torch.compile`` traces and during CUDA graph capture).
        """
        left, right = _check_window_size(window_size, causal)
        _check_size("seq_len_q", seq_len_q)
        _check_size("seq_len_k", seq_len_k)
        lengths = _int_vector("cache_seqlens", cache_seqlens, device, 0, seq_len_k)
        return cls._from_key_lengths(lengths, seq_len_q, seq_len_k, left, right)

    @classmethod
    def from_key_lengths(cls, key_lengths, seq_len_q: int, seq_len_k: int, *, device=None):
        """Cross-attention to padded keys: every query of row ``b`` sees keys ``[0, key_lengths[b])``.

        E.g. PixArt-alpha's image tokens attending to caption embeddings padded to the longest caption
        (``seq_len_k``). A row with ``key_lengths[b] = 0`` sees nothing and outputs zeros.

        Args:
            key_lengths: int ``[B]`` tensor or list, each in ``[0, seq_len_k]`` (read back once to check it,
                skipped while ``torch.compile`` traces and during CUDA graph capture).
        """
        _check_size("seq_len_q", seq_len_q)
        _check_size("seq_len_k", seq_len_k)
        lengths = _int_vector("key_lengths", key_lengths, device, 0, seq_len_k)
        return cls._from_key_lengths(lengths, seq_len_q, seq_len_k, -1, -1)

    @staticmethod
    def _from_key_lengths(lengths: torch.Tensor, seq_len_q: int, seq_len_k: int, left: int, right: int):
        """Row ``b`` sees a window of keys ``[0, lengths[b])``, its queries bottom-right aligned on them."""
        lengths = lengths[:, None]
        pos = torch.arange(seq_len_q, device=lengths.device) + lengths - seq_len_q  # [B, Sq]
        start, end = _window_bounds(pos, torch.zeros_like(lengths), lengths, left, right)
        return IntervalMask._from_bounds(start, end, lengths.shape[0], seq_len_k)

    @classmethod
    def block_diagonal(cls, lengths: Sequence[Sequence[int]], seq_len: int, *, device=None):
        """Packed blocks, each bidirectional within itself and blind to the others: e.g. several images of
        different sizes (multi-aspect, NaViT/PixArt-style packing) in one row of a DiT's self-attention.

        Args:
            lengths: per batch row, the block lengths (e.g. ``h * w`` patches of each image), packed from
                position 0; positions past the last block are padding and see nothing.
            seq_len: row length ``S``.
        """
        doc_ids = _packed_ids("lengths", lengths, seq_len, "block lengths").to(device)
        # One document per block, all of it one bidirectional span (image ids must be non-zero).
        return cls.from_segment_ids(doc_ids, doc_ids + 1)

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, *, causal: bool = True, image_ids=None):
        """Hugging Face-style packed rows: a document starts at each token whose position id is the smallest
        in ``position_ids`` (0 for most models; RoBERTa-like models start at ``padding_idx + 1``), as
        transformers' packed flash-attention path reads them, and at the start of every row. (Its mask
        path, ``find_packed_sequence_indices``, splits wherever consecutive ids do not step by +1
        instead; the two agree on rows whose documents count up from the smallest id, as
        ``DataCollatorWithFlattening`` writes them. ``tfkernels.integrations.hf`` follows the mask path.)

        Vectorised, no host sync (usable inside ``torch.compile``). Documents are causal within
        themselves (``causal=False``: bidirectional, a packed encoder) and blind to each other.

        Args:
            position_ids: int ``[B, S]``.
            image_ids: optional int ``[B, S]`` (only with ``causal=True``): bidirectional spans inside the
                documents, as ``from_segment_ids`` takes them.
        """
        if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 2:
            error = ValueError if isinstance(position_ids, torch.Tensor) else TypeError
            raise error(f"position_ids: expected an int tensor [B, S], got {_describe(position_ids)}")
        if not is_int_dtype(position_ids.dtype):
            raise TypeError(f"position_ids: expected an integer dtype, got {position_ids.dtype}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {causal!r}")
        if image_ids is not None and not causal:
            raise ValueError("image_ids: only with causal=True (with causal=False every document is bidirectional)")
        if position_ids.numel() == 0:
            return cls.from_segment_ids(position_ids, image_ids)
        starts = position_ids == position_ids.min()
        starts[:, 0] = True
        doc_ids = starts.long().cumsum(dim=1)  # >= 1, one value per document
        return cls.from_segment_ids(doc_ids, image_ids if causal else doc_ids)

    @classmethod
    def from_dense(cls, dense: torch.Tensor):
        """The interval mask of a dense boolean mask (``True``: the query sees the key), as SDPA takes it.

        Args:
            dense: bool ``[B, Sq, Sk]``, ``[B, 1, Sq, Sk]`` (SDPA/Hugging Face, one mask for all heads) or
                ``[Sq, Sk]`` (a batch-1 mask). An additive float mask (0 or -inf) converts with
                ``dense == 0``.

        Each query row becomes the interval from its first to its last visible key; those bounds must not
        decrease from one row to the next (a row that sees nothing becomes an empty interval, its output
        zeros, placed after the keys of the rows before it). A row whose visible keys have holes (keys its
        interval spans but it does not see: a padding key in the middle, a hidden span) gives a mask with
        holes, which needs each such key to be seen by one run of the queries whose intervals span it: the
        key then gets that run as its ``[key_q_start, key_q_end)``, every other key all queries. Anything
        else raises ``NotAnIntervalError`` (a ``ValueError``) naming the first (batch row, query) that breaks
        it. One host sync for an interval mask (the checks read the result back).
        """
        if not isinstance(dense, torch.Tensor):
            raise TypeError(f"dense: expected a bool tensor [B, Sq, Sk], got {_describe(dense)}")
        if dense.dtype != torch.bool:
            raise TypeError(f"dense: expected dtype torch.bool (True = visible; an additive float mask converts "
                            f"with dense == 0), got {dense.dtype}")
        if dense.ndim == 4 and dense.shape[1] == 1:
            dense = dense[:, 0]
        elif dense.ndim == 2:
            dense = dense[None]
        if dense.ndim != 3:
            raise ValueError(f"dense: expected shape [B, Sq, Sk], [B, 1, Sq, Sk] or [Sq, Sk] (one mask for all "
                             f"heads), got {tuple(dense.shape)}")
        batch_size, seq_len_q, seq_len_k = dense.shape
        for name, size in (("batch_size", batch_size), ("seq_len_q", seq_len_q), ("seq_len_k", seq_len_k)):
            _check_size(f"dense ({name})", size)
        reader = DenseMaskReader(batch_size, seq_len_q, seq_len_k, dense.device)
        reader.add(dense)
        return reader.mask(lambda: (dense,))

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
        holes = ()
        if self.has_holes:
            # The first seq_len_k keys, their allowed queries renumbered from row `start`.
            holes = tuple((t[:, :seq_len_k].long() - start).clamp(0, end - start).to(torch.int32).contiguous()
                          for t in (self.key_q_start, self.key_q_end))
        sliced = IntervalMask(
            self.kv_start[:, start:end].contiguous(), self.kv_end[:, start:end].contiguous(), seq_len_k, *holes
        )
        sliced.validate()
        return sliced

    def to_dense(self) -> torch.Tensor:
        """bool ``[B, Sq, Sk]``: ``True`` where the query sees the key."""
        keys = torch.arange(self.seq_len_k, device=self.device)
        dense = (keys >= self.kv_start[..., None]) & (keys < self.kv_end[..., None])
        if self.has_holes:
            rows = torch.arange(self.seq_len_q, device=self.device)[:, None]
            dense &= (rows >= self.key_q_start[:, None, :]) & (rows < self.key_q_end[:, None, :])
        return dense

    def to_flex_block_mask(self, block_size: int = 128):
        """torch's ``BlockMask`` for ``flex_attention`` (interop and benchmarks)."""
        from torch.nn.attention.flex_attention import create_block_mask

        kv_start, kv_end = self.kv_start, self.kv_end
        key_q_start, key_q_end = self.key_q_start, self.key_q_end
        last_row, last_key = self.seq_len_q - 1, self.seq_len_k - 1

        def mask_mod(b, h, q_idx, kv_idx):
            # create_block_mask evaluates whole blocks, so q_idx may run past Sq.
            row = q_idx.clamp(max=last_row)
            return (kv_idx >= kv_start[b, row]) & (kv_idx < kv_end[b, row]) & (q_idx <= last_row)

        def mask_mod_with_holes(b, h, q_idx, kv_idx):
            key = kv_idx.clamp(max=last_key)  # and kv_idx past Sk (mask_mod hides it)
            allowed = (q_idx >= key_q_start[b, key]) & (q_idx < key_q_end[b, key])
            return mask_mod(b, h, q_idx, kv_idx) & allowed

        return create_block_mask(
            mask_mod_with_holes if self.has_holes else mask_mod,
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
        ``kv_start <= k`` end at another. With holes, that interval is intersected with the key's
        allowed queries ``[key_q_start, key_q_end)``: still one interval per key (no longer monotone
        in the key). Keys seen by no query get an empty interval.
        """
        keys = torch.arange(self.seq_len_k, device=self.device, dtype=torch.int32)
        keys = keys.expand(self.batch_size, self.seq_len_k).contiguous()
        q_start = torch.searchsorted(self.kv_end.contiguous(), keys, right=True, out_int32=True)
        q_end = torch.searchsorted(self.kv_start.contiguous(), keys, right=True, out_int32=True)
        if self.has_holes:
            q_start = torch.maximum(q_start, self.key_q_start)
            q_end = torch.minimum(q_end, self.key_q_end)
        return q_start, torch.maximum(q_start, q_end)

    def visible_pairs(self) -> int:
        """Exact number of visible (query, key) pairs over the batch (for FLOP counts)."""
        if self.has_holes:
            q_start, q_end = self.key_intervals()
            return int((q_end.long() - q_start.long()).sum())
        return int((self.kv_end.long() - self.kv_start.long()).sum())

    # ------------------------------------------------------------------ validation
    def validate(self, *, batch_size=None, seq_len_q=None, seq_len_k=None, device=None) -> IntervalMask:
        """Check the contract: ``TypeError`` for a wrong type or dtype, else ``ValueError`` naming the
        first violation (for values, the first bad batch row and query, in row-major order).

        The optional arguments are what the caller's tensors need (an op passes its q/k shapes).
        Structure (type, dtype, shape, device, sizes) is checked on every call. Values (range and
        monotonicity; with holes, ``key_q_start <= key_q_end`` in ``[0, Sq]``, and the hidden ids
        ``from_segment_ids`` read) are checked in eager mode on the first call and again whenever a
        bound tensor is another tensor or was edited in place since (its version counter changed), or
        ``seq_len_k`` changed; not while ``torch.compile`` traces, where they would force a host sync
        and a graph break: ops then compute with ``canonical_bounds`` (see the module docstring).
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
        _check_size("mask.seq_len_k", self.seq_len_k)
        _check_size("mask.seq_len_q", self.seq_len_q)
        expected = (("batch_size", batch_size, self.batch_size), ("seq_len_q", seq_len_q, self.seq_len_q),
                    ("seq_len_k", seq_len_k, self.seq_len_k))
        for name, want, have in expected:
            if want is not None and want != have:
                raise ValueError(f"mask.{name}: is {have} but the inputs need {want}")
        if device is not None and torch.device(device) != start.device:
            raise ValueError(f"mask: tensors are on {start.device} but the inputs are on {torch.device(device)}")
        tensors = (start, end)
        if self.has_holes:
            self._check_hole_structure()
            tensors += (self.key_q_start, self.key_q_end)
        if torch.compiler.is_compiling():
            return self  # values: ops use _op_bounds (canonical bounds, computed on the device)
        state = (*tensors, *(t._version for t in tensors), self.seq_len_k)
        checked = self._checked_state
        count = len(tensors)
        if checked is None or not (len(checked) == len(state) and all(a is b for a, b in zip(checked, tensors))
                                   and checked[count:] == state[count:]):
            self._check_values()
            self._checked_state = state
        return self

    def _check_hole_structure(self) -> None:
        for name, t in (("key_q_start", self.key_q_start), ("key_q_end", self.key_q_end)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"mask.{name}: expected an int32 tensor [B, Sk] (with holes, key_q_start and "
                                f"key_q_end are both given), got {_describe(t)}")
            if t.dtype != torch.int32:
                raise TypeError(f"mask.{name}: expected dtype torch.int32, got {t.dtype}")
            if tuple(t.shape) != (self.batch_size, self.seq_len_k):
                raise ValueError(f"mask.{name}: expected shape [B, Sk] = {[self.batch_size, self.seq_len_k]}, "
                                 f"got {list(t.shape)}")
            if t.device != self.device:
                raise ValueError(f"mask.{name}: on {t.device} but kv_start on {self.device}")

    def _op_holes(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The key-side bounds an op computes with, as ``_op_bounds`` gives the row bounds: ``None`` without
        holes; the validated tensors in eager mode; clamped into ``[0, Sq]`` with ``end >= start`` while
        ``torch.compile`` traces (the identity on valid bounds)."""
        if not self.has_holes:
            return None
        if not torch.compiler.is_compiling():
            return self.key_q_start, self.key_q_end
        start = self.key_q_start.clamp(0, self.seq_len_q)
        end = torch.maximum(self.key_q_end.clamp(0, self.seq_len_q), start)
        if os.environ.get("TFKERNELS_MASK_ASSERT", "0") == "1":
            valid = ((start == self.key_q_start) & (end == self.key_q_end)).all()
            torch._assert_async(valid, "mask: invalid key_q_start/key_q_end values under torch.compile "
                                       "(TFKERNELS_MASK_ASSERT=1; call validate() in eager mode to name the key)")
        return start, end

    def _op_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bounds an op computes with, after ``validate()``: the (validated) tensors themselves in eager
        mode; ``canonical_bounds`` while ``torch.compile`` traces, with a device-side assertion that they
        equal the mask's own bounds when ``TFKERNELS_MASK_ASSERT=1``. Every op (kernel or reference) goes
        through here, so both paths see the same bounds on every mask, valid or not."""
        if not torch.compiler.is_compiling():
            return self.kv_start, self.kv_end
        start, end = canonical_bounds(self.kv_start, self.kv_end, self.seq_len_k)
        if os.environ.get("TFKERNELS_MASK_ASSERT", "0") == "1":
            valid = ((start == self.kv_start) & (end == self.kv_end)).all()
            torch._assert_async(valid, "mask: invalid kv_start/kv_end values under torch.compile "
                                       "(TFKERNELS_MASK_ASSERT=1; call validate() in eager mode to name the row)")
        return start, end

    def _check_values(self) -> None:
        """Raise a ``ValueError`` naming the first bad value: the segment ids a constructor read
        (``_layout_checks``), then the row bounds, then the key bounds. One host sync for a valid mask."""
        groups = [("position", self._layout_checks, None, None), ("query", *self._row_checks())]
        if self.has_holes:
            groups.append(("key", *self._key_checks()))
        bads = [torch.stack([b for _, b, _ in checks]) for _, checks, _, _ in groups if checks]  # [checks, B, N]
        flags = [bad.any() for bad in bads if bad.numel()]
        if not flags or not bool(torch.stack(flags).any()):  # the one host sync of a valid mask
            return
        for (index_name, checks, start, end), bad in zip([g for g in groups if g[1]], bads):
            if bad.numel() == 0 or not bool(bad.any()):
                continue
            row, col = bad.any(0).nonzero()[0].tolist()  # the first bad entry, row-major
            name, _, what = checks[int(bad[:, row, col].nonzero()[0])]
            if start is None:  # segment ids: the rule says what was expected
                raise ValueError(f"{name}: batch row {row}, {index_name} {col}: {what}")
            got = f"[{int(start[row, col])}, {int(end[row, col])})"
            if what.endswith(_MONOTONE):
                got += f" after [{int(start[row, col - 1])}, {int(end[row, col - 1])})"
            raise ValueError(f"mask.{name}: batch row {row}, {index_name} {col}: {what}, got {got}")

    def _row_checks(self):
        """The row bounds' rules as ``(checks, kv_start, kv_end)``, each check ``(name, bool [B, Sq], rule)``."""
        start, end, sk = self.kv_start, self.kv_end, self.seq_len_k
        if start.numel() == 0:
            return (), start, end
        false = torch.zeros_like(start[:, :1], dtype=torch.bool)
        checks = (
            ("kv_start", start < 0, "expected kv_start >= 0"),
            ("kv_end", end > sk, f"expected kv_end <= seq_len_k={sk}"),
            ("kv_end", end < start, "expected kv_start <= kv_end"),
            # Query q compared with query q - 1 (query 0 has no predecessor).
            ("kv_start", torch.cat([false, start[:, 1:] < start[:, :-1]], 1), f"expected kv_start {_MONOTONE}"),
            ("kv_end", torch.cat([false, end[:, 1:] < end[:, :-1]], 1), f"expected kv_end {_MONOTONE}"),
        )
        return checks, start, end

    def _key_checks(self):
        """The key bounds' rules, as ``_row_checks`` gives the row bounds'."""
        start, end, sq = self.key_q_start, self.key_q_end, self.seq_len_q
        checks = (
            ("key_q_start", start < 0, "expected key_q_start >= 0"),
            ("key_q_end", end > sq, f"expected key_q_end <= seq_len_q={sq}"),
            ("key_q_end", end < start, "expected key_q_start <= key_q_end"),
        )
        return checks, start, end



class DenseMaskReader:
    """Builds the IntervalMask of a dense boolean mask read one block of query rows at a time
    (``IntervalMask.from_dense`` reads one block; the Hugging Face mask builder evaluates a model's mask in
    blocks to bound memory).

    ``add`` keeps, per query row, its first and last visible key and how many it sees, and per key its
    first and last query and how many see it: O(B * (Sq + Sk)) memory whatever the block size. ``mask``
    builds the rows' intervals from those, and the holes from the keys: a key whose viewers are fewer than
    the queries whose intervals span it must be seen by one run of them, exactly when the count of its
    viewers equals the length of that run inside the span. Only a mask that is not an interval mask reads
    its blocks a second time, to name the first row that breaks it.
    """

    def __init__(self, batch_size: int, seq_len_q: int, seq_len_k: int, device):
        self.shape = (batch_size, seq_len_q, seq_len_k)
        self.rows_read = 0
        self._rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # first key, end, count: [B, n]
        keys = (batch_size, seq_len_k)
        self.key_first = torch.full(keys, seq_len_q, dtype=torch.int64, device=device)  # first viewer
        self.key_end = torch.zeros(keys, dtype=torch.int64, device=device)  # one past the last viewer
        self.key_count = torch.zeros(keys, dtype=torch.int64, device=device)

    def add(self, block: torch.Tensor) -> None:
        """The next rows: bool ``[B, n, Sk]``."""
        batch_size, seq_len_q, seq_len_k = self.shape
        if block.shape[0] != batch_size or block.shape[2] != seq_len_k or self.rows_read + block.shape[1] > seq_len_q:
            raise ValueError(f"dense block: expected [B, n, Sk] = [{batch_size}, n <= {seq_len_q - self.rows_read}, "
                             f"{seq_len_k}], got {list(block.shape)}")
        if block.shape[1] == 0 or seq_len_k == 0:
            self.rows_read += block.shape[1]
            return
        rows = block.shape[1]
        # The narrowest integers that hold every index and count: the reductions over [B, n, Sk] dominate.
        small = torch.int16 if max(seq_len_q, seq_len_k) < 2**15 else torch.int32
        as_int = block.to(torch.uint8)
        # argmax gives the first maximum: a row's first visible key (and, flipped, its last).
        self._rows.append((as_int.argmax(-1), seq_len_k - as_int.flip(-1).argmax(-1),
                           as_int.sum(-1, dtype=small).long()))
        # Along the queries (not the contiguous dimension) a min/max of row indices is faster than argmax.
        row_index = torch.arange(rows, device=block.device, dtype=small)[None, :, None]
        count = as_int.sum(1, dtype=small).long()
        seen = count > 0
        first = torch.where(block, row_index, rows).amin(1).long() + self.rows_read
        end = torch.where(block, row_index, -1).amax(1).long() + self.rows_read + 1
        self.key_first = torch.where(seen, torch.minimum(self.key_first, first), self.key_first)
        self.key_end = torch.where(seen, torch.maximum(self.key_end, end), self.key_end)
        self.key_count += count
        self.rows_read += rows

    def mask(self, reread) -> IntervalMask:
        """The IntervalMask of the rows added (all ``Sq`` of them). ``reread()``: the same blocks again, in
        order (called only to name the first bad row before raising ``NotAnIntervalError``)."""
        batch_size, seq_len_q, seq_len_k = self.shape
        if self.rows_read != seq_len_q:
            raise ValueError(f"dense: {self.rows_read} of {seq_len_q} query rows were added")
        if seq_len_q == 0 or seq_len_k == 0:
            empty = torch.zeros(batch_size, seq_len_q, dtype=torch.int32, device=self.key_end.device)
            return IntervalMask(empty, empty.clone(), seq_len_k)
        first, end, count = (torch.cat(parts, 1) for parts in zip(*self._rows))
        sees_any = count > 0
        # An empty row sits at the largest end so far: the only place that can keep both bounds monotone.
        running_end = torch.where(sees_any, end, 0).cummax(dim=-1).values
        start = torch.where(sees_any, first, running_end)
        end = torch.where(sees_any, end, running_end)
        false = torch.zeros_like(sees_any[:, :1])
        decreasing = torch.cat([false, (start[:, 1:] < start[:, :-1]) | (end[:, 1:] < end[:, :-1])], dim=1)
        rows = IntervalMask(start.to(torch.int32), end.to(torch.int32), seq_len_k)
        # The queries whose intervals span each key are one run [spanned_start, spanned_end) (monotone bounds;
        # meaningless where they decrease, which raises first).
        spanned_start, spanned_end = (t.long() for t in rows.key_intervals())
        viewers_in_run = (torch.minimum(self.key_end, spanned_end)
                          - torch.maximum(self.key_first, spanned_start)).clamp(min=0)
        one_run = self.key_count == viewers_in_run
        unrestricted = self.key_count == spanned_end - spanned_start
        broken, not_one_run, has_holes = torch.stack(
            [decreasing.any(), (~one_run).any(), (~unrestricted).any()]).tolist()  # the one host sync
        if broken or not_one_run:
            self._raise_first_bad(reread, first, start, end, sees_any, decreasing)
        if not has_holes:
            return rows
        seen = self.key_count > 0
        key_q_start = torch.where(unrestricted | ~seen, 0, self.key_first)
        key_q_end = torch.where(unrestricted, seq_len_q, torch.where(seen, self.key_end, 0))
        return IntervalMask(rows.kv_start, rows.kv_end, seq_len_k, key_q_start.to(torch.int32),
                            key_q_end.to(torch.int32))

    def _raise_first_bad(self, reread, first, start, end, sees_any, decreasing):
        """Raise ``NotAnIntervalError`` for the first row (row-major) whose bounds decrease, or that misses a key
        its interval spans while queries before and after it see that key."""
        keys = torch.arange(self.shape[2], device=start.device)
        stranded, stranded_key, offset = [], [], 0
        for block in reread():
            n = block.shape[1]
            queries = torch.arange(offset, offset + n, device=start.device)[None, :, None]
            spans = (keys >= start[:, offset:offset + n, None]) & (keys < end[:, offset:offset + n, None])
            viewed_around = (queries >= self.key_first[:, None, :]) & (queries < self.key_end[:, None, :])
            missed = spans & viewed_around & ~block
            stranded.append(missed.any(-1))
            stranded_key.append(missed.to(torch.uint8).argmax(-1))
            offset += n
        stranded, stranded_key = torch.cat(stranded, 1), torch.cat(stranded_key, 1)
        row, query = (int(i) for i in (decreasing | stranded).nonzero()[0])
        if stranded[row, query]:
            key = int(stranded_key[row, query])
            what = (f"its visible keys are not one interval (key {key} is hidden between visible keys "
                    f"{int(start[row, query])} and {int(end[row, query]) - 1}), and the queries that see key {key} "
                    f"are not one interval either (queries {int(self.key_first[row, key])} and "
                    f"{int(self.key_end[row, key]) - 1} see it, this one does not)")
        else:  # an empty row never decreases a bound: this row sees keys, the one before may not
            here = f"it sees keys [{int(start[row, query])}, {int(end[row, query])})"
            if sees_any[row, query - 1]:
                what = (f"{here} but query {query - 1} sees [{int(start[row, query - 1])}, "
                        f"{int(end[row, query - 1])}): an interval mask needs the first and last visible keys "
                        f"non-decreasing along the queries")
            else:
                what = (f"{here} but query {query - 1} sees nothing, after rows that see keys up to "
                        f"{int(end[row, query - 1])}: an interval mask can hold an empty row only between rows "
                        f"whose intervals do not overlap")
        raise NotAnIntervalError(row, query, f"dense: batch row {row}, query {query}: {what}", what)


_MONOTONE = "non-decreasing along queries"


class NotAnIntervalError(ValueError):
    """A dense mask that an IntervalMask cannot express (``IntervalMask.from_dense``): bounds that decrease
    along the queries, or a row with a hole at a key whose viewers are not one run of queries. ``batch`` and
    ``query`` name the first such row (row-major), e.g. for a caller that falls back to dense attention;
    ``what`` says what breaks it."""

    def __init__(self, batch: int, query: int, message: str, what: str | None = None):
        super().__init__(message)
        self.batch = batch
        self.query = query
        self.what = message if what is None else what  # what breaks the row, without its place


# Wider than any window can matter: |position| < 2**31 and keys lie in [0, 2**31), so a side of at
# least this many keys is unbounded. Clamping to it keeps the int64 arithmetic far from overflow.
_UNBOUNDED_WINDOW = 2**32


def _check_window_size(window_size, causal) -> tuple[int, int]:
    """FlashAttention's ``window_size=(left, right)`` (ints >= -1; -1: unbounded) with ``causal`` folded in
    (``right = 0``, as FlashAttention does), each side clamped to ``_UNBOUNDED_WINDOW``."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    message = f"window_size: expected a (left, right) pair of ints >= -1 (-1: unbounded), got {window_size!r}"
    if not isinstance(window_size, (tuple, list)) or not all(is_int(side) for side in window_size):
        raise TypeError(message)
    if len(window_size) != 2 or not all(side >= -1 for side in window_size):
        raise ValueError(message)
    left, right = window_size
    if causal:
        right = 0
    return min(left, _UNBOUNDED_WINDOW), min(right, _UNBOUNDED_WINDOW)


def _window_bounds(pos, lo, hi, left: int, right: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``pos - left`` to ``pos + right`` inclusive (``-1``: unbounded), clipped to ``[lo, hi)``, as
    ``[start, end)``; int64 tensors that broadcast together, ``lo <= hi``. Both bounds are monotone in
    ``pos``, and ``start <= end`` since ``pos - left <= pos + right + 1``."""
    def clip(x):
        return torch.minimum(torch.maximum(x, lo), hi)

    start = lo if left < 0 else clip(pos - left)
    end = hi if right < 0 else clip(pos + right + 1)
    shape = torch.broadcast_shapes(pos.shape, lo.shape, hi.shape)
    return start.expand(shape), end.expand(shape)


def _can_read_values(t: torch.Tensor) -> bool:
    """Whether a constructor may read ``t``'s values back to check them: not while ``torch.compile`` traces
    (a graph break) nor during CUDA graph capture (a host sync is illegal there)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _int_vector(name: str, value, device, low: int, high: int) -> torch.Tensor:
    """``value``, a list of ints or a 1-D int tensor, as int64 on ``device`` (a tensor's own when ``None``),
    each value checked to lie in ``[low, high]`` (``ValueError`` naming the first bad index)."""
    if isinstance(value, torch.Tensor):
        if not is_int_dtype(value.dtype):
            raise TypeError(f"{name}: expected an integer dtype, got {value.dtype}")
        if value.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D int tensor, got shape {tuple(value.shape)}")
        vector = value.to(device=value.device if device is None else device, dtype=torch.int64)
        if _can_read_values(vector):
            bad = (vector < low) | (vector > high)
            if bool(bad.any()):
                index = int(bad.to(torch.uint8).argmax())
                raise ValueError(f"{name}[{index}]: expected an int in [{low}, {high}], got {int(vector[index])}")
        return vector
    if not isinstance(value, (list, tuple)) or not all(is_int(v) for v in value):
        raise TypeError(f"{name}: expected a list of ints or a 1-D int tensor, got {value!r}")
    for index, v in enumerate(value):
        if not low <= v <= high:
            raise ValueError(f"{name}[{index}]: expected an int in [{low}, {high}], got {v}")
    return torch.tensor(value, dtype=torch.int64, device=device)


def _offsets_length(name: str, offsets: torch.Tensor, size_name: str, size) -> int:
    """Check cumulative offsets ``[N + 1]`` (start at 0, non-decreasing, end within ``size``) and return
    the row length: ``size``, or the last offset when ``size`` is ``None``."""
    if offsets.shape[0] == 0:
        raise ValueError(f"{name}: expected N + 1 >= 1 offsets starting at 0, got an empty tensor")
    if size is not None:
        _check_size(size_name, size)
    if not _can_read_values(offsets):
        if size is None:
            raise ValueError(f"{size_name}: give it while torch.compile traces or a CUDA graph is captured "
                             f"(the default reads {name}[-1] back)")
        return size
    if int(offsets[0]) != 0:
        raise ValueError(f"{name}[0]: expected 0, got {int(offsets[0])}")
    decreasing = offsets[1:] < offsets[:-1]
    if bool(decreasing.any()):
        index = int(decreasing.to(torch.uint8).argmax()) + 1
        raise ValueError(f"{name}[{index}]: expected non-decreasing offsets, got {int(offsets[index])} after "
                         f"{int(offsets[index - 1])}")
    last = int(offsets[-1])
    if size is None:
        return last
    if last > size:
        raise ValueError(f"{name}[-1]: expected at most {size_name}={size}, got {last}")
    return size


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {tuple(x.shape)} {x.dtype} on {x.device}"
    return type(x).__name__


def _check_segment_ids(name: str, ids, doc_ids: torch.Tensor) -> None:
    """``ids``: an int tensor of ``doc_ids``' shape, on its device."""
    if not isinstance(ids, torch.Tensor) or ids.shape != doc_ids.shape:
        error = ValueError if isinstance(ids, torch.Tensor) else TypeError
        raise error(f"{name}: expected a tensor of doc_ids' shape {tuple(doc_ids.shape)}, got {_describe(ids)}")
    if not is_int_dtype(ids.dtype):
        raise TypeError(f"{name}: expected an integer dtype, got {ids.dtype}")
    if ids.device != doc_ids.device:
        raise ValueError(f"{name}: expected device {doc_ids.device}, got {ids.device}")


def _changes(ids: torch.Tensor) -> torch.Tensor:
    """bool ``[B, S]``: the id differs from the one before it (always at position 0)."""
    changed = torch.ones_like(ids, dtype=torch.bool)
    changed[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return changed


def _run_start(pos: torch.Tensor, changes: torch.Tensor) -> torch.Tensor:
    """The first position of each position's run: the latest change at or before it (a running max)."""
    return torch.where(changes, pos, torch.zeros_like(pos)).cummax(dim=1).values


def _hidden_id_checks(doc_ids, image_ids, hidden, pos) -> tuple[tuple[str, torch.Tensor, str], ...]:
    """``from_segment_ids``' rules for ``hidden_ids``, as bool ``[B, S]`` tensors where a rule breaks
    (``IntervalMask._layout_checks``), computed on the device."""
    is_hidden = hidden != 0
    continues = ~_changes(hidden) & is_hidden  # the same hidden id as the position before
    # Every id one run: sorted stably by id, a position whose predecessor holds the same id must
    # follow it directly; the later of two runs of one id is flagged where it starts.
    ids, order = torch.sort(hidden, dim=1, stable=True)
    split = torch.zeros_like(is_hidden)
    split[:, 1:] = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] != 0) & (order[:, 1:] != order[:, :-1] + 1)
    second_run = torch.zeros_like(is_hidden).scatter_(1, order, split)
    return (
        ("hidden_ids", is_hidden & (doc_ids < 0), "expected 0 on padding (doc_ids < 0)"),
        ("hidden_ids", is_hidden & (image_ids != 0),
         "expected 0 where image_ids is not (hidden spans and images are disjoint)"),
        ("hidden_ids", continues & _changes(doc_ids),
         "expected each hidden span inside one document, but this one continues across a document start"),
        ("hidden_ids", second_run, "expected each non-zero id to be one run of positions, but this id "
                                   "appeared before, in another run"),
    )


def _is_list(value) -> bool:
    """A list, tuple or other sequence, not a string."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _check_rows(name: str, rows, row_form: str) -> None:
    """``rows`` holds one list per batch row (``row_form``: what each row lists)."""
    if not _is_list(rows):
        raise TypeError(f"{name}: expected one {row_form} per batch row, got {_describe(rows)}")
    for row, entries in enumerate(rows):
        if not _is_list(entries):
            raise TypeError(f"{name}[{row}]: expected a {row_form} (one list per batch row), got {entries!r}")


def _packed_ids(name: str, rows, seq_len: int, lengths_noun: str = "lengths") -> torch.Tensor:
    """int64 ``[B, S]``: at each position the index of the segment holding it, segments packed from position
    0 with the lengths each row of ``rows`` lists; -1 past the last segment (padding)."""
    _check_size("seq_len", seq_len)
    row_form = f"list of non-negative int {lengths_noun}"
    _check_rows(name, rows, row_form)
    ids = torch.full((len(rows), seq_len), -1, dtype=torch.int64)
    for row, lengths in enumerate(rows):
        if not all(is_int(n, 0) for n in lengths):
            error = ValueError if all(is_int(n) for n in lengths) else TypeError
            raise error(f"{name}[{row}]: expected a {row_form} (one list per batch row), got {lengths!r}")
        if sum(lengths) > seq_len:
            raise ValueError(f"{name}[{row}]: lengths sum to {sum(lengths)}, more than seq_len={seq_len}")
        row_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.int64))
        ids[row, : row_ids.shape[0]] = row_ids
    return ids


def segment_ids_from_layout(seq_len: int, images=None, documents=None, device=None, *, hidden=None) -> tuple:
    """The ``(doc_ids, image_ids)`` int64 ``[B, S]`` tensors of a layout, for ``IntervalMask.from_segment_ids``;
    with ``hidden``, ``(doc_ids, image_ids, hidden_ids)``.

    ``images``, ``documents`` and ``hidden`` are per-row lists as ``IntervalMask.from_spans`` takes them (any
    may be ``None``, not both of ``images`` and ``documents``), and ``from_spans(S, images, documents,
    hidden=hidden)`` is ``from_segment_ids(*segment_ids_from_layout(S, images, documents, hidden=hidden))``.
    Padding gets doc id -1; image ``i`` of a row gets image id ``i + 1``, hidden span ``i`` hidden id ``i + 1``.
    A layout that is not one (wrong nesting, a span out of order or across documents, a hidden span that
    overlaps an image) raises ``TypeError`` or ``ValueError`` naming the first bad entry.
    """
    spans_form = "list of (start, end) spans"
    if images is None and documents is None and hidden is None:
        raise ValueError(f"images, documents: expected one or both (per batch row, a {spans_form} / a list of "
                         f"document lengths), got neither")
    if images is not None:
        _check_rows("images", images, spans_form)
    if hidden is not None:
        _check_rows("hidden", hidden, spans_form)
    if documents is None:  # one document per row
        documents = [[seq_len]] * len(images if images is not None else hidden)
    doc_ids = _packed_ids("documents", documents, seq_len)
    image_ids = torch.zeros_like(doc_ids)
    if images is not None:
        _span_ids("images", images, doc_ids, image_ids)
    if hidden is None:
        return doc_ids.to(device), image_ids.to(device)
    hidden_ids = torch.zeros_like(doc_ids)
    _span_ids("hidden", hidden, doc_ids, hidden_ids)
    overlap = (hidden_ids != 0) & (image_ids != 0)
    if bool(overlap.any()):
        row, position = (int(i) for i in overlap.nonzero()[0])
        span = hidden[row][int(hidden_ids[row, position]) - 1]
        image = images[row][int(image_ids[row, position]) - 1]
        raise ValueError(f"hidden[{row}][{int(hidden_ids[row, position]) - 1}]: span {tuple(span)!r} overlaps image "
                         f"{tuple(image)!r} (hidden spans and images are disjoint)")
    return doc_ids.to(device), image_ids.to(device), hidden_ids.to(device)


def _span_ids(name: str, rows, doc_ids: torch.Tensor, ids: torch.Tensor) -> None:
    """Write span ``i`` of each row of ``rows`` (per batch row, a list of ``(start, end)`` spans) into ``ids`` as
    ``i + 1``, checking each span: inside ``[0, S]``, sorted, disjoint, inside one document."""
    spans_form = "list of (start, end) spans"
    seq_len = doc_ids.shape[1]
    if len(rows) != doc_ids.shape[0]:
        raise ValueError(f"{name}: expected one {spans_form} per batch row, as many rows as documents "
                         f"({doc_ids.shape[0]}), got {len(rows)}")
    for row, spans in enumerate(rows):
        previous_end = 0
        for i, span in enumerate(spans):
            if not _is_list(span) or len(span) != 2:
                raise (ValueError if _is_list(span) else TypeError)(
                    f"{name}[{row}][{i}]: expected a (start, end) pair ({name} holds, per batch row, a "
                    f"{spans_form}), got {span!r}")
            start, end = span
            if not (is_int(start, 0) and is_int(end, 0, seq_len) and start < end):
                raise (ValueError if is_int(start) and is_int(end) else TypeError)(
                    f"{name}[{row}][{i}]: expected 0 <= start < end <= seq_len={seq_len}, got {span!r}")
            if start < previous_end:
                raise ValueError(f"{name}[{row}][{i}]: span {span!r} overlaps or precedes the previous span "
                                 f"(spans must be sorted and disjoint)")
            doc = int(doc_ids[row, start])
            if doc < 0 or int(doc_ids[row, end - 1]) != doc:
                raise ValueError(f"{name}[{row}][{i}]: span {span!r} is not inside one document")
            ids[row, start:end] = i + 1
            previous_end = end
