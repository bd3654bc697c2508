"""bench/readme_table.py: the README's performance table from the newest GPU CSV, and the
"GPU figures are missing" block when there is none."""

import pytest

from bench import readme_table
from bench.harness import write_csv
from bench.workloads import SUITES

from .support import CPU, PNG_MAGIC


def _as_gpu_run(rows, timestamp):
    """The quick rows relabelled as a full-size run on a made-up device (only the generator's
    selection and formatting are under test; no figure here is a GPU figure)."""
    return [{**r, "device": "Synthetic test device", "quick": False, "timestamp": timestamp} for r in rows]


def test_readme_table_uses_the_newest_gpu_csv(quick_run, quick_rows, tmp_path):
    results = tmp_path / "results"
    write_csv(quick_rows, results / "cpu.csv")  # CPU rows never make the table
    write_csv(_as_gpu_run(quick_rows, "2030-01-01T00:00:00Z"), results / "old.csv")
    newer = [r for r in _as_gpu_run(quick_rows, "2030-01-02T00:00:00Z") if r["suite"] == "lm_loss"]
    write_csv(newer, results / "new.csv")
    (results / "new_lm_loss_lm_loss.png").write_bytes(PNG_MAGIC)
    path, rows = readme_table.newest_gpu_csv(results)
    assert path.name == "new.csv" and len(rows) == len(newer)
    block = readme_table.block(results, tmp_path)
    assert "**Synthetic test device**" in block and "(results/new.csv)" in block
    assert "(results/new_lm_loss_lm_loss.png)" in block
    table_rows = [line for line in block.splitlines() if line.startswith("| lm_loss | lm_loss |")]
    (workload,) = SUITES["lm_loss"](True, CPU)
    assert [line.split(" | ")[2] for line in table_rows] == list(workload.modes)
    forward_peers = [r for r in newer if r["mode"] == workload.modes[0] and r["implementation"] != "tfkernels"]
    assert forward_peers
    for peer in forward_peers:
        assert f"{peer['implementation']} {peer['time_vs_tfkernels']:.2f}x" in table_rows[0]


def test_readme_table_says_gpu_figures_are_missing(quick_rows, tmp_path):
    write_csv(quick_rows, tmp_path / "cpu.csv")
    block = readme_table.block(tmp_path, tmp_path)
    assert "GPU figures are missing" in block and "|" not in block
    text = f"intro\n{readme_table.START}\nold\n{readme_table.END}\noutro\n"
    assert readme_table.updated_readme(text, block) == f"intro\n{block}\noutro\n"
    with pytest.raises(ValueError, match="no table block"):
        readme_table.updated_readme("no markers", block)


def test_readme_table_matches_the_committed_results():
    assert readme_table.main(["--check"]) == 0
