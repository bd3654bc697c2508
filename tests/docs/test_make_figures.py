"""docs/make_figures.py draws the README's mask figure from a real IntervalMask."""

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


def test_draw_writes_a_png_and_the_readme_figure_is_committed(script, tmp_path):
    pytest.importorskip("matplotlib")
    path = script["draw"](tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert (DOCS / script["FIGURE_NAME"]).is_file()
