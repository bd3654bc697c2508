"""bench/harness.py: the CSV it writes (schema, environment columns, percentiles) and the ratio
column, checked on the quick CPU run; and that bench/README.md documents every column."""

import re

import pytest
import torch

from bench.harness import CSV_COLUMNS, OURS

from .support import ROOT, cases, suite_workloads


def test_quick_csv_schema(quick_run, quick_rows):
    with open(quick_run[0]) as f:
        assert tuple(f.readline().strip().split(",")) == CSV_COLUMNS
    for row in quick_rows:
        assert row["device"] == "cpu" and row["timer"] == "wall_clock" and row["quick"] is True
        assert row["torch"] == torch.__version__ and row["commit"] and row["timestamp"].endswith("Z")
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["peak_mb"] is None  # no allocator peak on the CPU
        assert row["mfu"] is None  # no device peak to divide by


def test_ratio_column_is_time_over_tfkernels(quick_rows):
    ours = {(r["suite"], r["workload"], r["mode"]): r["median_ms"] for r in quick_rows
            if r["implementation"] == OURS}
    # The modes in which tfkernels itself runs, per workload (device_copy's "copy" is not one).
    ours_modes = {(w.suite, w.name, m) for w, i, m, _ in cases(suite_workloads()) if i.name == OURS}
    for row in quick_rows:
        reference = ours.get((row["suite"], row["workload"], row["mode"]))
        if reference is None:
            assert (row["suite"], row["workload"], row["mode"]) not in ours_modes
            assert row["time_vs_tfkernels"] is None
        else:
            assert row["time_vs_tfkernels"] == pytest.approx(row["median_ms"] / reference, rel=1e-4)


def test_readme_documents_every_csv_column():
    text = (ROOT / "bench" / "README.md").read_text()
    csv_section = text.split("\n## The CSV\n")[1].split("\n## ")[0]
    documented = re.findall(r"^\| `(\w+)` \|", csv_section, re.M)
    assert documented == list(CSV_COLUMNS)  # every column, in the CSV's order
