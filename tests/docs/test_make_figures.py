"""docs/make_figures.py draws the README's mask figures from real IntervalMasks."""

import runpy
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(str(DOCS / "make_figures.py"))


def test_example_mask_is_the_layout_the_figure_describes(script):
    mask = script["example_mask"]()
    starts, ends = mask.kv_start[0].tolist(), mask.kv_end[0].tolist()
    # Document 0 is [0, 18), document 1 [18, 29), then padding; images [3, 7), [10, 14), [23, 27).
    assert starts == [0] * 18 + [18] * 11 + [29, 30, 31]
    assert ends[:3] == [1, 2, 3] and ends[3:7] == [7] * 4 and ends[10:14] == [14] * 4
    assert ends[23:27] == [27] * 4 and ends[28] == 29 and ends[29:] == [29, 30, 31]


def test_example_hidden_mask_is_the_layout_the_figure_describes(script):
    mask = script["example_hidden_mask"]()
    dense = mask.to_dense()[0]
    # Document [0, 28), then padding; noisy copies [3, 8) and [16, 20) each followed by its clean copy.
    assert mask.kv_start[0].tolist() == [0] * 28 + [28, 29, 30, 31]
    assert dense[5].tolist() == [True] * 8 + [False] * 24, "a noisy copy: its context and itself"
    assert dense[10, :13].tolist() == [True] * 3 + [False] * 5 + [True] * 5, "its clean copy: not the noisy one"
    assert dense[18, :20].tolist() == [True] * 3 + [False] * 5 + [True] * 8 + [True] * 4, "no earlier noisy copy"
    assert mask.key_q_start[0, 3:8].tolist() == [3] * 5 and mask.key_q_end[0, 16:20].tolist() == [20] * 4


def test_draw_writes_a_png_and_the_readme_figure_is_committed(script, tmp_path):
    pytest.importorskip("matplotlib")
    for draw, name in (("draw", "FIGURE_NAME"), ("draw_hidden", "HIDDEN_FIGURE_NAME")):
        path = script[draw](tmp_path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        assert path.name == script[name] and (DOCS / script[name]).is_file()
