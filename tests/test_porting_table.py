"""The README's porting table states where tfkernels differs from FlashAttention on purpose, and each
difference it states holds."""

import importlib
import re
from pathlib import Path

import pytest
import torch

import tfkernels as tk
from tests.support import DEVICE, both_paths_fixture

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
FLASH_ROWS = [line for line in README.splitlines() if line.startswith("| FlashAttention |")]

attention_module = importlib.import_module("tfkernels.attention")
path = both_paths_fixture(attention_module)


def flash_row(what: str) -> str:
    """The FlashAttention row of the porting table whose "what you call there" cell holds ``what``."""
    rows = [row for row in FLASH_ROWS if what in row.split("|")[2]]
    assert len(rows) == 1, (what, rows)
    return rows[0]


def test_the_table_states_the_lse_of_a_row_that_sees_nothing(path):
    row = flash_row("softmax_lse")
    assert re.search(r"On purpose, a row that sees no key has lse `-inf`.*FlashAttention gives `\+inf`", row)
    if path == "kernel" and tk.backend(DEVICE) != "triton":
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 to run the Triton kernels")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 2, 16, generator=gen).to(DEVICE) for _ in range(3))
    start = torch.tensor([[0, 1, 1]], dtype=torch.int32, device=DEVICE)  # query 1 sees nothing
    end = torch.tensor([[1, 1, 3]], dtype=torch.int32, device=DEVICE)
    out, lse = tk.attention(q, k, v, tk.IntervalMask(start, end, 3), return_lse=True)
    assert torch.equal(lse[0, :, 1], torch.full((2,), -torch.inf, device=DEVICE))
    assert torch.isfinite(lse[0, :, [0, 2]]).all() and torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))


def test_the_table_states_a_window_wider_than_the_keys():
    row = flash_row("window_size=(left, right)")
    assert "`Sq = 6, Sk = 4, window_size=(-1, 4)`: query 0 sees keys `[0, 3)` here, all 4 there" in row
    mask = tk.IntervalMask.window((-1, 4), 1, 6, 4)
    assert mask.kv_start[0].tolist() == [0] * 6 and mask.kv_end[0].tolist() == [3, 4, 4, 4, 4, 4]
    # FlashAttention's reading of a side of Sk keys or more: unbounded.
    assert tk.IntervalMask.window((-1, -1), 1, 6, 4).kv_end[0].tolist() == [4] * 6


def test_the_table_states_that_cache_seqlens_is_one_length_per_row():
    row = flash_row("flash_attn_with_kvcache")
    assert "`lengths` is a `[B]` tensor or list" in row and "raises `TypeError` here" in row
    with pytest.raises(TypeError, match="cache_seqlens: expected a list of ints or a 1-D int tensor, got 5"):
        tk.IntervalMask.from_cache_seqlens(5, 1, 8)
    mask = tk.IntervalMask.from_cache_seqlens([5] * 3, 1, 8)
    assert mask.batch_size == 3 and mask.kv_end[:, 0].tolist() == [5] * 3
