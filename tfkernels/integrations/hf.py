"""Hugging Face transformers attention backend: ``attn_implementation="tfkernels"``.

``register()`` adds two functions to transformers (5.x): an attention function
(``AttentionInterface``) that runs ``tk.attention``, and a mask builder (``AttentionMaskInterface``)
that turns the mask a model asks for into an ``IntervalMask``. Without the builder transformers
would hand a registered backend no mask at all. It also makes transformers' mask creation return a
built ``IntervalMask`` unchanged, as it returns a prepared 4D mask: ``generate`` builds a static
cache's mask before the forward, and PaliGemma hands the mask it built to its text model.

Design
------
transformers describes a mask as a closure ``mask_function(batch, head, q_idx, kv_idx) -> bool``
composed in ``transformers.masking_utils`` (causal, sliding window, chunks, image blocks through
``block_sequence_ids``, packed documents found from ``position_ids``, AND/OR of those), plus a 2D
padding mask over the keys. The builder is called once per forward and its result is shared by
every layer, so its cost is per forward, not per layer:

* **Structural path, O(B * S)**: the closure is read as a tree of those known pieces (their
  ``__qualname__`` and captured variables) and evaluated as interval algebra: each piece gives one
  key interval per query, AND intersects, OR unites (and must not leave a gap), padding trims the
  ends, the runs of ``block_sequence_ids`` / packed document ids come from
  ``IntervalMask.from_segment_ids``. Every shortcut that holds only under a condition (an image id
  used by one run of tokens, positions counting up by one inside a packed document, two OR-ed
  intervals that touch, monotone bounds) adds that condition to a list that is checked with ONE
  host sync at the end.
* **Evaluated path, O(B * S^2) time, bounded memory**: any piece the algebra does not know (a
  model's own lambda, a custom ``or_mask_function``), or a failed condition, evaluates the closure
  itself with transformers' ``sdpa_mask`` a chunk of query rows at a time and reads the chunks with
  a ``DenseMaskReader`` (``IntervalMask.from_dense``'s reading, holes included). This path is
  exact by construction (it is the boolean mask SDPA would get); the structural path is tested
  against it.
* Queries at padded positions see nothing, IntervalMask's convention for padding rows, whatever
  transformers' mask lets them see (a right-padded prefix-LM's padding shares the prefix's block id);
  only in self-attention masks (those with a causal, sliding-window or chunk piece): the padding
  mask of cross-attention covers the encoder's keys, not the queries' positions.
* A row with holes (keys hidden inside its interval: a padding key, an overlay hiding a span from
  the queries after it, T5Gemma2's concatenated decoder mask) gives a mask with holes where each
  hidden key is seen by one run of the queries spanning it (``DenseMaskReader``, as
  ``IntervalMask.from_dense``). A mask that is not an interval mask (bounds moving backwards, a key
  seen before and after a query that spans it but does not see it) raises ``NotAnIntervalError``
  naming the model and the row, or, with ``fallback="sdpa"``, returns SDPA's dense mask and the
  attention function runs SDPA on it.

The attention function takes HF's ``[B, H, S, D]`` q/k/v (K/V not expanded for GQA), transposes
them to views in tk's ``[B, S, H, D]`` layout (no copy) and calls ``tk.attention`` with the module's
``scaling`` and ``softcap`` (Gemma 2's ``attn_logit_softcapping``: ``c * tanh(s / c)`` in the kernels);
GQA is native. It also accepts a dense 4D mask (a model or user that built one itself:
converted once per tensor, cached by identity and version, since all layers get the same tensor),
``None`` (SDPA's meaning: causal from the module's ``is_causal``, or everything), and an
``IntervalMask`` given explicitly with the ``tfkernels_mask=`` keyword of the model's forward.
What ``tk.attention`` cannot do (head dims above 256, dropout > 0, attention weights, position
biases, sinks) raises ``NotImplementedError`` naming the model and the layer or, with
``fallback="sdpa"``, runs SDPA (or the model's eager attention for what SDPA cannot do either,
soft-capping included: a soft-capped model whose call falls back for another reason runs eager,
never SDPA without its cap).

The builder runs outside ``torch.compile`` graphs (``torch.compiler.disable``: it reads closures
and syncs once); the attention function is traced without graph breaks, and since the mask is two
int tensors of fixed shape, batches with other layouts of the same shape do not recompile.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch

try:
    import transformers
    from packaging.version import Version
    from transformers import AttentionInterface, masking_utils
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, prepare_padding_mask, sdpa_mask
except ImportError as error:
    raise ImportError("tfkernels.integrations.hf needs transformers: pip install 'tfkernels[hf]'") from error

from ..attention import MAX_HEAD_DIM, attention
from ..mask import DenseMaskReader, IntervalMask, NotAnIntervalError
from ._converted import ConvertedMasks

# The oldest transformers this module supports (setup.py's hf extra takes the 5.x releases from it on): the first
# whose mask builders take q_length and q_offset and compose image blocks with blockwise_overlay, as read here.
LOWEST_TRANSFORMERS = "5.9"
if Version(transformers.__version__) < Version(LOWEST_TRANSFORMERS):
    raise ImportError(f"tfkernels.integrations.hf needs transformers >= {LOWEST_TRANSFORMERS} (installed: "
                      f"{transformers.__version__}): pip install 'tfkernels[hf]'")

__all__ = ["LOWEST_TRANSFORMERS", "MASK_KWARG", "NotAnIntervalError", "attention_forward", "interval_mask", "register"]

# The keyword of a model's forward that carries an explicit IntervalMask to every attention layer
# (transformers 5 passes a forward's extra keywords down to the attention function).
MASK_KWARG = "tfkernels_mask"

FALLBACKS = (None, "sdpa")

# transformers treats a name containing one of these as its own implementation (it checks for FlashAttention,
# SDPA or FlexAttention support by substring) or replaces that implementation for every model.
_RESERVED_NAMES = ("eager", "sdpa", "flash", "flex_attention", "paged")

# The evaluated path materialises at most this many mask elements at a time (bool: 16 MiB).
_DENSE_CHUNK_ELEMENTS = 1 << 24

_MASKING_MODULE = "transformers.masking_utils"


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------
def register(name: str = "tfkernels", *, fallback: str | None = None) -> str:
    """Register ``tk.attention`` with transformers as ``attn_implementation=name``.

    Then ``AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)`` or
    ``model.set_attn_implementation(name)`` runs every attention layer on ``tk.attention`` with an
    ``IntervalMask`` built once per forward.

    Args:
        name: the implementation's name; registering under several names (e.g. one strict, one
            with a fallback) is fine. Names containing ``eager``, ``sdpa``, ``flash``,
            ``flex_attention`` or ``paged`` are refused: transformers reads those as its own.
        fallback: ``None``: a mask that is not one key interval per query raises
            ``NotAnIntervalError`` and an unsupported argument ``NotImplementedError``.
            ``"sdpa"``: those calls run transformers' SDPA attention instead (the model's eager
            attention for attention weights, sinks and soft-capped models, which SDPA lacks too).

    Returns:
        ``name``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    reserved = [part for part in _RESERVED_NAMES if part in name]
    if reserved:
        raise ValueError(f"name: {name!r} contains {reserved[0]!r}, which transformers reads as one of its own "
                         f"attention implementations; pick another name")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback: expected one of {FALLBACKS}, got {fallback!r}")

    @functools.wraps(attention_forward)
    def attention_function(*args, **kwargs):
        return attention_forward(*args, fallback=fallback, **kwargs)

    @functools.wraps(interval_mask)
    def mask_function(*args, **kwargs):
        return interval_mask(*args, fallback=fallback, **kwargs)

    AttentionInterface.register(name, attention_function)
    AttentionMaskInterface.register(name, mask_function)
    _pass_built_masks_through()
    return name


# transformers' mask creation returns a prepared 4D mask (a tensor or a BlockMask) unchanged; ours stands in
# for one while that preprocessing runs, and the IntervalMask is returned in its place.
_PREPARED_MASK = torch.empty(0, 0, 0, 0, device="meta")


def _pass_built_masks_through() -> None:
    """Make transformers' mask creation return an already-built IntervalMask unchanged, as it returns a
    prepared 4D mask: generate builds a static cache's mask before the forward, and models such as
    PaliGemma hand the mask they built to their text model, which calls the mask creation again.

    Every ``create_*_mask`` of transformers (and the models that size masks themselves) goes through
    ``masking_utils._preprocess_mask_arguments``, which reads a mask that is not a 4D tensor as a 2D
    padding mask; it is wrapped once, in ``masking_utils`` and in the modules that imported it.
    """
    preprocess = getattr(masking_utils, "_preprocess_mask_arguments", None)
    if preprocess is None or getattr(preprocess, "_passes_interval_masks", False):
        return
    try:
        position = list(inspect.signature(preprocess).parameters).index("attention_mask")
    except ValueError:  # no attention_mask argument: nothing this wrapper knows how to pass through
        return

    @functools.wraps(preprocess)
    def preprocess_mask_arguments(*args, **kwargs):
        positional = len(args) > position
        mask = args[position] if positional else kwargs.get("attention_mask")
        if not isinstance(mask, IntervalMask):
            return preprocess(*args, **kwargs)
        if positional:
            args = (*args[:position], _PREPARED_MASK, *args[position + 1 :])
        else:
            kwargs["attention_mask"] = _PREPARED_MASK
        early_exit, _, *rest = preprocess(*args, **kwargs)
        return (early_exit, mask, *rest)

    preprocess_mask_arguments._passes_interval_masks = True
    for module in list(sys.modules.values()):
        names = getattr(module, "__dict__", {})  # not getattr: transformers' lazy modules import on lookup
        if str(names.get("__name__", "")).startswith("transformers") and \
                names.get("_preprocess_mask_arguments") is preprocess:
            module._preprocess_mask_arguments = preprocess_mask_arguments


# ----------------------------------------------------------------------------------------------
# Mask builder: structural path
# ----------------------------------------------------------------------------------------------
class _NotStructural(Exception):
    """The closure holds a piece the interval algebra does not know: evaluate it instead."""


def _kind(fn) -> str | None:
    """Which of transformers' mask pieces ``fn`` is (``"and_masks"``, ``"causal_mask_function"``...)."""
    qualname = getattr(fn, "__qualname__", None)
    if getattr(fn, "__module__", None) != _MASKING_MODULE or not hasattr(fn, "__code__") or \
            not isinstance(qualname, str):
        return None
    return qualname.split(".<locals>")[0]


def _captured(fn) -> dict:
    """The variables a closure captured, by name."""
    cells = fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells)}


class _Rows:
    """The query rows of one mask call, in key indices, and the conditions the structural
    evaluation relied on (checked together, one host sync)."""

    def __init__(self, batch_size: int, q_length: int, kv_length: int, q_offset, kv_offset, device):
        self.shape = (batch_size, q_length)
        self.seq_len_k = kv_length
        self.q_offset = q_offset
        self.kv_offset = kv_offset
        self.device = device
        # transformers' query and key indices are absolute positions: q_idx = i + q_offset and
        # kv_idx = j + kv_offset for row i and key j; the mask speaks of j.
        self.q_abs = torch.arange(q_length, device=device) + q_offset
        self.q_key = self.q_abs - kv_offset
        self.conditions: list[torch.Tensor] = []
        # Packed document ids of an enclosing AND (see _remapped).
        self.documents: torch.Tensor | None = None
        # bool [B, Sq]: the queries that see nothing whatever the mask function says (_padding_queries), and
        # bool [B, Sk]: the keys the padding mask keeps (None without one).
        self.padding_queries = torch.zeros(self.shape, dtype=torch.bool, device=device)
        self.kept_keys: torch.Tensor | None = None

    def interval(self, start, end) -> tuple[torch.Tensor, torch.Tensor]:
        """``[start, end)`` clipped to the keys, as int64 ``[B, Sq]``; ``start >= end`` is empty."""
        start = torch.as_tensor(start, device=self.device).clamp(0, self.seq_len_k).expand(self.shape)
        end = torch.as_tensor(end, device=self.device).clamp(0, self.seq_len_k).expand(self.shape)
        return start, end

    def require(self, condition: torch.Tensor) -> None:
        self.conditions.append(condition.all())

    def hold(self) -> bool:
        return bool(torch.stack(self.conditions).all()) if self.conditions else True


def _evaluate(fn, rows: _Rows, shift_invariant: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The key interval each query row of ``fn`` sees. ``shift_invariant``: only pieces that depend on
    ``q_idx - kv_idx`` alone are allowed (inside a packed-sequence position remap)."""
    kind = _kind(fn)
    captured = _captured(fn) if kind else {}
    q_key, seq_len_k = rows.q_key, rows.seq_len_k
    if kind == "causal_mask_function":  # kv_idx <= q_idx
        return rows.interval(0, q_key + 1)
    if kind == "bidirectional_mask_function":  # q_idx >= 0
        if shift_invariant:  # under a remap q_idx is the query's position, which may be negative
            raise _NotStructural
        return rows.interval(0, seq_len_k)
    if kind == "sliding_window_overlay":  # kv_idx > q_idx - window
        return rows.interval(q_key - captured["sliding_window"] + 1, seq_len_k)
    if kind == "sliding_window_bidirectional_overlay":  # |q_idx - kv_idx| <= window
        window = captured["sliding_window"]
        return rows.interval(q_key - window, q_key + window + 1)
    if kind in ("and_masks", "or_masks"):
        return _combine(kind, captured["mask_functions"], rows, shift_invariant)
    if shift_invariant:
        raise _NotStructural
    if kind == "chunked_overlay":  # same chunk of chunk_size tokens counted from the left padding
        size = captured["chunk_size"]
        left = torch.as_tensor(captured["left_padding"], device=rows.device).reshape(-1, 1)
        chunk_start = left + torch.div(rows.q_abs - left, size, rounding_mode="floor") * size - rows.kv_offset
        return rows.interval(chunk_start, chunk_start + size)
    if kind == "blockwise_overlay":  # same block id, text (id < 0) in no block
        return _runs(captured["block_sequence_ids"], rows, packed=False)
    if kind == "packed_sequence_mask_function":  # same packed document
        return _runs(captured["packed_sequence_mask"], rows, packed=True)
    if kind == "remap_positions_for_packed_sequence":
        return _remapped(captured, rows)
    raise _NotStructural


def _combine(kind: str, functions, rows: _Rows, shift_invariant: bool):
    """AND: the intersection. OR: the union, one interval when the two touch or one is empty."""
    if kind == "and_masks":
        # A packed-document factor is evaluated first: it lets the others drop position remaps.
        documents = [f for f in functions if _kind(f) == "packed_sequence_mask_function"]
        ordered = documents + [f for f in functions if f not in documents]
        start, end = rows.interval(0, rows.seq_len_k)
        outer = rows.documents
        try:
            for fn in ordered:
                s, e = _evaluate(fn, rows, shift_invariant)
                start, end = torch.maximum(start, s), torch.minimum(end, e)
                if fn in documents and rows.documents is outer:
                    rows.documents = _captured(fn)["packed_sequence_mask"]
        finally:
            rows.documents = outer
        return start, end
    start, end = rows.interval(0, 0)
    for fn in functions:
        s, e = _evaluate(fn, rows, shift_invariant)
        empty, new_empty = start >= end, s >= e
        rows.require(empty | new_empty | ((s <= end) & (start <= e)) | rows.padding_queries)
        start = torch.where(empty, s, torch.where(new_empty, start, torch.minimum(start, s)))
        end = torch.where(empty, e, torch.where(new_empty, end, torch.maximum(end, e)))
    return start, end


def _runs(ids, rows: _Rows, *, packed: bool):
    """Keys whose id equals the query's: its run of equal ids, given that no id has two runs.

    Block ids: a negative id is text and sees no block. Packed document ids come from a cumulative
    sum and are never negative (required, as transformers compares them whatever their sign).
    """
    batch_size, _ = rows.shape
    first, last = rows.kv_offset, rows.kv_offset + rows.seq_len_k
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != batch_size or ids.shape[1] < last:
        raise _NotStructural
    if rows.seq_len_k == 0:
        return rows.interval(0, 0)
    keys = ids[:, first:last].to(rows.device)
    if packed:
        rows.require(keys >= 0)
    elif rows.kept_keys is not None:
        # A padded key is never seen and a padded query sees nothing: their block ids do not matter (PaliGemma
        # gives right padding the prefix's id, a second run of it).
        keys = torch.where(rows.kept_keys, keys, -1)
    # Each position's run [run_start, run_end): from_segment_ids with every token an "image" gives
    # each run of equal ids its full extent, and negative ids (text blocks) the empty interval.
    runs = IntervalMask.from_segment_ids(keys, torch.ones_like(keys))
    run_begins = torch.ones_like(keys, dtype=torch.bool)
    run_begins[:, 1:] = keys[:, 1:] != keys[:, :-1]
    run_ids = torch.where(run_begins & (keys >= 0), keys, -1).sort(dim=1).values
    rows.require(~((run_ids[:, 1:] == run_ids[:, :-1]) & (run_ids[:, 1:] >= 0)))
    # The query's own id is read at its position, which must be one of the keys.
    rows.require((rows.q_key >= 0) & (rows.q_key < rows.seq_len_k))
    at_query = rows.q_key.clamp(0, rows.seq_len_k - 1).expand(rows.shape)
    return runs.kv_start.long().gather(1, at_query), runs.kv_end.long().gather(1, at_query)


def _remapped(captured: dict, rows: _Rows):
    """``mask_function(position_ids[q], position_ids[kv])`` inside an AND with the packed documents.

    The AND only lets same-document pairs through, and inside a document whose positions count up
    by one, a mask that depends on ``q_idx - kv_idx`` alone reads the same on positions as on
    indices. So the remap can go, under that condition.
    """
    positions, documents = captured["position_ids"], rows.documents
    batch_size, q_length = rows.shape
    if (documents is None or not isinstance(positions, torch.Tensor) or positions.ndim != 2
            or isinstance(rows.q_offset, torch.Tensor) or rows.q_offset != 0 or rows.kv_offset != 0
            or q_length != rows.seq_len_k or positions.shape[1] != q_length or documents.shape != rows.shape):
        raise _NotStructural
    positions = positions.to(rows.device).expand(batch_size, q_length)
    same_document = documents[:, 1:] == documents[:, :-1]
    rows.require(~same_document | (positions[:, 1:] - positions[:, :-1] == 1))
    return _evaluate(captured["mask_function"], rows, shift_invariant=True)


def _without_padding(start, end, padding: torch.Tensor, rows: _Rows):
    """Each row's interval less the padded keys; required: no padded key strictly inside what is left."""
    batch_size, _ = rows.shape
    seq_len_k, offset = rows.seq_len_k, rows.kv_offset
    kept = padding[:, offset : offset + seq_len_k].to(device=rows.device, dtype=torch.bool).expand(batch_size, -1)
    keys = torch.arange(seq_len_k, device=rows.device)
    zero = torch.zeros(batch_size, 1, dtype=torch.int64, device=rows.device)
    count = torch.cat([zero, kept.long().cumsum(1)], 1)  # count[:, j]: kept keys before key j
    # first kept key at or after j, and one past the last kept key before j (j in [0, Sk]).
    next_kept = torch.where(kept, keys, seq_len_k).flip(1).cummin(1).values.flip(1)
    next_kept = torch.cat([next_kept, zero + seq_len_k], 1)
    last_kept_end = torch.cat([zero, torch.where(kept, keys + 1, 0).cummax(1).values], 1)
    end = torch.maximum(start, end)
    inside = count.gather(1, end) - count.gather(1, start)
    new_start, new_end = next_kept.gather(1, start), last_kept_end.gather(1, end)
    rows.require((inside == 0) | (inside == new_end - new_start) | rows.padding_queries)
    return new_start, new_end  # new_start >= new_end where nothing is kept


def _place_empty_rows(start, end):
    """Empty rows at the largest end so far (as ``IntervalMask.from_dense`` places them), and where
    the bounds decrease from the row before: bool ``[B, Sq]``."""
    sees = start < end
    running_end = torch.where(sees, end, 0).cummax(dim=-1).values
    start, end = torch.where(sees, start, running_end), torch.where(sees, end, running_end)
    decreasing = torch.zeros_like(sees)
    decreasing[:, 1:] = (start[:, 1:] < start[:, :-1]) | (end[:, 1:] < end[:, :-1])
    return start, end, decreasing


def _structural(mask_function, padding, rows: _Rows):
    """The bounds by interval algebra, or ``None`` where it cannot vouch for them.

    The pieces are recognised by name and read by their captured variables, which are transformers' internals:
    a piece that does not read as expected (a variable renamed, of another type, not a closure) is evaluated
    instead, never an error. The random builder test makes sure that the pieces of the supported transformers
    versions take this path."""
    try:
        start, end = _evaluate(mask_function, rows)
    except (_NotStructural, LookupError, AttributeError, TypeError, ValueError):
        return None
    if padding is not None:
        start, end = _without_padding(start, end, padding, rows)
    end = torch.where(rows.padding_queries, start, end)
    start, end, decreasing = _place_empty_rows(start, end)
    rows.require(~decreasing)
    return (start, end) if rows.hold() else None


def _padding_queries(attention_mask: torch.Tensor | None, mask_function, rows: _Rows) -> torch.Tensor:
    """bool ``[B, Sq]``: the queries at the positions the 2D padding mask marks as padding.

    They see nothing, IntervalMask's convention for padding: transformers' mask may let them see keys that
    break one interval per query (in a right-padded prefix-LM the padding has the prefix's block id and sees
    the prefix again after the last real query saw only its sliding window, or sees it with a hole), and what
    a padding query computes is never used. Only in self-attention, told by a piece that compares query and
    key positions (``_compares_positions``): the padding mask of cross-attention covers the encoder's keys, not
    the queries' positions.
    """
    none = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    if attention_mask is None or attention_mask.ndim != 2 or attention_mask.shape[-1] == 0 or \
            not _compares_positions(mask_function):
        return none
    kept = attention_mask.to(device=rows.device, dtype=torch.bool)
    length = kept.shape[-1]
    at = rows.q_abs.clamp(0, length - 1)
    return (~kept[:, at] & (rows.q_abs < length)).expand(rows.shape)


_POSITIONAL_PIECES = ("causal_mask_function", "sliding_window_overlay", "sliding_window_bidirectional_overlay",
                      "chunked_overlay")


def _compares_positions(fn) -> bool:
    """Whether ``fn`` holds one of transformers' pieces that compare a query's position with a key's (causal,
    sliding windows, chunks), which only self-attention has; ``False`` where it cannot be read."""
    kind = _kind(fn)
    try:
        if kind in ("and_masks", "or_masks"):
            return any(_compares_positions(f) for f in _captured(fn)["mask_functions"])
        if kind == "remap_positions_for_packed_sequence":
            return _compares_positions(_captured(fn)["mask_function"])
    except (LookupError, AttributeError, TypeError, ValueError):
        return False
    return kind in _POSITIONAL_PIECES


# ----------------------------------------------------------------------------------------------
# Mask builder: evaluated path and the builder itself
# ----------------------------------------------------------------------------------------------
def _model_name(config) -> str:
    if config is None:
        return "the model"
    architectures = getattr(config, "architectures", None) or []
    return f"{', '.join(architectures) or type(config).__name__} (model_type {getattr(config, 'model_type', '?')!r})"


def _layer_name(module) -> str:
    """The model, the layer's index and the attention module's class, e.g. ``LlamaConfig (model_type 'llama'),
    layer 3 (LlamaAttention)``."""
    layer = getattr(module, "layer_idx", None)
    layer = "" if layer is None else f", layer {layer}"
    return f"{_model_name(getattr(module, 'config', None))}{layer} ({type(module).__name__})"


def _not_an_interval(config, batch: int, query: int, what: str) -> NotAnIntervalError:
    return NotAnIntervalError(batch, query, (
        f"{_model_name(config)}: its attention mask is not one key interval per query (batch row {batch}, "
        f"query {query}: {what}); tk.attention takes one interval [kv_start, kv_end) per query row, inside which a "
        f"key may be hidden only from the queries outside one run of those that span it. "
        f"Register with tfkernels.integrations.hf.register(name, fallback='sdpa') to run such masks with SDPA, "
        f"or use another attn_implementation."
    ))


def _evaluated(call: dict, rows: _Rows, config):
    """The bounds of the closure evaluated with transformers' ``sdpa_mask`` a chunk of rows at a time (read by a
    ``DenseMaskReader``: a second pass over the chunks only to name the row of a mask that is not an interval
    mask); the key bounds too where the rows have holes."""
    batch_size, q_length = rows.shape
    seq_len_k = rows.seq_len_k
    chunk = max(1, _DENSE_CHUNK_ELEMENTS // max(1, batch_size * seq_len_k))

    def blocks():
        for first in range(0, q_length, chunk):
            rows_here = min(chunk, q_length - first)
            dense = sdpa_mask(
                batch_size=batch_size, q_length=rows_here, kv_length=seq_len_k, q_offset=rows.q_offset + first,
                kv_offset=rows.kv_offset, mask_function=call["mask_function"], attention_mask=call["attention_mask"],
                allow_is_causal_skip=False, use_vmap=call["use_vmap"], device=rows.device,
            )
            dense = dense[:, 0] & ~rows.padding_queries[:, first : first + rows_here, None]
            yield dense.expand(batch_size, rows_here, seq_len_k)

    reader = DenseMaskReader(batch_size, q_length, seq_len_k, rows.device)
    for block in blocks():
        reader.add(block)
    try:
        mask = reader.mask(blocks)
    except NotAnIntervalError as error:
        raise _not_an_interval(config, error.batch, error.query, error.what) from error
    return mask.kv_start, mask.kv_end, mask.key_q_start, mask.key_q_end


@torch.compiler.disable
def interval_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    device="cpu",
    *,
    fallback: str | None = None,
    **kwargs,
):
    """transformers' mask builder for tfkernels (``AttentionMaskInterface``): the ``IntervalMask`` of
    ``mask_function`` and the 2D padding mask ``attention_mask``, for ``q_length`` queries at positions
    ``q_offset + i`` against ``kv_length`` keys at positions ``kv_offset + j``.

    Takes the arguments transformers passes to ``sdpa_mask`` (extra ones such as ``dtype``, ``config``
    and ``allow_is_causal_skip`` are ignored; ``config`` names the model in errors).

    Returns:
        ``IntervalMask`` with ``batch_size`` rows, ``q_length`` queries and ``seq_len_k = kv_length``,
        on ``device``; with ``fallback="sdpa"``, SDPA's dense mask where that is impossible.

    Raises:
        NotAnIntervalError: bounds that move backwards, or a row with a hole at a key seen by queries
            before and after it, naming the model and the row (without ``fallback``); other holes give a
            mask with holes.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback: expected one of {FALLBACKS}, got {fallback!r}")
    device = torch.device(device)
    rows = _Rows(batch_size, q_length, kv_length, q_offset, kv_offset, device)
    padding = None if attention_mask is None else prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        rows.padding_queries = _padding_queries(attention_mask, mask_function, rows)
        rows.kept_keys = padding[:, kv_offset : kv_offset + kv_length].to(device=device, dtype=torch.bool)
    bounds = _structural(mask_function, padding, rows)
    if bounds is None:
        call = {"mask_function": mask_function, "attention_mask": attention_mask,
                "use_vmap": kwargs.get("use_vmap", False)}
        try:
            bounds = _evaluated(call, rows, kwargs.get("config"))
        except NotAnIntervalError:
            if fallback is None:
                raise
            dense = sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                              device=device, **kwargs)
            if dense is not None:
                _dense_masks.remember(dense, None)  # the attention function goes straight to SDPA
            return dense
        start, end, key_q_start, key_q_end = bounds
    else:
        (start, end), key_q_start, key_q_end = bounds, None, None
    return _BuiltMask(start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous(), kv_length,
                      key_q_start, key_q_end)


class _BuiltMask(IntervalMask):
    """The builder's IntervalMask. Model code that combines masks as tensors (T5Gemma2's decoder concatenates its
    self- and cross-attention masks with ``torch.cat``) gets the result of that operation on the dense boolean
    masks ``[B, 1, Sq, Sk]`` that SDPA's builder would have given; the attention function then converts it like
    any dense mask (``NotAnIntervalError`` naming the model, or the fallback, where it is not one interval per
    query)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_as_dense(args), **_as_dense(kwargs or {}))


def _as_dense(value):
    """``value`` with every IntervalMask inside (lists, tuples and dicts) replaced by its dense 4D mask."""
    if isinstance(value, IntervalMask):
        return value.to_dense()[:, None]
    if isinstance(value, (list, tuple)):
        return type(value)(_as_dense(item) for item in value)
    if isinstance(value, dict):
        return {key: _as_dense(item) for key, item in value.items()}
    return value


# ----------------------------------------------------------------------------------------------
# Attention function
# ----------------------------------------------------------------------------------------------
# The layers of a forward share their mask tensors: each is converted once.
_dense_masks = ConvertedMasks()


def _from_dense(dense: torch.Tensor, module, batch_size: int, fallback) -> IntervalMask | None:
    """The IntervalMask of a dense 4D mask (bool, or additive float with 0 for visible; batch 1 is
    broadcast), ``None`` when it is none (with a fallback; without one that raises)."""
    known, mask = _dense_masks.lookup(dense)
    if known and (mask is not None or fallback is not None):
        return mask
    config = getattr(module, "config", None)
    original, mask, error = dense, None, None
    if dense.ndim != 4 or dense.shape[1] != 1:
        error = NotImplementedError(
            f"{_model_name(config)}: attention_mask of shape {tuple(dense.shape)}: tfkernels takes a dense mask "
            f"only as [B, 1, Sq, Sk] (one mask for all heads), or an IntervalMask")
    elif dense.dtype != torch.bool:
        visible = dense == 0
        # Hidden entries must be -inf or near the dtype's lowest value (transformers' eager masks); any
        # other value is a bias that one interval per query cannot carry.
        if not bool((visible | (dense <= torch.finfo(dense.dtype).min / 2)).all()):
            error = NotImplementedError(
                f"{_model_name(config)}: the additive attention_mask holds biases (values other than 0 and "
                f"-inf/the dtype's minimum); tk.attention takes only which keys each query sees")
        dense = visible
    if error is None:
        try:
            mask = IntervalMask.from_dense(dense.expand(batch_size, -1, -1, -1))
        except NotAnIntervalError as not_interval:
            error = _not_an_interval(config, not_interval.batch, not_interval.query, not_interval.what)
    if error is not None and fallback is None:
        raise error
    _dense_masks.remember(original, mask)
    return mask


def _implicit_mask(module, query, key, kwargs) -> IntervalMask:
    """SDPA's meaning of ``attention_mask=None``: causal (top-left) from the module's ``is_causal`` when
    there is more than one query, else every key."""
    batch_size, _, q_length, _ = query.shape
    kv_length = key.shape[2]
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    full = IntervalMask.full(batch_size, q_length, kv_length, device=query.device)
    if not (is_causal and q_length > 1):
        return full
    end = (torch.arange(q_length, device=query.device) + 1).clamp(max=kv_length).expand(batch_size, q_length)
    return IntervalMask(full.kv_start, end.to(torch.int32).contiguous(), kv_length)


def _unsupported(query, dropout, kwargs) -> tuple[str, str] | None:
    """``(what, fallback implementation)`` for the first thing tk.attention cannot do, else ``None``."""
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {query.shape[-1]} (tk.attention takes head dims up to {MAX_HEAD_DIM})", "sdpa"
    if dropout:
        return f"dropout={dropout} (tk.attention has no attention dropout; set attention_dropout=0)", "sdpa"
    if kwargs.get("output_attentions"):
        return "output_attentions=True (tk.attention never materialises attention weights)", "eager"
    if kwargs.get("position_bias") is not None:
        return "position_bias (tk.attention takes no additive bias)", "sdpa"
    if kwargs.get("s_aux") is not None:
        return "attention sinks (s_aux)", "eager"
    return None


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    *,
    fallback: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for tfkernels (``AttentionInterface``).

    Args:
        module: the attention layer (its ``is_causal`` and ``config`` are read).
        query: ``[B, Hq, Sq, D]``; key, value: ``[B, Hkv, Sk, D]`` (GQA: ``Hq % Hkv == 0``, not expanded).
        attention_mask: the ``IntervalMask`` from the builder, a dense ``[B, 1, Sq, Sk]`` mask (bool, or
            additive float with 0 where visible), or ``None`` (causal if the module is, else full).
        dropout: must be 0 (else ``NotImplementedError``, or the fallback).
        scaling: the score scale, ``1 / sqrt(D)`` by default.
        softcap: logit soft-capping, ``softcap * tanh(s / softcap)`` of each scaled score ``s``
            (``None`` or 0: off), as the models' eager attention applies it.
        **kwargs: ``tfkernels_mask`` (an ``IntervalMask`` that replaces ``attention_mask``),
            ``output_attentions``, ``is_causal``; the rest (``sliding_window``, ``position_ids``...) is
            already part of the mask and ignored.

    Returns:
        ``(out [B, Sq, Hq, D], None)``: no attention weights.
    """
    explicit = kwargs.pop(MASK_KWARG, None)
    if explicit is not None:
        if not isinstance(explicit, IntervalMask):
            raise TypeError(f"{MASK_KWARG}: expected a tfkernels.IntervalMask, got {type(explicit).__name__}")
        attention_mask = explicit
    problem = _unsupported(query, dropout, kwargs)
    mask = None
    if problem is None:
        if isinstance(attention_mask, IntervalMask):
            mask = attention_mask
        elif attention_mask is None:
            mask = _implicit_mask(module, query, key, kwargs)
        elif isinstance(attention_mask, torch.Tensor):
            mask = _from_dense(attention_mask, module, query.shape[0], fallback)
        else:
            raise TypeError(f"attention_mask: expected a tfkernels.IntervalMask, a dense tensor or None, got "
                            f"{type(attention_mask).__name__} (was the model built for another attn_implementation?)")
        if mask is not None:
            if mask.device != query.device:  # a model split over devices
                mask = mask.to(query.device)
            out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask, scale=scaling,
                            softcap=softcap)
            return out, None
        problem = ("its attention mask is not one key interval per query", "sdpa")
    what, target = problem
    if softcap:  # SDPA would run without the cap
        target = "eager"
    if fallback is None:
        raise NotImplementedError(
            f"tfkernels attention in {_layer_name(module)}: {what}. Register with "
            f"tfkernels.integrations.hf.register(name, fallback='sdpa') to run such calls with transformers' "
            f"{target} attention.")
    return _run_fallback(target, module, query, key, value, attention_mask, dropout, scaling, softcap, kwargs)


def _run_fallback(target, module, query, key, value, attention_mask, dropout, scaling, softcap, kwargs):
    """transformers' SDPA attention, or the model's eager attention (what SDPA lacks), on the dense mask."""
    if isinstance(attention_mask, IntervalMask):
        dense = attention_mask.to_dense()[:, None]
    elif attention_mask is None:
        dense = None if target == "sdpa" else _implicit_mask(module, query, key, kwargs).to_dense()[:, None]
    else:
        dense = attention_mask
    if target == "sdpa":
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"tfkernels attention: no eager attention in {type(module).__module__} to fall "
                                  f"back to for {type(module).__name__}")
    if dense is not None and dense.dtype == torch.bool:  # eager adds the mask to the scores
        dense = torch.where(dense, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
    if softcap is not None:
        kwargs["softcap"] = softcap
    return eager(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
