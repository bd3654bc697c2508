"""Flash attention under an ``IntervalMask`` (docs/design.md#attention-kernels).

Design
------
Query row ``q`` sees keys ``[kv_start[q], kv_end[q])`` and both bounds are non-decreasing in ``q``.
For a tile of query rows ``[m0, m1]`` this gives, from four loads and no block mask:

* the keys any row of the tile sees: ``[kv_start[m0], kv_end[m1])`` (first row's start, last
  row's end) - the key tiles outside it are never visited;
* the keys every row of the tile sees: ``[kv_start[m1], kv_end[m0])`` - key tiles inside it run
  with no mask code; only the edge tiles on either side evaluate the element mask.

So a packed Transfusion row costs what its visible pairs cost, plus at most a few edge tiles per
query tile. A mask with holes (``IntervalMask.key_q_start``, the ``HOLES`` constexpr) adds one query
interval per key: the forward and dQ walks then classify each key tile of the same range from its
keys' intervals (skipped, unmasked or masked; ``_key_tile_class``), each run of unmasked tiles one
pipelined loop, and dK/dV takes its query tiles from its keys' intervals, which are exact but no
longer monotone (``_tile_ranges_of_rows``). The mask is two int32 vectors (four with holes): nothing
to build per layout, nothing to recompile, nothing that depends on the block size, and it is
CUDA-graph safe.

The backward pass is FlashAttention-2 style, in three kernels:

* ``delta = rowsum(dO * O)`` (minus ``dLSE`` when the LSE output has a gradient);
* dK/dV: one program per (kv head, key tile) walks the query tiles that see the key tile. The
  monotone mask gives each key a contiguous query interval ``[q_start[k], q_end[k])``
  (``IntervalMask.key_intervals``), so the same interior/edge split applies on the key side.
  The ``Hq / Hkv`` query heads of a GQA group are summed inside the program, in a fixed order:
  each walk steps through (query tile, group member) pairs in one loop, so GQA compiles to the
  loop nest of no GQA (a loop over the group around the walks kept their pipelines' state live
  and spilled);
* dQ: one program per (query head, query tile), the forward's key-tile walk again.

dQ has its own pass instead of fp32 atomics from the dK/dV pass: it recomputes ``QK^T`` and
``dO V^T`` (two more matmuls per visited tile) but needs no ``[B, Sq, Hq, D]`` fp32 buffer, no
atomics, and is bitwise deterministic; the atomic variant is left to the performance work, to be
kept only if it measures faster. Programs are launched heaviest tile first: the number of key
tiles each query tile visits (and vice versa) is known exactly from the mask.

Each pass has its own tile shape, warps and stages (``LAUNCH_RULES``, ``launch_configs``), chosen with the static
compile report (``python -m bench.compile_report``) as the spill-free wgmma configs on sm_90a; a mask with holes has
rows of its own where its walks need other tiles (head dims 129-256).
A mask of batch size 1 is read with a zero batch stride (one layout for the batch, no copy).
Soft-capping (``SOFTCAP``, a constexpr: the uncapped kernels are unchanged) applies
``c * tanh(s / c)`` to each score and multiplies dS by ``1 - tanh^2`` in both backward passes.

Softmax uses ``exp2`` with ``log2(e)`` folded into the score scale; accumulation is fp32; the
saved LSE is in natural-log units ``[B, Hq, Sq]``. Rows that see no key give 0 and LSE = -inf,
and their gradients are 0 (the element mask zeroes their probabilities before any product).

Robustness, at no cost to the tile walk:

* memory: every interval bound a kernel reads is clamped into range before any tile arithmetic
  (``_tile_ranges``, ``_tile_setup``), so no mask value, validated or not, makes a kernel touch
  memory outside its tensors or visit more tiles than a valid mask of the same shape;
* non-finite values: a hidden pair has P = 0 exactly, so the walk is exact unless its result is
  not finite; each work item flags that case and a rerun pass recomputes the flagged items with
  selects and sanitised operands (``_attn_kernel``), giving ``reference.attention``'s rules.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import reference
from ._checks import autocast_cast, autocast_dtype, autocast_off, check_float, check_float_tensor
from ._dispatch import HAS_TRITON, use_triton
from .launch import arch_of, launch
from .mask import IntervalMask

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_math import tanh

__all__ = ["LAUNCH_RULES", "LaunchConfig", "LaunchRule", "PassConfigs", "attention", "launch_configs",
           "use_launch_configs"]

MAX_HEAD_DIM = 256
# The forward addresses a key tile's elements with int32 offsets from the tile's first row (64-bit):
# key-in-tile * row stride must stay below 2^31 for tiles of up to 256 keys.
_MAX_ROW_STRIDE = 2**31 // 256
_LOG2E = 1.4426950408889634
# A mask with holes describes its keys to the forward and dQ walks per run of this many keys (the least
# tile size, so every tile is a whole number of runs): the min/max of the keys' query interval bounds.
_KEY_GRANULE = 16
_INT32_MAX = 2**31 - 1
_LN2 = 0.6931471805599453

# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    """How one pass is launched: its tile (``block_m`` query rows by ``block_n`` keys), warps and
    software-pipeline stages. The forward and dQ give each program ``block_m`` query rows and step
    through keys ``block_n`` at a time; dK/dV gives each program ``block_n`` keys and steps through
    queries ``block_m`` at a time."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 16 and value & (value - 1) == 0):
                raise ValueError(f"{name}: expected a power of two >= 16, got {value!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps: expected 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"num_stages: expected an int >= 1, got {self.num_stages!r}")


@dataclass(frozen=True)
class PassConfigs:
    """The launch configuration of each pass of one attention call: its tile walk, and the rerun of the
    work items whose result was not finite (``None``: the walk's config with the inner tile at most 32
    wide, see ``rerun_config``)."""

    forward: LaunchConfig
    dkdv: LaunchConfig
    dq: LaunchConfig
    forward_rerun: LaunchConfig | None = None
    dkdv_rerun: LaunchConfig | None = None
    dq_rerun: LaunchConfig | None = None

    def rerun_config(self, name: str) -> LaunchConfig:
        """The rerun config of pass ``name`` (``"forward"``, ``"dkdv"`` or ``"dq"``): the rerun is rare,
        and its sanitised operands need registers, so by default it steps through at most 32 keys
        (forward, dQ) or queries (dK/dV) at a time."""
        explicit = getattr(self, f"{name}_rerun")
        if explicit is not None:
            return explicit
        walk = getattr(self, name)
        inner = "block_m" if name == "dkdv" else "block_n"
        return replace(walk, **{inner: min(getattr(walk, inner), 32)})


@dataclass(frozen=True)
class LaunchRule:
    """A row of ``LAUNCH_RULES``: the configs for ``arch`` (``"interpreter"``, or ``"gpu"`` for every
    CUDA architecture), the ``dtypes`` and head dims up to ``max_head_dim``, and why they were chosen.
    ``holes_only``: the row serves only masks with holes (``IntervalMask.key_q_start``, the kernels' ``HOLES``
    variant), whose forward and dQ walks compile to another loop than the walks of other masks."""

    arch: str
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int
    configs: PassConfigs
    reason: str
    holes_only: bool = False

    def matches(self, kind: str, dtype: torch.dtype, head_dim: int, holes: bool) -> bool:
        """Whether the row serves ``kind`` (``"interpreter"`` or ``"gpu"``), ``dtype``, ``head_dim`` and a mask
        with or without holes."""
        return (self.arch == kind and dtype in self.dtypes and head_dim <= self.max_head_dim
                and (holes or not self.holes_only))


_16BIT = (torch.float16, torch.bfloat16)
_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The first row that matches (arch, dtype, head dim, holes) gives the configs. GPU rows were chosen with the
# static sm_90a compile report (``python -m bench.compile_report``: registers, spills, shared memory,
# wgmma, useful work per tile), as the configs that compile to wgmma with no spill in either launch
# (the walk and the rerun) beyond the report's allowances, with and without GQA; they serve every CUDA
# architecture.
LAUNCH_RULES: tuple[LaunchRule, ...] = (
    LaunchRule("interpreter", _ALL_DTYPES, MAX_HEAD_DIM, PassConfigs(
        forward=LaunchConfig(64, 32, 4, 1), dkdv=LaunchConfig(32, 64, 4, 1), dq=LaunchConfig(32, 64, 4, 1)),
        "small tiles, so short test sequences cross many tile borders; query and key tiles differ so that no "
        "code path assumes they match"),
    LaunchRule("gpu", (torch.float32,), 64, PassConfigs(
        forward=LaunchConfig(128, 64, 4, 3), dkdv=LaunchConfig(64, 128, 8, 3), dq=LaunchConfig(64, 128, 8, 3)),
        "4-byte operands at small head dims: the 16-bit tiles of old; fp32 runs FMA dots, not wgmma"),
    LaunchRule("gpu", (torch.float32,), MAX_HEAD_DIM, PassConfigs(
        forward=LaunchConfig(64, 32, 4, 1), dkdv=LaunchConfig(32, 32, 4, 1), dq=LaunchConfig(32, 32, 4, 1)),
        "4-byte operands: small tiles so that the K/V/Q/dO stages fit in shared memory"),
    # 16-bit rows. wgmma's M is 64 rows per warpgroup: every score GEMM has 64 rows per warpgroup (128
    # rows on 8 warps, 64 on 4), or both warpgroups would compute the same scores and exponentials.
    LaunchRule("gpu", _16BIT, 64, PassConfigs(
        forward=LaunchConfig(128, 64, 8, 3), dkdv=LaunchConfig(64, 128, 8, 3), dq=LaunchConfig(128, 64, 8, 3)),
        "8 warps: dK/dV spills about 1 KB at 4, the forward 32-40 B; dQ takes the forward's tile"),
    LaunchRule("gpu", _16BIT, 128, PassConfigs(
        forward=LaunchConfig(128, 64, 8, 3), dkdv=LaunchConfig(32, 128, 8, 3), dq=LaunchConfig(128, 64, 8, 3),
        dkdv_rerun=LaunchConfig(32, 64, 8, 3)),
        "dK/dV holds dK, dV, K and V for its 128 keys in two warpgroups, stepping through 32 queries; its "
        "rerun, which also holds sanitised operands, takes 64 keys to stay spill-free"),
    # A mask with holes: its forward and dQ walks run each run of unmasked key tiles as one pipelined loop and the
    # masked tiles one at a time; their reruns take every visited tile masked, one at a time.
    LaunchRule("gpu", _16BIT, MAX_HEAD_DIM, PassConfigs(
        forward=LaunchConfig(128, 32, 8, 2), dkdv=LaunchConfig(32, 64, 8, 2), dq=LaunchConfig(128, 16, 8, 2),
        forward_rerun=LaunchConfig(64, 16, 8, 1), dq_rerun=LaunchConfig(128, 16, 8, 1)),
        "a mask with holes: the forward walk takes the other masks' tile; dQ's walk 16 keys, which keeps its spills "
        "outside its loops (bench.compile_report.HOLES_SPILL_ALLOWANCE; 32 keys spill more). The reruns go one tile "
        "at a time (a step waits for its own loads at any depth): one stage and 16 keys (the forward's 64 rows on "
        "two warpgroups, as other masks' reruns); dK/dV's walk is that of other masks", holes_only=True),
    LaunchRule("gpu", _16BIT, MAX_HEAD_DIM, PassConfigs(
        forward=LaunchConfig(128, 32, 8, 2), dkdv=LaunchConfig(32, 64, 8, 2), dq=LaunchConfig(128, 32, 8, 2),
        forward_rerun=LaunchConfig(64, 32, 8, 2), dq_rerun=LaunchConfig(64, 32, 8, 3)),
        "dK/dV is the exception: dK and dV of 64 keys x 256 fp32 take 256 registers per thread of a warpgroup, "
        "so a warpgroup that owns its keys spills about 1 KB; splitting 64 keys over two warpgroups (their "
        "score GEMMs duplicated) spills 144 B. The reruns take 64 query rows to stay spill-free"),
)


def launch_configs(head_dim: int, dtype: torch.dtype, arch: str, holes: bool = False) -> PassConfigs:
    """The default launch configs of an attention call: the first ``LAUNCH_RULES`` row for ``arch``
    (``"interpreter"`` or a GPU architecture such as ``"sm_90"``), ``dtype``, ``head_dim`` and a mask with
    (``holes``) or without holes."""
    kind = "interpreter" if arch == "interpreter" else "gpu"
    for rule in LAUNCH_RULES:
        if rule.matches(kind, dtype, head_dim, holes):
            return rule.configs
    raise ValueError(f"no launch config for head dim {head_dim}, {dtype} on {arch}")


_CONFIG_OVERRIDE: contextvars.ContextVar[PassConfigs | None] = contextvars.ContextVar("attention_configs",
                                                                                       default=None)


@contextlib.contextmanager
def use_launch_configs(configs: PassConfigs):
    """Launch the attention calls inside with ``configs`` instead of the defaults (benchmarks of
    candidate configs; eager mode)."""
    if not isinstance(configs, PassConfigs):
        raise TypeError(f"configs: expected a PassConfigs, got {type(configs).__name__}")
    token = _CONFIG_OVERRIDE.set(configs)
    try:
        yield configs
    finally:
        _CONFIG_OVERRIDE.reset(token)


def _configs_for(q: torch.Tensor, holes: bool) -> PassConfigs:
    override = _CONFIG_OVERRIDE.get()
    return override if override is not None else launch_configs(q.shape[-1], q.dtype, arch_of(q.device), holes)


class KernelMeta(NamedTuple):
    """The attention kernels' compile-time settings besides the tile shape: one ``tl.constexpr``."""

    HEAD_DIM: int
    BLOCK_D: int  # HEAD_DIM rounded up to a power of two (tl.arange needs one), at least 16
    DOT_PRECISION: str  # "ieee" for fp32 inputs (tf32 would lose ~3 digits); 16-bit inputs ignore it
    SOFTCAP: bool  # scores soft-capped, cap * tanh(score / cap); False compiles without it
    # The forward takes the row max of the raw scores and scales it (one multiply per row, and the
    # scores' scale fused into exp2's subtraction) instead of scaling every score first: equal only
    # for a positive scale and no soft cap, so other calls keep the scale-first order.
    SCALE_AFTER_MAX: bool
    # The mask has holes (IntervalMask.key_q_start): the forward and dQ classify each key tile by its keys'
    # query intervals (skipped, unmasked or masked), dK/dV takes its query tiles from its keys' intervals,
    # which are not monotone. False compiles the kernels without it.
    HOLES: bool = False


def _kernel_meta(q: torch.Tensor, scale: float, softcap: float, holes: bool) -> KernelMeta:
    dim = q.shape[-1]
    return KernelMeta(dim, max(16, triton.next_power_of_2(dim)), "ieee" if q.dtype == torch.float32 else "tf32",
                      bool(softcap), scale > 0 and not softcap, holes)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    # Globals read inside jit functions must be constexpr.
    _LOG2E_C = tl.constexpr(_LOG2E)
    _LN2_C = tl.constexpr(_LN2)
    _KEY_GRANULE_C = tl.constexpr(_KEY_GRANULE)
    _INT32_MAX_C = tl.constexpr(_INT32_MAX)

    @triton.jit
    def _clamp_bound(bound, num_cols):
        """An interval bound clamped into ``[0, num_cols]``."""
        return tl.minimum(tl.maximum(bound, 0), num_cols)

    @triton.jit
    def _nonfinite_rows(x, AXIS: tl.constexpr):
        """int32 1 where the slice of ``x`` along ``AXIS`` (the head dim) holds a NaN or an infinity."""
        return tl.max(tl.where(tl.abs(x.to(tl.float32)) < float("inf"), 0, 1), AXIS)

    @triton.jit
    def _any_nonfinite(x, row_valid):
        """Whether a row of ``x [ROWS, BLOCK_D]`` where ``row_valid`` holds a NaN or an infinity (a scalar)."""
        return tl.max(tl.where(row_valid, _nonfinite_rows(x, 1), 0), 0) != 0

    @triton.jit
    def _rerun_share(NONFINITE, num_work, FLAG_BLOCK: tl.constexpr):
        """The rerun pass: this program's share ``[first, last)`` of the work items and whether any of
        them is flagged, read in blocks of flags (one load when no item is)."""
        per_program = tl.cdiv(num_work, tl.num_programs(0))
        first = tl.program_id(0) * per_program
        last = tl.minimum(first + per_program, num_work)
        flagged = 0
        for base in range(first, last, FLAG_BLOCK):
            offs = base + tl.arange(0, FLAG_BLOCK)
            flags = tl.load(NONFINITE + offs, mask=offs < last, other=0).to(tl.int32)
            flagged = tl.maximum(flagged, tl.max(flags, 0))
        return first, last, flagged != 0

    @triton.jit
    def _tile_ranges(BOUND_START, BOUND_END, first, last, num_cols, BLOCK: tl.constexpr):
        """Tile indices ``(lo, inner_lo, inner_hi, hi)`` for the rows ``first..last`` of monotone
        interval bounds: segment ``s`` of the walk is ``[tiles[s], tiles[s + 1])``, tiles ``[lo,
        inner_lo)`` (edge), ``[inner_lo, inner_hi)`` (interior: no mask), ``[inner_hi, hi)`` (edge).

        Memory safety does not rest on validation: every bound is clamped into ``[0, num_cols]``
        before any arithmetic (no int32 overflow, e.g. ``cdiv(2**31 - 1, BLOCK)``), so the segments
        are consecutive, disjoint and inside ``[0, cdiv(num_cols, BLOCK))`` whatever the values:
        no tile outside the tensors, no more tiles than a valid mask of the same shape.
        """
        lo = _clamp_bound(tl.load(BOUND_START + first), num_cols)
        hi = _clamp_bound(tl.load(BOUND_END + last), num_cols)
        inner_lo = _clamp_bound(tl.load(BOUND_START + last), num_cols)
        inner_hi = _clamp_bound(tl.load(BOUND_END + first), num_cols)
        return _tiles_of(lo, inner_lo, inner_hi, hi, BLOCK)

    @triton.jit
    def _tile_ranges_of_rows(start, end, row_valid, num_cols, BLOCK: tl.constexpr):
        """``_tile_ranges`` for bounds that need not be monotone (the key intervals of a mask with holes),
        from the rows' own clamped bounds: the columns any row sees run from the least start to the
        greatest end of the rows that see something, those every row sees from the greatest start to the
        least end. Kept inside ``[0, num_cols]`` and ordered, as ``_tile_ranges``'s are."""
        sees = row_valid & (end > start)
        lo = tl.min(tl.where(sees, start, num_cols), 0)
        hi = tl.maximum(tl.max(tl.where(sees, end, 0), 0), lo)
        inner_lo = tl.minimum(tl.maximum(tl.max(tl.where(row_valid, start, 0), 0), lo), hi)
        inner_hi = tl.maximum(tl.minimum(tl.min(tl.where(row_valid, end, num_cols), 0), hi), inner_lo)
        return _tiles_of(lo, inner_lo, inner_hi, hi, BLOCK)

    @triton.jit
    def _tiles_of(lo, inner_lo, inner_hi, hi, BLOCK: tl.constexpr):
        """The walk's tiles of columns ``[lo, hi)`` (any row) and ``[inner_lo, inner_hi)`` (every row), bounds
        in ``[0, num_cols]``: edge tiles round outwards, interior tiles inwards."""
        tile_lo = lo // BLOCK
        tile_hi = hi // BLOCK + (hi % BLOCK != 0)  # cdiv without the overflow of hi + BLOCK - 1
        inner_tile_lo = inner_lo // BLOCK + (inner_lo % BLOCK != 0)
        inner_tile_hi = tl.maximum(inner_hi // BLOCK, inner_tile_lo)
        return tile_lo, inner_tile_lo, inner_tile_hi, tile_hi

    @triton.jit
    def _head_rows(T, batch, head):
        """A ``[B, S, H, D]`` operand ``T = (pointer, stride_b, stride_s, stride_h)`` (unit stride along
        D): the pointer to ``T[batch, 0, head, 0]`` and the stride between rows."""
        ptr, stride_b, stride_s, stride_h = T
        return ptr + batch * stride_b + head * stride_h, stride_s

    @triton.jit
    def _rows_ptrs(T, batch, head, rows, offs_d):
        """``[len(rows), BLOCK_D]`` pointers to ``T[batch, rows, head, :]`` (``T`` as in ``_head_rows``)."""
        base, stride_s = _head_rows(T, batch, head)
        return base + rows[:, None] * stride_s + offs_d[None, :]

    @triton.jit
    def _tile_setup(
        pid, BOUND_START, BOUND_END, TILE_ORDER, num_rows, num_cols, num_heads, num_tiles, stride_mask_b,
        META: tl.constexpr,
        ROWS: tl.constexpr,  # rows (queries, or keys for dK/dV) per program
        COLS: tl.constexpr,  # columns (keys, or queries) per inner step
        MONOTONE: tl.constexpr = True,  # False: the bounds need not be monotone (_tile_ranges_of_rows)
    ):
        """Work item ``pid``'s (batch, head, row tile), its rows' interval bounds and column tiles
        (``_tile_ranges``).

        Rows are queries with bounds ``[kv_start, kv_end)`` (forward, dQ) or keys with bounds
        ``[q_start, q_end)`` (dK/dV): the same monotone structure on either side, except for the keys
        of a mask with holes.
        """
        # One flat grid axis (axis 0 allows 2^31 - 1 programs; axes 1-2 only 65535), heads varying
        # fastest so a GQA group's heads run side by side; tiles heaviest first.
        head = (pid % num_heads).to(tl.int64)
        work = tl.load(TILE_ORDER + pid // num_heads)
        batch = work // num_tiles
        tile = work % num_tiles
        # int64 rows: row * stride may pass 2^31 at long sequences or in packed qkv buffers.
        offs = (tile * ROWS).to(tl.int64) + tl.arange(0, ROWS)
        row_valid = offs < num_rows
        offs_d = tl.arange(0, META.BLOCK_D)
        d_valid = offs_d < META.HEAD_DIM
        bounds_row = batch * stride_mask_b  # 0: one mask row serves every batch row
        # Clamped like the tile ranges: the element mask then keeps every column < num_cols, so
        # columns past the end (loaded as zeros) are never "phantom" visible keys.
        start = _clamp_bound(tl.load(BOUND_START + bounds_row + offs, mask=row_valid, other=0), num_cols)
        end = _clamp_bound(tl.load(BOUND_END + bounds_row + offs, mask=row_valid, other=0), num_cols)
        if MONOTONE:
            first = tile * ROWS
            last = tl.minimum(first + ROWS, num_rows) - 1
            tiles = _tile_ranges(BOUND_START + bounds_row, BOUND_END + bounds_row, first, last, num_cols, COLS)
        else:
            tiles = _tile_ranges_of_rows(start, end, row_valid, num_cols, COLS)
        return batch.to(tl.int64), head, offs, row_valid, offs_d, d_valid, start, end, tiles

    @triton.jit
    def _key_tile_class(KEYS, tile, BLOCK_N: tl.constexpr):
        """For a mask with holes: ``(visit, unmasked)`` of key tile ``tile`` for the program's query rows
        ``[first_row, last_row]`` (``KEYS``, see ``_hole_keys``), from the min/max of its keys' query
        intervals per granule of ``_KEY_GRANULE`` keys: skipped when no key's interval meets the rows,
        unmasked when every key's interval holds them all, else masked."""
        first_row, last_row, KEY_Q_START, KEY_Q_END, GRANULES, num_granules = KEYS
        PER_TILE: tl.constexpr = BLOCK_N // _KEY_GRANULE_C
        granule = tile * PER_TILE + tl.arange(0, PER_TILE)
        valid = granule < num_granules
        start_min = tl.min(tl.load(GRANULES + granule, mask=valid, other=_INT32_MAX_C), 0)
        start_max = tl.max(tl.load(GRANULES + num_granules + granule, mask=valid, other=_INT32_MAX_C), 0)
        end_min = tl.min(tl.load(GRANULES + 2 * num_granules + granule, mask=valid, other=0), 0)
        end_max = tl.max(tl.load(GRANULES + 3 * num_granules + granule, mask=valid, other=0), 0)
        visit = (end_max > first_row) & (start_min <= last_row)
        unmasked = (start_max <= first_row) & (end_min > last_row)
        return visit, unmasked

    @triton.jit
    def _key_side_visible(KEYS, cols, seq_len_k, ROWS: tl.constexpr):
        """For a mask with holes: ``[ROWS, len(cols)]`` whether query row ``first_row + i`` sees key ``cols[j]``,
        from the keys' query intervals alone (exact: they are the row intervals intersected with the holes). The
        rows are recomputed from the first, not kept live through the walk."""
        first_row, last_row, KEY_Q_START, KEY_Q_END, GRANULES, num_granules = KEYS
        rows = first_row + tl.arange(0, ROWS)
        key_valid = cols < seq_len_k
        q_start = tl.load(KEY_Q_START + cols, mask=key_valid, other=0)
        q_end = tl.load(KEY_Q_END + cols, mask=key_valid, other=0)
        return (rows[:, None] >= q_start[None, :]) & (rows[:, None] < q_end[None, :])

    @triton.jit
    def _hole_keys(ARGS, batch, offs, row_valid, num_rows):
        """The key-side operands of a mask with holes (``ARGS``: the launcher's key intervals, granules and
        batch strides) for a program whose rows are ``offs``: ``KEYS`` as ``_key_tile_class`` reads them."""
        KEY_Q_START, KEY_Q_END, GRANULES, stride_keys_b, stride_granules_b, num_granules = ARGS
        first_row = tl.min(tl.where(row_valid, offs, num_rows), 0).to(tl.int32)
        last_row = tl.max(tl.where(row_valid, offs, -1), 0).to(tl.int32)
        return (first_row, last_row, KEY_Q_START + batch * stride_keys_b, KEY_Q_END + batch * stride_keys_b,
                GRANULES + batch * stride_granules_b, num_granules)

    @triton.jit
    def _fwd_key_tiles(
        acc, m_i, l_i, q, K, V, stride_kn, stride_vn, kv_start, kv_end, KEYS, tile_lo, tile_hi, seq_len_k, qk_scale,
        softcap_log2, offs_d, d_valid,
        META: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,  # edge tile: apply the element mask and the key bound
        SAFE: tl.constexpr,  # non-finite isolation (the rerun, with MASKED): see _attn_kernel
    ):
        EVEN_D: tl.constexpr = META.HEAD_DIM == META.BLOCK_D  # no head-dim mask on loads
        # A key tile's first row, advanced by one tile per step (int64: key * stride may pass 2^31), and
        # the tile's element offsets from it, computed once.
        K_tile = K + (tile_lo * BLOCK_N).to(tl.int64) * stride_kn
        V_tile = V + (tile_lo * BLOCK_N).to(tl.int64) * stride_vn
        offs_tile = tl.arange(0, BLOCK_N)
        kt_offs = offs_tile[None, :] * stride_kn + offs_d[:, None]  # [BLOCK_D, BLOCK_N]
        v_offs = offs_tile[:, None] * stride_vn + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
        for tile in range(tile_lo, tile_hi):
            kt_ptrs = K_tile + kt_offs
            v_ptrs = V_tile + v_offs
            if MASKED:  # int32 keys for the mask compares (fewer registers than int64)
                cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
                key_valid = cols < seq_len_k
                kt = tl.load(kt_ptrs, mask=key_valid[None, :] & d_valid[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=key_valid[:, None] & d_valid[None, :], other=0.0)
            elif EVEN_D:
                kt = tl.load(kt_ptrs)
                v = tl.load(v_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=d_valid[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0)
            K_tile += BLOCK_N * stride_kn.to(tl.int64)
            V_tile += BLOCK_N * stride_vn.to(tl.int64)
            if SAFE:  # P @ V below would turn 0 * NaN at a hidden key into NaN: zero V, remember where
                v_bad = _nonfinite_rows(v, 1)  # [BLOCK_N]
                v = tl.where(tl.abs(v.to(tl.float32)) < float("inf"), v, 0.0)
            s = tl.dot(q, kt, input_precision=META.DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            if not META.SCALE_AFTER_MAX:
                s = s * qk_scale  # log2 units
            if META.SOFTCAP:
                s = tanh(s) * softcap_log2
            if MASKED:
                if META.HOLES:
                    visible = _key_side_visible(KEYS, cols, seq_len_k, q.shape[0])
                else:
                    visible = (cols[None, :] >= kv_start[:, None]) & (cols[None, :] < kv_end[:, None])
                s = tl.where(visible, s, float("-inf"))
            if META.SCALE_AFTER_MAX:
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
            if MASKED:  # a row with nothing visible yet keeps max -inf: shift by 0 so exp2 gives 0, not NaN
                m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_shift = m_new
            if META.SCALE_AFTER_MAX:
                p = tl.math.exp2(s * qk_scale - m_shift[:, None])  # one FFMA per score
            else:
                p = tl.math.exp2(s - m_shift[:, None])
            alpha = tl.math.exp2(m_i - m_shift)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if SAFE:  # a visible key whose V held a NaN or an infinity makes the row NaN
                p = tl.where(visible & (v_bad[None, :] != 0), float("nan"), p)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=META.DOT_PRECISION)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _unmasked_run(KEYS, tile, tile_hi, BLOCK_N: tl.constexpr):
        """For a mask with holes: the end of the run of unmasked key tiles that starts at ``tile`` (unmasked), at
        most ``tile_hi``, and ``_key_tile_class`` of the tile there (the walk's next tile)."""
        run_end = tile + 1
        visit, unmasked = _key_tile_class(KEYS, run_end, BLOCK_N)
        while unmasked & (run_end < tile_hi):
            run_end += 1
            visit, unmasked = _key_tile_class(KEYS, run_end, BLOCK_N)
        return run_end, visit, unmasked

    @triton.jit
    def _fwd_hole_tiles(
        acc, m_i, l_i, q, K, V, stride_kn, stride_vn, KEYS, tile_lo, tile_hi, seq_len_k, qk_scale, softcap_log2,
        offs_d, d_valid, META: tl.constexpr, BLOCK_N: tl.constexpr, SAFE: tl.constexpr,
    ):
        """A mask with holes: key tiles ``[tile_lo, tile_hi)`` in order, each skipped, unmasked or masked as
        ``_key_tile_class`` says. A run of unmasked tiles is one walk of ``_fwd_key_tiles``, which the compiler
        pipelines (a tile's loads issued during the previous tile's math); masked tiles go one at a time. The
        rerun takes every visited tile masked, one at a time."""
        if SAFE:
            for step in range(0, tile_hi - tile_lo):
                tile = tile_lo + step  # a tensor, as the one-tile walks' bounds are (also in the interpreter)
                visit, _ = _key_tile_class(KEYS, tile, BLOCK_N)
                if visit:
                    acc, m_i, l_i = _fwd_key_tiles(acc, m_i, l_i, q, K, V, stride_kn, stride_vn, None, None, KEYS,
                                                   tile, tile + 1, seq_len_k, qk_scale, softcap_log2, offs_d, d_valid,
                                                   META, BLOCK_N, True, True)
        else:
            tile = tile_lo
            visit, unmasked = _key_tile_class(KEYS, tile, BLOCK_N)
            while tile < tile_hi:
                if unmasked:
                    run_end, visit, unmasked = _unmasked_run(KEYS, tile, tile_hi, BLOCK_N)
                    acc, m_i, l_i = _fwd_key_tiles(acc, m_i, l_i, q, K, V, stride_kn, stride_vn, None, None, KEYS,
                                                   tile, run_end, seq_len_k, qk_scale, softcap_log2, offs_d, d_valid,
                                                   META, BLOCK_N, False, False)
                    tile = run_end
                else:
                    if visit:
                        acc, m_i, l_i = _fwd_key_tiles(acc, m_i, l_i, q, K, V, stride_kn, stride_vn, None, None, KEYS,
                                                       tile, tile + 1, seq_len_k, qk_scale, softcap_log2, offs_d,
                                                       d_valid, META, BLOCK_N, True, False)
                    tile += 1
                    visit, unmasked = _key_tile_class(KEYS, tile, BLOCK_N)
        return acc, m_i, l_i

    @triton.jit
    def _attn_fwd_program(pid, ARGS, META: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          SAFE: tl.constexpr):
        """Work item ``pid``: one (batch, query head, query tile). Stores its out and LSE rows and returns
        whether out holds a non-finite value (see ``_attn_kernel``)."""
        (Q, K, V, O, LSE, KV_START, KV_END, TILE_ORDER, seq_len_q, seq_len_k, num_heads_q, num_q_tiles, q_per_kv,
         qk_scale, softcap_log2, stride_mask_b) = ARGS[:16]
        batch, head, offs_m, row_valid, offs_d, d_valid, kv_start, kv_end, tiles = _tile_setup(
            pid, KV_START, KV_END, TILE_ORDER, seq_len_q, seq_len_k, num_heads_q, num_q_tiles, stride_mask_b, META,
            BLOCK_M, BLOCK_N,
        )
        KEYS = None
        if META.HOLES:  # the launcher appends the key-side operands (_hole_operands)
            KEYS = _hole_keys(ARGS[16:], batch, offs_m, row_valid, seq_len_q)
        kv_head = head // q_per_kv
        q = tl.load(_rows_ptrs(Q, batch, head, offs_m, offs_d), mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        K_head, stride_ks = _head_rows(K, batch, kv_head)
        V_head, stride_vs = _head_rows(V, batch, kv_head)
        BLOCK_D: tl.constexpr = META.BLOCK_D  # a shape needs a constexpr (triton 3.6 reads META's fields as ints)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        if META.HOLES:  # each key tile classified by its keys' query intervals
            acc, m_i, l_i = _fwd_hole_tiles(acc, m_i, l_i, q, K_head, V_head, stride_ks, stride_vs, KEYS, tiles[0],
                                            tiles[3], seq_len_k, qk_scale, softcap_log2, offs_d, d_valid, META, BLOCK_N,
                                            SAFE)
        elif SAFE:  # the rerun: every tile masked, non-finite values isolated
            acc, m_i, l_i = _fwd_key_tiles(acc, m_i, l_i, q, K_head, V_head, stride_ks, stride_vs, kv_start, kv_end,
                                           KEYS, tiles[0], tiles[3], seq_len_k, qk_scale, softcap_log2, offs_d,
                                           d_valid, META, BLOCK_N, True, True)
        else:
            for segment in tl.static_range(3):  # unrolled: edge tiles, interior tiles (no mask), edge tiles
                acc, m_i, l_i = _fwd_key_tiles(acc, m_i, l_i, q, K_head, V_head, stride_ks, stride_vs, kv_start,
                                               kv_end, KEYS, tiles[segment], tiles[segment + 1], seq_len_k, qk_scale,
                                               softcap_log2, offs_d, d_valid, META, BLOCK_N, segment != 1, False)
        sees_nothing = l_i == 0.0
        l_div = tl.where(sees_nothing, 1.0, l_i)
        out = acc / l_div[:, None]
        if SAFE:  # an output row with any non-finite entry is NaN throughout
            out = tl.where(_nonfinite_rows(out, 1)[:, None] != 0, float("nan"), out)
        lse = tl.where(sees_nothing, float("-inf"), (m_i + tl.math.log2(l_div)) * _LN2_C)
        o_ptrs = _rows_ptrs(O, batch, head, offs_m, offs_d)
        tl.store(o_ptrs, out.to(o_ptrs.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
        tl.store(LSE + (batch * num_heads_q + head) * seq_len_q + offs_m, lse, mask=row_valid)
        return _any_nonfinite(out, row_valid)

    @triton.jit
    def _attn_bwd_delta_kernel(
        O, DO, DLSE, DELTA,
        stride_ob, stride_os, stride_oh,
        stride_dob, stride_dos, stride_doh,
        seq_len_q, num_heads_q,
        HAS_DLSE: tl.constexpr,  # the LSE output has a gradient: dS = P * (dP - (delta - dLSE))
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        pid = tl.program_id(0)  # flat grid: (batch x head, query tile), tiles fastest
        num_q_tiles = tl.cdiv(seq_len_q, BLOCK_M)
        bh = pid // num_q_tiles
        q_tile = pid % num_q_tiles
        batch = (bh // num_heads_q).to(tl.int64)
        head = (bh % num_heads_q).to(tl.int64)
        offs_m = (q_tile * BLOCK_M).to(tl.int64) + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        valid = (offs_m < seq_len_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(_rows_ptrs((O, stride_ob, stride_os, stride_oh), batch, head, offs_m, offs_d),
                    mask=valid, other=0.0).to(tl.float32)
        do = tl.load(_rows_ptrs((DO, stride_dob, stride_dos, stride_doh), batch, head, offs_m, offs_d),
                     mask=valid, other=0.0).to(tl.float32)
        delta = tl.sum(o * do, 1)
        row = bh.to(tl.int64) * seq_len_q + offs_m
        if HAS_DLSE:
            delta -= tl.load(DLSE + row, mask=offs_m < seq_len_q, other=0.0)
        tl.store(DELTA + row, delta, mask=offs_m < seq_len_q)

    @triton.jit
    def _dq_key_tiles(
        dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, kv_start, kv_end, KEYS, tile_lo, tile_hi, seq_len_k,
        qk_scale, softcap_log2, offs_d, d_valid,
        META: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
        SAFE: tl.constexpr,  # non-finite isolation (the rerun, with MASKED): see _attn_bwd_dq_program
    ):
        EVEN_D: tl.constexpr = META.HEAD_DIM == META.BLOCK_D
        for tile in range(tile_lo, tile_hi):
            if MASKED:  # int32 keys for the mask compares, int64 for addresses (as in _fwd_key_tiles)
                cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
                offs_n = cols.to(tl.int64)
            else:
                offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: key * stride may pass 2^31
            kt_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None]  # [BLOCK_D, BLOCK_N]
            vt_ptrs = V + offs_n[None, :] * stride_vn + offs_d[:, None]
            if MASKED:
                kv_mask = (cols < seq_len_k)[None, :] & d_valid[:, None]
                kt = tl.load(kt_ptrs, mask=kv_mask, other=0.0)
                vt = tl.load(vt_ptrs, mask=kv_mask, other=0.0)
            elif EVEN_D:
                kt = tl.load(kt_ptrs)
                vt = tl.load(vt_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=d_valid[:, None], other=0.0)
                vt = tl.load(vt_ptrs, mask=d_valid[:, None], other=0.0)
            s = tl.dot(q, kt, input_precision=META.DOT_PRECISION) * qk_scale
            if META.SOFTCAP:
                capped = tanh(s)
                s = capped * softcap_log2
            p = tl.math.exp2(s - lse2[:, None])
            if MASKED:
                if META.HOLES:
                    visible = _key_side_visible(KEYS, cols, seq_len_k, q.shape[0])
                else:
                    visible = (cols[None, :] >= kv_start[:, None]) & (cols[None, :] < kv_end[:, None])
                p = tl.where(visible, p, 0.0)
            dp = tl.dot(do, vt, input_precision=META.DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            if META.SOFTCAP:  # d(cap * tanh(x)) / d(cap * x) = 1 - tanh(x)^2
                ds = ds * (1.0 - capped * capped)
            if SAFE:
                # Select, not multiply: dp is NaN at a hidden key whose V is. dS @ K contracts over
                # keys: zero K's non-finite entries and make the rows that see one NaN.
                ds = tl.where(visible, ds, 0.0)
                ds = tl.where(visible & (_nonfinite_rows(kt, 0)[None, :] != 0), float("nan"), ds)
                kt = tl.where(tl.abs(kt.to(tl.float32)) < float("inf"), kt, 0.0)
            dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=META.DOT_PRECISION)
        return dq

    @triton.jit
    def _dq_hole_tiles(
        dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, KEYS, tile_lo, tile_hi, seq_len_k, qk_scale, softcap_log2,
        offs_d, d_valid, META: tl.constexpr, BLOCK_N: tl.constexpr, SAFE: tl.constexpr,
    ):
        """A mask with holes: key tiles in runs of unmasked tiles and masked tiles, as in ``_fwd_hole_tiles``."""
        if SAFE:
            for step in range(0, tile_hi - tile_lo):
                tile = tile_lo + step
                visit, _ = _key_tile_class(KEYS, tile, BLOCK_N)
                if visit:
                    dq = _dq_key_tiles(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, None, None, KEYS, tile,
                                       tile + 1, seq_len_k, qk_scale, softcap_log2, offs_d, d_valid, META, BLOCK_N,
                                       True, True)
        else:
            tile = tile_lo
            visit, unmasked = _key_tile_class(KEYS, tile, BLOCK_N)
            while tile < tile_hi:
                if unmasked:
                    run_end, visit, unmasked = _unmasked_run(KEYS, tile, tile_hi, BLOCK_N)
                    dq = _dq_key_tiles(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, None, None, KEYS, tile,
                                       run_end, seq_len_k, qk_scale, softcap_log2, offs_d, d_valid, META, BLOCK_N,
                                       False, False)
                    tile = run_end
                else:
                    if visit:
                        dq = _dq_key_tiles(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, None, None, KEYS,
                                           tile, tile + 1, seq_len_k, qk_scale, softcap_log2, offs_d, d_valid, META,
                                           BLOCK_N, True, False)
                    tile += 1
                    visit, unmasked = _key_tile_class(KEYS, tile, BLOCK_N)
        return dq

    @triton.jit
    def _attn_bwd_dq_program(pid, ARGS, META: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         SAFE: tl.constexpr):
        """Work item ``pid``: one (batch, query head, query tile) of dQ; returns whether it holds a
        non-finite value. Non-finite isolation as in the forward: the rerun recomputes a flagged item
        with selects for dS (dP is NaN at a hidden key whose V is) and, for ``dS @ K``, K's non-finite
        entries zeroed and NaN put back for exactly the rows that see one."""
        (Q, K, V, DO, DQ, LSE, DELTA, KV_START, KV_END, TILE_ORDER, seq_len_q, seq_len_k, num_heads_q, num_q_tiles,
         q_per_kv, qk_scale, scale, softcap_log2, stride_mask_b) = ARGS[:19]
        batch, head, offs_m, row_valid, offs_d, d_valid, kv_start, kv_end, tiles = _tile_setup(
            pid, KV_START, KV_END, TILE_ORDER, seq_len_q, seq_len_k, num_heads_q, num_q_tiles, stride_mask_b, META,
            BLOCK_M, BLOCK_N,
        )
        KEYS = None
        if META.HOLES:  # as in _attn_fwd_program
            KEYS = _hole_keys(ARGS[19:], batch, offs_m, row_valid, seq_len_q)
        kv_head = head // q_per_kv
        io_mask = row_valid[:, None] & d_valid[None, :]
        q = tl.load(_rows_ptrs(Q, batch, head, offs_m, offs_d), mask=io_mask, other=0.0)
        do = tl.load(_rows_ptrs(DO, batch, head, offs_m, offs_d), mask=io_mask, other=0.0)
        stats_row = (batch * num_heads_q + head) * seq_len_q
        lse2 = tl.load(LSE + stats_row + offs_m, mask=row_valid, other=0.0) * _LOG2E_C
        delta = tl.load(DELTA + stats_row + offs_m, mask=row_valid, other=0.0)
        K_head, stride_ks = _head_rows(K, batch, kv_head)
        V_head, stride_vs = _head_rows(V, batch, kv_head)
        BLOCK_D: tl.constexpr = META.BLOCK_D  # a shape needs a constexpr (see _attn_fwd_program)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if META.HOLES:  # each key tile classified by its keys' query intervals
            dq = _dq_hole_tiles(dq, q, do, lse2, delta, K_head, V_head, stride_ks, stride_vs, KEYS, tiles[0], tiles[3],
                                seq_len_k, qk_scale, softcap_log2, offs_d, d_valid, META, BLOCK_N, SAFE)
        elif SAFE:  # the rerun: every tile masked, non-finite values isolated
            dq = _dq_key_tiles(dq, q, do, lse2, delta, K_head, V_head, stride_ks, stride_vs, kv_start, kv_end, KEYS,
                               tiles[0], tiles[3], seq_len_k, qk_scale, softcap_log2, offs_d, d_valid, META, BLOCK_N,
                               True, True)
        else:
            for segment in tl.static_range(3):  # unrolled: edge tiles, interior tiles (no mask), edge tiles
                dq = _dq_key_tiles(dq, q, do, lse2, delta, K_head, V_head, stride_ks, stride_vs, kv_start, kv_end,
                                   KEYS, tiles[segment], tiles[segment + 1], seq_len_k, qk_scale, softcap_log2, offs_d,
                                   d_valid, META, BLOCK_N, segment != 1, False)
        dq_ptrs = _rows_ptrs(DQ, batch, head, offs_m, offs_d)
        tl.store(dq_ptrs, (dq * scale).to(dq_ptrs.dtype.element_ty), mask=io_mask)
        return _any_nonfinite(dq, row_valid)

    @triton.jit
    def _dkdv_query_tiles(
        dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_qh, stride_dos, stride_doh, q_start, q_end,
        tile_lo, tile_hi, seq_len_q, q_per_kv, qk_scale, softcap_log2, offs_d, d_valid,
        META: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
        SAFE: tl.constexpr,  # non-finite isolation (the rerun, with MASKED): see _attn_bwd_dkdv_program
    ):
        EVEN_D: tl.constexpr = META.HEAD_DIM == META.BLOCK_D
        # One flat loop over (query tile, group member): the GQA group's heads run inside each tile
        # step, so the loop nest and its live state are the same as without GQA (a loop over the group
        # around the three tile walks keeps three pipelines' state live across it and spills).
        for step in range(tile_lo * q_per_kv, tile_hi * q_per_kv):
            tile = step // q_per_kv
            member = step % q_per_kv  # 0 when q_per_kv == 1 (specialised to a constant by the launch)
            Q_m = Q + member * stride_qh
            DO_m = DO + member * stride_doh
            LSE_m = LSE + member * seq_len_q
            DELTA_m = DELTA + member * seq_len_q
            if MASKED:  # int32 queries for the mask compares, int64 for addresses (as in _fwd_key_tiles)
                rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
                offs_m = rows.to(tl.int64)
            else:
                offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # int64: row * stride may pass 2^31
            q_ptrs = Q_m + offs_m[:, None] * stride_qs + offs_d[None, :]  # [BLOCK_M, BLOCK_D]
            do_ptrs = DO_m + offs_m[:, None] * stride_dos + offs_d[None, :]
            if MASKED:
                row_valid = rows < seq_len_q
                io_mask = row_valid[:, None] & d_valid[None, :]
                q = tl.load(q_ptrs, mask=io_mask, other=0.0)
                do = tl.load(do_ptrs, mask=io_mask, other=0.0)
                lse2 = tl.load(LSE_m + offs_m, mask=row_valid, other=0.0) * _LOG2E_C
                delta = tl.load(DELTA_m + offs_m, mask=row_valid, other=0.0)
            else:
                if EVEN_D:
                    q = tl.load(q_ptrs)
                    do = tl.load(do_ptrs)
                else:
                    q = tl.load(q_ptrs, mask=d_valid[None, :], other=0.0)
                    do = tl.load(do_ptrs, mask=d_valid[None, :], other=0.0)
                lse2 = tl.load(LSE_m + offs_m) * _LOG2E_C
                delta = tl.load(DELTA_m + offs_m)
            st = tl.dot(k, tl.trans(q), input_precision=META.DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
            if META.SOFTCAP:
                capped = tanh(st)
                st = capped * softcap_log2
            pt = tl.math.exp2(st - lse2[None, :])
            if MASKED:
                # Empty query rows have lse = -inf and pt = inf here; the mask zeroes them first.
                visible = (rows[None, :] >= q_start[:, None]) & (rows[None, :] < q_end[:, None])
                pt = tl.where(visible, pt, 0.0)
            if SAFE:
                # P^T @ dO and dS^T @ Q contract over queries: their operands get the non-finite
                # entries of dO and Q zeroed, and NaN for exactly the keys that see such a query.
                pt_dv = tl.where(visible & (_nonfinite_rows(do, 1)[None, :] != 0), float("nan"), pt)
                do_dv = tl.where(tl.abs(do.to(tl.float32)) < float("inf"), do, 0.0)
                dv = tl.dot(pt_dv.to(do.dtype), do_dv, dv, input_precision=META.DOT_PRECISION)
            else:
                dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=META.DOT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=META.DOT_PRECISION)
            dst = pt * (dpt - delta[None, :])
            if META.SOFTCAP:  # as in _dq_key_tiles
                dst = dst * (1.0 - capped * capped)
            if SAFE:  # select, not multiply: dpt is NaN at a hidden query where v or dO is
                dst = tl.where(visible, dst, 0.0)
                dst = tl.where(visible & (_nonfinite_rows(q, 1)[None, :] != 0), float("nan"), dst)
                q = tl.where(tl.abs(q.to(tl.float32)) < float("inf"), q, 0.0)
            dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=META.DOT_PRECISION)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_program(pid, ARGS, META: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           SAFE: tl.constexpr):
        """Work item ``pid``: one (batch, kv head, key tile) of dK and dV; returns whether they hold a
        non-finite value. Non-finite isolation as in the forward: the rerun recomputes a flagged item
        with selects for dS (dP is NaN at a hidden query where v or dO is) and, for ``P^T @ dO`` and
        ``dS^T @ Q``, the non-finite entries of dO and Q zeroed and NaN put back for exactly the keys
        that see such a query."""
        (Q, K, V, DO, DK, DV, LSE, DELTA, Q_START, Q_END, TILE_ORDER, seq_len_q, seq_len_k, num_heads_q,
         num_heads_kv, num_k_tiles, q_per_kv, qk_scale, scale, softcap_log2, stride_mask_b) = ARGS
        batch, kv_head, offs_n, key_valid, offs_d, d_valid, q_start, q_end, tiles = _tile_setup(
            pid, Q_START, Q_END, TILE_ORDER, seq_len_k, seq_len_q, num_heads_kv, num_k_tiles, stride_mask_b, META,
            BLOCK_N, BLOCK_M, not META.HOLES,  # with holes, a hidden key's interval ends before its neighbours'
        )
        io_mask = key_valid[:, None] & d_valid[None, :]
        k = tl.load(_rows_ptrs(K, batch, kv_head, offs_n, offs_d), mask=io_mask, other=0.0)
        v = tl.load(_rows_ptrs(V, batch, kv_head, offs_n, offs_d), mask=io_mask, other=0.0)
        BLOCK_D: tl.constexpr = META.BLOCK_D  # a shape needs a constexpr (see _attn_fwd_program)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # The group's first query head; _dkdv_query_tiles steps through its q_per_kv heads.
        head = kv_head * q_per_kv
        Q_group, stride_qs = _head_rows(Q, batch, head)
        DO_group, stride_dos = _head_rows(DO, batch, head)
        stride_qh = Q[3]
        stride_doh = DO[3]
        stats_row = (batch * num_heads_q + head) * seq_len_q
        if SAFE:  # the rerun: every tile masked, non-finite values isolated
            dk, dv = _dkdv_query_tiles(dk, dv, k, v, Q_group, DO_group, LSE + stats_row, DELTA + stats_row,
                                       stride_qs, stride_qh, stride_dos, stride_doh, q_start, q_end, tiles[0],
                                       tiles[3], seq_len_q, q_per_kv, qk_scale, softcap_log2, offs_d, d_valid, META,
                                       BLOCK_M, True, True)
        else:
            for segment in tl.static_range(3):  # unrolled: edge tiles, interior tiles (no mask), edge tiles
                dk, dv = _dkdv_query_tiles(dk, dv, k, v, Q_group, DO_group, LSE + stats_row, DELTA + stats_row,
                                           stride_qs, stride_qh, stride_dos, stride_doh, q_start, q_end,
                                           tiles[segment], tiles[segment + 1], seq_len_q, q_per_kv, qk_scale,
                                           softcap_log2, offs_d, d_valid, META, BLOCK_M, segment != 1, False)
        dk_ptrs = _rows_ptrs(DK, batch, kv_head, offs_n, offs_d)
        dv_ptrs = _rows_ptrs(DV, batch, kv_head, offs_n, offs_d)
        tl.store(dk_ptrs, (dk * scale).to(dk_ptrs.dtype.element_ty), mask=io_mask)
        tl.store(dv_ptrs, dv.to(dv_ptrs.dtype.element_ty), mask=io_mask)
        return _any_nonfinite(dk, key_valid) | _any_nonfinite(dv, key_valid)

    @triton.jit
    def _attn_kernel(
        PROGRAM: tl.constexpr,  # the work item: _attn_fwd_program, _attn_bwd_dkdv_program or _attn_bwd_dq_program
        ARGS,  # the program's operands, sizes and scales as one tuple (see _fwd_launches, _bwd_launches)
        NONFINITE,  # int8 [num_work]: the work item's result held a NaN or an infinity
        num_work,
        META: tl.constexpr,  # KernelMeta
        BLOCK_M: tl.constexpr,  # query rows per tile
        BLOCK_N: tl.constexpr,  # keys per tile
        RERUN: tl.constexpr,  # False: the walk, one work item per program; True: the rerun pass
    ):
        """The three attention passes' launches. Non-finite isolation: hidden pairs get P = 0 exactly,
        so P @ V adds 0 * v = 0 for them unless v is NaN or infinite: the walk is exact whenever its
        result is finite, and each work item records whether it is. The rerun pass (a second launch,
        one program per SM, each reading its share of the flags and exiting at once when none is set)
        recomputes the flagged items with every tile masked, the non-finite operands zeroed and NaN put
        back for exactly the rows that see one (``reference.attention`` computes the same). A separate
        launch keeps the rerun's registers out of the walk's allocation; its inner tile may be
        narrower (``PassConfigs.rerun_config``)."""
        if RERUN:
            first, last, flagged = _rerun_share(NONFINITE, num_work, 256)
            if flagged:
                for pid in range(first, last):
                    if tl.load(NONFINITE + pid) != 0:
                        PROGRAM(pid, ARGS, META, BLOCK_M, BLOCK_N, True)
        else:
            pid = tl.program_id(0)
            nonfinite = PROGRAM(pid, ARGS, META, BLOCK_M, BLOCK_N, False)
            tl.store(NONFINITE + pid, nonfinite.to(tl.int8))

    def _tuning_space(inner_block: str) -> list:
        """Configs over the tile size the program steps through (the launcher fixes the other one from
        ``launch_configs``: the heaviest-first order is computed from it), warps and pipeline depth."""
        return [
            triton.Config({inner_block: block}, num_warps=warps, num_stages=stages)
            for block in (32, 64, 128)
            for warps in (4, 8)
            for stages in (2, 3, 4)
        ]

    # The autotuner (TFKERNELS_AUTOTUNE=1) of each pass, keyed on the kernel settings (head dim, dtype,
    # softcap), never on sequence lengths: a training run with a new layout or length every step tunes
    # once per (D, dtype). Each pass fixes the tile the heaviest-first order is computed from.
    _TUNED = {
        program: triton.autotune(_tuning_space(inner), key=["META"])(_attn_kernel)
        for program, inner in ((_attn_fwd_program, "BLOCK_N"), (_attn_bwd_dq_program, "BLOCK_N"),
                               (_attn_bwd_dkdv_program, "BLOCK_M"))
    }


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _autotune(device: torch.device) -> bool:
    """``TFKERNELS_AUTOTUNE=1`` on a GPU: benchmark the tuning space on the first call per
    (head dim, dtype) instead of using the default config (18 configs per pass: expect a minute)."""
    return device.type == "cuda" and os.environ.get("TFKERNELS_AUTOTUNE", "0") == "1"


def _rerun_programs(device: torch.device) -> int:
    """Programs of a rerun pass (see ``_attn_kernel``): one per SM; a few in the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3


def _launch_pass(program, args: tuple, num_work: int, meta: KernelMeta, configs: PassConfigs, name: str,
                 device: torch.device) -> None:
    """Launch pass ``name``'s walk (``"forward"``, ``"dkdv"`` or ``"dq"``), one program per work item,
    with its config in ``configs`` (or the autotuner's pick for the inner tile, warps and stages); then
    its rerun over the items whose result was not finite (a few programs that exit at once when there
    is none; see ``_attn_kernel``)."""
    nonfinite = torch.empty(num_work, device=device, dtype=torch.int8)  # every item writes its flag
    head = (program, args, nonfinite, num_work)
    config = getattr(configs, name)
    if _autotune(device):
        outer = "BLOCK_M" if name != "dkdv" else "BLOCK_N"  # the tile the heaviest-first order was computed for
        launch(_TUNED[program], (num_work,), *head, META=meta, RERUN=False,
               **{outer: getattr(config, outer.lower())})
    else:
        launch(_attn_kernel, (num_work,), *head, META=meta, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
               RERUN=False, num_warps=config.num_warps, num_stages=config.num_stages)
    rerun = configs.rerun_config(name)
    launch(_attn_kernel, (min(num_work, _rerun_programs(device)),), *head, META=meta, BLOCK_M=rerun.block_m,
           BLOCK_N=rerun.block_n, RERUN=True, num_warps=rerun.num_warps, num_stages=rerun.num_stages)


def _heaviest_first(bound_start: torch.Tensor, bound_end: torch.Tensor, rows_per_tile: int,
                    cols_per_tile: int, num_cols: int, batch: int, monotone: bool = True) -> torch.Tensor:
    """Order of the ``batch * num_tiles`` row tiles, most column tiles to visit first: int32.

    ``bound_start``/``bound_end`` ``[B, R]`` are monotone interval bounds (the mask's, or its key
    intervals for the key side) over ``num_cols`` columns, ``B == batch`` or 1 (one mask row shared
    by the batch); a tile of rows visits column tiles ``[start[first] // cols, cdiv(end[last],
    cols))``, bounds clamped into ``[0, num_cols]`` as the kernels clamp them. Bounds that need not
    be monotone (``monotone=False``: the key intervals of a mask with holes) visit ``[min start // cols,
    cdiv(max end, cols))`` over the tile's rows that see something (``_tile_ranges_of_rows``).
    """
    rows = bound_start.shape[1]
    if monotone:
        firsts = torch.arange(0, rows, rows_per_tile, device=bound_start.device)
        lasts = (firsts + rows_per_tile - 1).clamp(max=rows - 1)
        lo = bound_start[:, firsts].long().clamp(0, num_cols) // cols_per_tile
        hi = (bound_end[:, lasts].long().clamp(0, num_cols) + cols_per_tile - 1) // cols_per_tile
    else:
        start, end = bound_start.long().clamp(0, num_cols), bound_end.long().clamp(0, num_cols)
        sees = end > start
        pad = (0, -rows % rows_per_tile)
        start = F.pad(torch.where(sees, start, num_cols), pad, value=num_cols).unflatten(1, (-1, rows_per_tile))
        end = F.pad(torch.where(sees, end, 0), pad, value=0).unflatten(1, (-1, rows_per_tile))
        lo = start.amin(-1) // cols_per_tile
        hi = torch.maximum((end.amax(-1) + cols_per_tile - 1) // cols_per_tile, lo)
    work = (hi - lo).expand(batch, -1).flatten()
    return torch.argsort(work, descending=True, stable=True).to(torch.int32)


def _key_granules(q_start: torch.Tensor, q_end: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, 4, cdiv(Sk, _KEY_GRANULE)]``: per run of ``_KEY_GRANULE`` keys, the least and greatest start
    and the least and greatest end of their query intervals (``_key_tile_class`` reads them). A key that no
    query sees, and the keys past ``Sk``, count as start ``2**31 - 1`` and end 0: they never make a tile
    visited, and always make it masked."""
    seq_k = q_start.shape[1]
    sees = q_end > q_start
    pad = (0, -seq_k % _KEY_GRANULE)
    start = F.pad(torch.where(sees, q_start, _INT32_MAX), pad, value=_INT32_MAX).unflatten(1, (-1, _KEY_GRANULE))
    end = F.pad(torch.where(sees, q_end, 0), pad, value=0).unflatten(1, (-1, _KEY_GRANULE))
    return torch.stack([start.amin(-1), start.amax(-1), end.amin(-1), end.amax(-1)], 1).to(torch.int32).contiguous()


def _hole_operands(q_start: torch.Tensor, q_end: torch.Tensor, batch: int) -> tuple:
    """What the forward and dQ programs of a mask with holes take after their own arguments (``_hole_keys``):
    the key intervals, their granules (``_key_granules``), the batch strides of both (0 for a mask row
    shared by the batch) and the number of granules."""
    granules = _key_granules(q_start, q_end)
    shared = q_start.shape[0] == 1 and batch > 1
    return (q_start, q_end, granules, 0 if shared else q_start.shape[1], 0 if shared else granules[0].numel(),
            granules.shape[2])


def _mask_batch_stride(bounds: torch.Tensor, batch: int) -> int:
    """Batch stride of contiguous ``[B, R]`` bounds: 0 when one row serves a batch of several."""
    return 0 if bounds.shape[0] == 1 and batch > 1 else bounds.shape[1]


def _operand(t: torch.Tensor) -> tuple:
    """A ``[B, S, H, D]`` tensor (unit stride along D) as the kernels take it: ``(t, stride_b, stride_s,
    stride_h)``."""
    return t, t.stride(0), t.stride(1), t.stride(2)


_DELTA_ROWS = 64  # rows per program of the memory-bound delta pass


def _score_scales(scale: float, softcap: float) -> tuple[float, float]:
    """The kernels' ``(qk_scale, softcap_log2)``: scores in log2 units are ``q.k * qk_scale``, or with a
    cap ``c``, ``tanh(q.k * scale / c) * c * log2(e)``."""
    if softcap:
        return scale / softcap, softcap * _LOG2E
    return scale * _LOG2E, 0.0


def _key_intervals(kv_start, kv_end, seq_k, key_q_start, key_q_end) -> tuple[torch.Tensor, torch.Tensor]:
    return IntervalMask(kv_start, kv_end, seq_k, key_q_start, key_q_end).key_intervals()


def _launch_fwd(q, k, v, kv_start, kv_end, scale, softcap, key_q_start=None, key_q_end=None):
    batch, seq_q, heads_q, dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    out = torch.empty(batch, seq_q, heads_q, dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads_q, seq_q, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    holes = key_q_start is not None
    configs = _configs_for(q, holes)
    config = configs.forward
    order = _heaviest_first(kv_start, kv_end, config.block_m, config.block_n, seq_k, batch)
    args = (_operand(q), _operand(k), _operand(v), _operand(out), lse, kv_start, kv_end, order, seq_q, seq_k,
            heads_q, triton.cdiv(seq_q, config.block_m), heads_q // heads_kv, *_score_scales(scale, softcap),
            _mask_batch_stride(kv_start, batch))
    if holes:
        args += _hole_operands(*_key_intervals(kv_start, kv_end, seq_k, key_q_start, key_q_end), batch)
    _launch_pass(_attn_fwd_program, args, heads_q * order.numel(), _kernel_meta(q, scale, softcap, holes), configs,
                 "forward", q.device)
    return out, lse


def _launch_bwd(do, q, k, v, out, lse, dlse, kv_start, kv_end, scale, softcap, key_q_start=None, key_q_end=None):
    batch, seq_q, heads_q, dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    # The kernels need a unit stride along D; autograd hands out expanded (stride-0) gradients for
    # e.g. out.sum(), and the LSE gradient is read as a contiguous [B, Hq, Sq] block.
    do = do if do.stride(-1) == 1 else do.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    if q.numel() == 0 or k.numel() == 0:
        return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    # Every row of dq and every key of dk/dv is written by exactly one program: no zero-fill.
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    holes = key_q_start is not None
    configs = _configs_for(q, holes)
    meta = _kernel_meta(q, scale, softcap, holes)
    q_per_kv = heads_q // heads_kv
    qk_scale, softcap_log2 = _score_scales(scale, softcap)
    delta = torch.empty(batch, heads_q, seq_q, device=q.device, dtype=torch.float32)
    launch(_attn_bwd_delta_kernel, (triton.cdiv(seq_q, _DELTA_ROWS) * batch * heads_q,),
           out, do, dlse, delta,
           out.stride(0), out.stride(1), out.stride(2),
           do.stride(0), do.stride(1), do.stride(2),
           seq_q, heads_q,
           HAS_DLSE=dlse is not None, HEAD_DIM=dim, BLOCK_D=meta.BLOCK_D, BLOCK_M=_DELTA_ROWS)
    q_start, q_end = _key_intervals(kv_start, kv_end, seq_k, key_q_start, key_q_end)
    config = configs.dkdv
    key_order = _heaviest_first(q_start, q_end, config.block_n, config.block_m, seq_q, batch, monotone=not holes)
    args = (_operand(q), _operand(k), _operand(v), _operand(do), _operand(dk), _operand(dv), lse, delta, q_start,
            q_end, key_order, seq_q, seq_k, heads_q, heads_kv, triton.cdiv(seq_k, config.block_n), q_per_kv,
            qk_scale, scale, softcap_log2, _mask_batch_stride(q_start, batch))
    _launch_pass(_attn_bwd_dkdv_program, args, heads_kv * key_order.numel(), meta, configs, "dkdv", q.device)
    config = configs.dq
    query_order = _heaviest_first(kv_start, kv_end, config.block_m, config.block_n, seq_k, batch)
    args = (_operand(q), _operand(k), _operand(v), _operand(do), _operand(dq), lse, delta, kv_start, kv_end,
            query_order, seq_q, seq_k, heads_q, triton.cdiv(seq_q, config.block_m), q_per_kv, qk_scale, scale,
            softcap_log2, _mask_batch_stride(kv_start, batch))
    if holes:
        args += _hole_operands(q_start, q_end, batch)
    _launch_pass(_attn_bwd_dq_program, args, heads_q * query_order.numel(), meta, configs, "dq", q.device)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library registration and autograd
# ----------------------------------------------------------------------------------------------
def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one (e.g. q on cuda:1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("tfkernels::attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor,
    scale: float, softcap: float = 0.0, key_q_start: torch.Tensor | None = None,
    key_q_end: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    with _on_device(q):
        return _launch_fwd(q, k, v, kv_start, kv_end, scale, softcap, key_q_start, key_q_end)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, kv_start, kv_end, scale, softcap=0.0, key_q_start=None, key_q_end=None):
    batch, seq_q, heads_q, dim = q.shape
    out = q.new_empty(batch, seq_q, heads_q, dim)
    lse = q.new_empty(batch, heads_q, seq_q, dtype=torch.float32)
    return out, lse


@torch.library.custom_op("tfkernels::attention_bwd", mutates_args=())
def _attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, dlse: torch.Tensor | None, kv_start: torch.Tensor, kv_end: torch.Tensor,
    scale: float, softcap: float, key_q_start: torch.Tensor | None = None, key_q_end: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _on_device(q):
        return _launch_bwd(do, q, k, v, out, lse, dlse, kv_start, kv_end, scale, softcap, key_q_start, key_q_end)


@_attention_bwd.register_fake
def _attention_bwd_fake(do, q, k, v, out, lse, dlse, kv_start, kv_end, scale, softcap, key_q_start=None,
                        key_q_end=None):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, kv_start, kv_end, scale, softcap, key_q_start, key_q_end = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_start, kv_end, key_q_start, key_q_end)
    ctx.scale, ctx.softcap = scale, softcap
    ctx.set_materialize_grads(False)  # an unused lse output must not cost a dLSE pass


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, kv_start, kv_end, key_q_start, key_q_end = ctx.saved_tensors
    if d_out is None:
        d_out = torch.zeros_like(out)
    dq, dk, dv = _attention_bwd(d_out, q, k, v, out, lse, d_lse, kv_start, kv_end, ctx.scale, ctx.softcap,
                                key_q_start, key_q_end)
    return dq, dk, dv, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, mask, scale, deterministic, return_lse=False, softcap=None) -> None:
    """Raise a clear error for anything a kernel cannot take, before any launch."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t)
        if t.ndim != 4:
            raise ValueError(f"{name}: expected shape [B, S, H, D], got {tuple(t.shape)}")
    if not isinstance(mask, IntervalMask):
        raise TypeError(f"mask: expected a tfkernels.IntervalMask, got {type(mask).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    batch, _, heads_q, dim = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k, v: expected the same shape [B, Sk, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(
            f"k: expected batch {batch} and head dim {dim} as in q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    heads_kv = k.shape[2]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"q heads ({heads_q}) must be a multiple of k/v heads ({heads_kv})")
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim: expected 1..{MAX_HEAD_DIM}, got {dim}")
    if heads_kv * dim >= _MAX_ROW_STRIDE:
        raise ValueError(f"k, v: expected heads x head dim below {_MAX_ROW_STRIDE} (a key row's size), got "
                         f"{heads_kv} x {dim}")
    if isinstance(scale, torch.Tensor):
        if scale.ndim != 0 or not scale.is_floating_point():
            raise ValueError(f"scale: expected a float, or a 0-d float tensor, got a {scale.dtype} tensor of shape "
                             f"{tuple(scale.shape)}")
    elif scale is not None and not torch.compiler.is_compiling():
        check_float("scale", scale, what="a finite float, a 0-d float tensor or None")
    elif scale is not None and not isinstance(scale, (int, float, torch.SymFloat)):
        # Under torch.compile a scale may be traced as a symbolic float: only its type is checked.
        raise TypeError(f"scale: expected a finite float, a 0-d float tensor or None, got {scale!r}")
    if softcap is not None:
        check_float("softcap", softcap, low=0.0, what="a finite float >= 0 (0 = no cap) or None")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected a bool, got {deterministic!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {return_lse!r}")
    # A mask of batch size 1 serves every batch row (validate checks its structure first).
    shared = isinstance(mask.kv_start, torch.Tensor) and mask.kv_start.ndim == 2 and mask.kv_start.shape[0] == 1
    mask.validate(batch_size=1 if shared else batch, seq_len_q=q.shape[1], seq_len_k=k.shape[1], device=q.device)


@functools.lru_cache(maxsize=32)
def _shared_mask(causal: bool, seq_len_q: int, seq_len_k: int, device: torch.device) -> IntervalMask:
    """The batch-1 mask of ``attention(mask=None)``: validated once, then reused call after call."""
    build = IntervalMask.causal if causal else IntervalMask.full
    return build(1, seq_len_q, seq_len_k, device=device)


def _default_mask(causal, q: torch.Tensor, k: torch.Tensor) -> IntervalMask:
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    # While torch.compile traces: built in the graph, not looked up in a Python cache.
    build = _shared_mask.__wrapped__ if torch.compiler.is_compiling() else _shared_mask
    return build(causal, q.shape[1], k.shape[1], q.device)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides except along the head dim, and a row stride below
    ``_MAX_ROW_STRIDE`` (a copy of anything else, e.g. a slice of a buffer with rows millions apart)."""
    return t if t.stride(-1) == 1 and t.stride(1) < _MAX_ROW_STRIDE else t.contiguous()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: IntervalMask | None = None,
    scale: float | torch.Tensor | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    *,
    causal: bool = False,
    softcap: float | None = None,
):
    """Softmax attention where query ``q`` sees keys ``[mask.kv_start[q], mask.kv_end[q])``.

    Layout: ``[B, S, H, D]`` (batch, sequence, heads, head dim), as FlashAttention's
    ``flash_attn_func``. SDPA, FlexAttention and Hugging Face attention functions use
    ``[B, H, S, D]``: pass ``q.transpose(1, 2)`` (a view, no copy) and transpose the output back::

        out = tk.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)

    Args:
        q: ``[B, Sq, Hq, D]``; float16, bfloat16 or float32; ``D <= 256``; any strides (a
            non-unit stride along ``D`` costs a copy).
        k, v: ``[B, Sk, Hkv, D]``, ``Hq % Hkv == 0`` (GQA/MQA: kv head ``h // (Hq // Hkv)``
            serves query head ``h``).
        mask: ``IntervalMask`` with batch ``B`` or 1 (one layout shared by every batch row, read
            with a zero batch stride: nothing is copied), ``Sq`` rows and ``seq_len_k == Sk``; for
            ``Sq != Sk`` the queries are the last ``Sq`` positions (bottom-right aligned).
            ``None``: every query sees every key, or with ``causal=True`` the causal mask
            (bottom-right aligned, FlashAttention's ``causal=True``).
        scale: score scale, ``1 / sqrt(D)`` by default. A 0-d float tensor is applied as
            ``q * scale`` in q's dtype (no host sync, differentiable: a learned temperature gets
            its gradient) and the kernels run with scale 1.
        return_lse: also return the log-sum-exp of the scaled scores, ``[B, Hq, Sq]`` float32,
            natural log, differentiable.
        deterministic: ask for bitwise-reproducible gradients. The current backward is always
            deterministic (dQ has its own pass; a GQA group's heads are summed in a fixed
            order), so this only matters if a faster atomic path is added later.
        causal: with ``mask=None``, the causal mask; an error with a mask (it says it all).
        softcap: logit soft-capping (Gemma 2, Grok): each scaled score ``s`` becomes
            ``softcap * tanh(s / softcap)`` before the softmax, in the forward and backward kernels.
            ``None`` or 0 (FlashAttention's "off") compile the kernels without it, at no cost.

    Returns:
        out ``[B, Sq, Hq, D]`` in q's dtype, and lse if asked. Rows that see no key give zeros
        (lse = -inf) and zero gradients.

    The mask's values are validated in eager mode when first used and again after any change;
    while ``torch.compile`` traces, the op computes with ``tfkernels.mask.canonical_bounds`` (the
    identity on a valid mask; see ``tfkernels.mask`` for the policy). Non-finite values are
    isolated by the mask: a NaN or infinity in q, k, v or the output gradient at a (query, key)
    pair the mask hides reaches no output and no gradient. A NaN in ``q[i]`` or in k at a key row
    ``i`` sees, or a NaN or infinity in v there, makes row ``i``'s output all NaN
    (``tfkernels.reference.attention`` states the rules; both paths follow them).

    CUDA tensors run the Triton kernels; CPU tensors run ``tfkernels.reference.attention``, or
    the Triton kernels in the interpreter when ``TRITON_INTERPRET=1``.

    Under autocast (on q's device type) it is a matmul consumer like SDPA: float q, k, v are cast
    to autocast's dtype (so they may differ in dtype before the cast) and the op runs with
    autocast off (products accumulated and the softmax computed in float32); out has autocast's
    dtype, lse is float32, the gradients come back in q's, k's and v's own dtypes.
    """
    dtype = autocast_dtype(q)
    if dtype is not None:
        q, k, v = autocast_cast(dtype, q, k, v)
        with autocast_off(q):
            return attention(q, k, v, mask, scale, return_lse, deterministic, causal=causal, softcap=softcap)
    if mask is None:
        if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.ndim == k.ndim == 4:
            mask = _default_mask(causal, q, k)  # else _check_inputs names the bad q or k
    elif causal is not False:
        raise ValueError("causal: expected False with a mask (the mask says which keys each query sees); "
                         "pass mask=None, causal=True for the causal mask")
    _check_inputs(q, k, v, mask, scale, deterministic, return_lse, softcap)
    if isinstance(scale, torch.Tensor):
        q, scale = q * scale.to(q.dtype), 1.0
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = float(softcap or 0.0)
    if use_triton(q):
        kv_start, kv_end = mask._op_bounds()  # validated, or canonical while torch.compile traces
        holes = tuple(t.contiguous() for t in mask._op_holes() or ())
        out, lse = _attention_fwd(
            _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v),
            kv_start.contiguous(), kv_end.contiguous(), scale, softcap, *holes,
        )
    else:
        if mask.batch_size != q.shape[0]:  # a shared layout: the reference takes one mask row per batch row
            mask = mask._expand_batch(q.shape[0])
        out, lse = reference.attention(q, k, v, mask, scale, softcap=softcap or None)
    return (out, lse) if return_lse else out
