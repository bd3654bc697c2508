"""Tile waste of an attention mask: the (query, key) pairs a tiled kernel computes over the visible ones.

A tiled attention kernel computes whole ``rows x cols`` tiles, so it computes more (query, key) pairs
than the mask lets through. This module counts them exactly, from the mask alone (no GPU, no kernel):

- **tfkernels' tile walk** (``tile_walk``), as ``tfkernels/attention.py``'s ``_tile_ranges`` does
  it: each tile of ``rows`` consecutive rows visits the column tiles from its first row's start
  to its last row's end (the bounds clamped to ``[0, num_cols]``), in three segments (edge,
  interior, edge). The forward and dQ passes walk query tiles over key tiles with the mask's
  ``[kv_start, kv_end)``; the dK/dV pass walks key tiles over query tiles with
  ``key_intervals()``. The tile sizes are the launchers' defaults on sm_90
  (``tfkernels.attention.launch_configs``, for a mask with or without holes). On a mask with holes
  (hidden spans) the forward and dQ passes skip the key tiles that no key's query interval reaches
  and run without the mask those whose every key every row sees (``hole_walk``, as ``_key_tile_class``); the dK/dV pass
  takes each key tile's query tiles from the least start and greatest end of its keys'
  intervals (``tile_walk(..., monotone=False)``, as ``_tile_ranges_of_rows``).
- **a FlexAttention block mask** of the same layout (``flex_blocks``): every ``block x block``
  block in which at least one pair is visible is computed (partial and full blocks alike), as
  ``mask.to_flex_block_mask(block)`` would give, counted without building it.

``python -m bench.tile_waste [--quick]`` prints the figures for the attention workloads.
"""

from __future__ import annotations

import argparse
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tfkernels.attention import launch_configs

FLEX_BLOCK = 128


class Walk(NamedTuple):
    """One pass's tile walk over a batch (per head): tiles visited, of which edge tiles (masked)."""

    rows: int  # rows per tile (the program's rows)
    cols: int  # columns per tile (the inner step)
    tiles: int
    edge_tiles: int

    @property
    def pairs(self) -> int:
        """(row, column) pairs computed: whole tiles, including rows or columns past the end."""
        return self.tiles * self.rows * self.cols


def _cdiv(a: torch.Tensor, b: int) -> torch.Tensor:
    return (a + b - 1) // b


def tile_walk(bound_start: torch.Tensor, bound_end: torch.Tensor, num_cols: int, rows: int, cols: int,
              monotone: bool = True) -> Walk:
    """The tiles a program per ``rows`` rows visits, for bounds ``[B, R]`` (rows' column intervals
    ``[start, end)``) over ``num_cols`` columns in steps of ``cols``: ``_tile_ranges``'s arithmetic
    for monotone bounds, ``_tile_ranges_of_rows``'s otherwise, with Python's ``range`` semantics for
    each of the three segments."""
    num_rows = bound_start.shape[1]
    start, end = bound_start.long().clamp(0, num_cols), bound_end.long().clamp(0, num_cols)
    if monotone:
        first = torch.arange(0, num_rows, rows, device=bound_start.device)
        last = (first + rows).clamp(max=num_rows) - 1
        lo, hi = start[:, first], end[:, last]
        inner_lo, inner_hi = start[:, last], end[:, first]
    else:
        pad = (0, -num_rows % rows)
        sees = end > start
        lo = F.pad(torch.where(sees, start, num_cols), pad, value=num_cols).unflatten(1, (-1, rows)).amin(-1)
        hi = torch.maximum(F.pad(torch.where(sees, end, 0), pad, value=0).unflatten(1, (-1, rows)).amax(-1), lo)
        # Rows past the end are not the program's: they bound nothing (the padding is neutral).
        inner_lo = F.pad(start, pad, value=0).unflatten(1, (-1, rows)).amax(-1).clamp(lo, hi)
        inner_hi = torch.maximum(F.pad(end, pad, value=num_cols).unflatten(1, (-1, rows)).amin(-1).clamp(max=hi),
                                 inner_lo)
    tile_lo, tile_hi = lo // cols, _cdiv(hi, cols)
    inner_tile_lo = _cdiv(inner_lo, cols)
    inner_tile_hi = torch.maximum(inner_hi // cols, inner_tile_lo)
    edge = (inner_tile_lo - tile_lo).clamp(min=0) + (tile_hi - inner_tile_hi).clamp(min=0)
    interior = (inner_tile_hi - inner_tile_lo).clamp(min=0)
    return Walk(rows, cols, int((edge + interior).sum()), int(edge.sum()))


def hole_walk(mask, rows: int, cols: int) -> Walk:
    """The forward's (or dQ's) walk on a mask with holes: each tile of ``rows`` queries goes through the key
    tiles of its rows' intervals (``tile_walk``'s range) and computes those that some key's query interval
    reaches; of these, the ones whose every key every row of the tile sees run unmasked (``_key_tile_class``,
    from the keys' exact intervals)."""
    batch, num_rows = mask.kv_start.shape
    num_keys = mask.seq_len_k
    q_start, q_end = (t.long() for t in mask.key_intervals())
    sees = q_end > q_start
    pad = (0, -num_keys % cols)
    big = 2**31 - 1
    start = F.pad(torch.where(sees, q_start, big), pad, value=big).unflatten(1, (-1, cols))
    end = F.pad(torch.where(sees, q_end, 0), pad, value=0).unflatten(1, (-1, cols))
    start_min, start_max, end_min, end_max = (x[:, None, :] for x in (start.amin(-1), start.amax(-1), end.amin(-1),
                                                                      end.amax(-1)))
    first = torch.arange(0, num_rows, rows)
    last = (first + rows).clamp(max=num_rows) - 1
    # The key tiles each query tile's walk goes through: _tile_ranges' outer range.
    lo = mask.kv_start.long()[:, first].clamp(0, num_keys) // cols
    hi = _cdiv(mask.kv_end.long()[:, last].clamp(0, num_keys), cols)
    key_tile = torch.arange(start.shape[1])
    walked = (key_tile >= lo[..., None]) & (key_tile < hi[..., None])  # [B, query tiles, key tiles]
    first, last = first[None, :, None], last[None, :, None]
    visit = walked & (end_max > first) & (start_min <= last)
    unmasked = walked & (start_max <= first) & (end_min > last)
    computed = visit | unmasked
    return Walk(rows, cols, int(computed.sum()), int((computed & ~unmasked).sum()))


class FlexBlocks(NamedTuple):
    """A block mask's computed blocks over a batch: ``blocks`` non-empty, of which ``full``."""

    block: int
    blocks: int
    full: int

    @property
    def pairs(self) -> int:
        return self.blocks * self.block * self.block


def flex_blocks(mask, block: int = FLEX_BLOCK) -> FlexBlocks:
    """Non-empty and full ``block x block`` blocks of an ``IntervalMask``: what
    ``mask.to_flex_block_mask(block)`` holds (``kv_num_blocks`` and ``full_kv_num_blocks``). A mask
    with holes is counted from its keys' query intervals (one per key): the same blocks, transposed."""
    if mask.has_holes:
        q_start, q_end = mask.key_intervals()
        return _interval_blocks(q_start, q_end, mask.kv_start.shape[1], block)
    return _interval_blocks(mask.kv_start, mask.kv_end, mask.seq_len_k, block)


def _interval_blocks(bound_start: torch.Tensor, bound_end: torch.Tensor, num_cols: int, block: int) -> FlexBlocks:
    """``flex_blocks`` of rows whose visible columns are one interval ``[start, end)`` each (any order)."""
    batch, seq_q = bound_start.shape
    kv_blocks = -(-num_cols // block)
    q_blocks = -(-seq_q // block)
    start, end = bound_start.long(), bound_end.long()
    seen = end > start
    # Per row: +1 at its first key block, -1 past its last; a block is touched where the running
    # count over the key blocks of any of its rows is positive.
    first_block = torch.where(seen, start // block, kv_blocks)
    last_block = torch.where(seen, _cdiv(end, block), kv_blocks)
    q_block = (torch.arange(seq_q) // block).expand(batch, seq_q)
    marks = torch.zeros(batch, q_blocks, kv_blocks + 1, dtype=torch.int64)
    ones = torch.ones(batch, seq_q, dtype=torch.int64)
    marks.view(batch, -1).scatter_add_(1, q_block * (kv_blocks + 1) + first_block, ones)
    marks.view(batch, -1).scatter_add_(1, q_block * (kv_blocks + 1) + last_block, -ones)
    touched = marks.cumsum(-1)[..., :kv_blocks] > 0
    # Full: every query of the block (rows past Sq count as not seeing) sees every key of it.
    keys_lo = torch.arange(kv_blocks) * block
    keys_hi = (keys_lo + block).clamp(max=num_cols)
    pad = q_blocks * block - seq_q
    start_p = torch.nn.functional.pad(start, (0, pad), value=num_cols + 1).view(batch, q_blocks, block)
    end_p = torch.nn.functional.pad(end, (0, pad), value=-1).view(batch, q_blocks, block)
    row_full_keys = keys_hi - keys_lo == block  # a partial last key block is never full in Flex either
    full = ((start_p.amax(-1)[..., None] <= keys_lo) & (end_p.amin(-1)[..., None] >= keys_hi) & row_full_keys)
    return FlexBlocks(block, int(touched.sum()), int(full.sum()))


class TileWaste(NamedTuple):
    visible: int
    forward: Walk  # query tiles over key tiles
    dq: Walk  # the same walk at the backward's tiles
    dkdv: Walk  # key tiles over query tiles
    flex: FlexBlocks

    def columns(self, backward: bool = True) -> dict:
        """The benchmark CSV's tile-waste columns (``bench.harness.TILE_WASTE_COLUMNS``); the
        backward's empty for a workload without one. ``bwd_tile_pairs`` is dQ's and dK/dV's together,
        so ``bwd_waste`` divides it by twice the visible pairs."""
        bwd = self.dq.pairs + self.dkdv.pairs if backward else None
        return {
            "visible_pairs": self.visible,
            "fwd_tile_pairs": self.forward.pairs,
            "fwd_waste": _ratio(self.forward.pairs, self.visible),
            "bwd_tile_pairs": bwd,
            "bwd_waste": None if bwd is None else _ratio(bwd, 2 * self.visible),
            "flex_block_pairs": self.flex.pairs,
            "flex_waste": _ratio(self.flex.pairs, self.visible),
        }

    def describe(self, backward: bool = True) -> str:
        """One line; tiles as queries x keys."""
        def waste(pairs):
            ratio = _ratio(pairs, self.visible)
            return "-" if ratio is None else f"{ratio:.3f}x"

        f, q, k, x = self.forward, self.dq, self.dkdv, self.flex
        text = (f"{self.visible:,} visible pairs; tfkernels forward {f.rows}x{f.cols}: {f.pairs:,} computed "
                f"({f.tiles:,} tiles, {f.edge_tiles:,} edge) {waste(f.pairs)}")
        if backward:
            text += (f", dQ {q.rows}x{q.cols}: {q.tiles:,} tiles {waste(q.pairs)}, dK/dV {k.cols}x{k.rows}: "
                     f"{k.tiles:,} tiles {waste(k.pairs)}")
        return text + (f"; FlexAttention {x.block}x{x.block}: {x.pairs:,} computed ({x.blocks:,} blocks, {x.full:,} "
                       f"full) {waste(x.pairs)}")


def _ratio(pairs: int, visible: int) -> float | None:
    return pairs / visible if visible else None


def tile_waste(mask, head_dim: int, dtype: torch.dtype = torch.bfloat16, flex_block: int = FLEX_BLOCK) -> TileWaste:
    """Visible pairs and the computed pairs of tfkernels' three passes at their default sm_90 tiles
    for ``head_dim`` and ``dtype``, and of a FlexAttention block mask; per head, over the batch."""
    configs = launch_configs(head_dim, dtype, "sm_90", holes=mask.has_holes)
    q_start, q_end = mask.key_intervals()
    if mask.has_holes:
        forward = hole_walk(mask, configs.forward.block_m, configs.forward.block_n)
        dq = hole_walk(mask, configs.dq.block_m, configs.dq.block_n)
    else:
        forward = tile_walk(mask.kv_start, mask.kv_end, mask.seq_len_k, configs.forward.block_m,
                            configs.forward.block_n)
        dq = tile_walk(mask.kv_start, mask.kv_end, mask.seq_len_k, configs.dq.block_m, configs.dq.block_n)
    dkdv = tile_walk(q_start, q_end, mask.kv_start.shape[1], configs.dkdv.block_n, configs.dkdv.block_m,
                     monotone=not mask.has_holes)
    return TileWaste(mask.visible_pairs(), forward, dq, dkdv, flex_blocks(mask, flex_block))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tile_waste",
                                     description="Tile waste of the attention workloads' masks (CPU, exact counts).")
    parser.add_argument("--quick", action="store_true", help="the quick mode's small layouts")
    args = parser.parse_args(argv)
    from .workloads.attention import shapes

    for shape in shapes(args.quick):
        mask = shape.build_mask("cpu", shape.segment_ids("cpu"))
        print(f"{shape.name}: {tile_waste(mask, shape.head_dim).describe(backward=shape.training)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
