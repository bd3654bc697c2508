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
    assert "GPU figures are missing" in block and "| suite |" not in block
    # The tables that need no GPU: tile waste always, the static report once a compile CSV exists.
    assert "| W3_causal | 67,117,056 | 1.016× | 1.016× | 1.016× |" in block and "Static sm_90a" not in block
    text = f"intro\n{readme_table.START}\nold\n{readme_table.END}\noutro\n"
    assert readme_table.updated_readme(text, block) == f"intro\n{block}\noutro\n"
    with pytest.raises(ValueError, match="no table block"):
        readme_table.updated_readme("no markers", block)


def test_static_table_lists_the_bf16_walks(tmp_path):
    from bench import compile_report as cr

    def report_row(kernel, head_dim, config, **values):
        return {column: None for column in cr.CSV_COLUMNS} | dict(
            kernel=kernel, op="attention", dtype="bf16", head_dim=head_dim, gqa=False, config=config, block_m=128,
            block_n=64, num_warps=8, num_stages=3, registers=200, spill_bytes=0, shared_bytes=132096, hgmma=36,
            mma_redundancy=1.0, ex2_per_score=1.062, instr_per_64x64=1448, triton="3.9.0") | values

    walk, rerun = "BLOCK_M=128 BLOCK_N=64 RERUN=False w8 s3", "BLOCK_M=128 BLOCK_N=32 RERUN=True w8 s3"
    path = tmp_path / "results" / "compile" / "triton-3.9.0_sm_90a.csv"
    cr.write_csv([report_row("attn_bwd_dq", 128, walk, instr_per_64x64=1412), report_row("attn_fwd", 128, walk),
                  report_row("attn_fwd", 64, walk, registers=206), report_row("attn_fwd", 128, rerun),
                  report_row("attn_fwd", 128, walk, gqa=True), report_row("attn_fwd", 128, walk, dtype="fp16"),
                  report_row("attn_bwd_delta", 128, "BLOCK_M=64 w4 s3")], path)
    (tmp_path / "results" / "compile" / "triton-3.10.0_sm_80.csv").write_text("not this one")
    assert readme_table.newest_compile_csv(tmp_path / "results") == path
    lines = readme_table.static_table(path, tmp_path).splitlines()
    assert "triton 3.9.0" in lines[0] and "[CSV](results/compile/triton-3.9.0_sm_90a.csv)" in lines[0]
    assert lines[4:] == [
        "| forward | 64 | 128 × 64, 8, 3 | 206 | 0 | 129 | 36 | 1.00 | 1.06 | 1448 |",
        "| forward | 128 | 128 × 64, 8, 3 | 200 | 0 | 129 | 36 | 1.00 | 1.06 | 1448 |",
        "| dQ | 128 | 128 × 64, 8, 3 | 200 | 0 | 129 | 36 | 1.00 | 1.06 | 1412 |"]


def test_readme_table_matches_the_committed_results():
    assert readme_table.main(["--check"]) == 0
