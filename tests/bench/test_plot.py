"""bench/plot.py: one PNG per workload of a CSV, titled so that CPU figures never pass as GPU ones."""

import pytest

from bench.plot import chart_title, plot_csv

from .support import PNG_MAGIC


def test_plot_writes_one_png_per_workload(quick_run, quick_rows, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot script needs the bench extra (matplotlib)")
    paths = plot_csv(quick_run[0], tmp_path)
    workloads = {(r["suite"], r["workload"]) for r in quick_rows}
    assert {p.name for p in paths} == {f"quick_{s}_{w}.png" for s, w in workloads}
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert "CPU figures" in chart_title(quick_rows[:1])
