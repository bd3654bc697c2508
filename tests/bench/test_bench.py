"""The benchmark harness on the CPU: the workload layout, ``python -m bench --quick`` and its CSV,
the plot script, the README table generator and the pytest-benchmark entry.

The quick run's figures are CPU figures of the reference paths; these tests check the harness
(schema, one row per case, consistent work and ratio columns), never speeds.
"""

import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tfkernels as tk
from bench import readme_table
from bench.__main__ import parse_args
from bench.harness import CSV_COLUMNS, read_csv, write_csv
from bench.plot import chart_title, plot_csv
from bench.workloads import SUITES, e2e
from tfkernels.testing import packed_transfusion_layout

ROOT = Path(__file__).resolve().parents[2]
MODES = {"forward", "backward", "forward_backward"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK_W1 = dict(doc_len=(64, 128), caption_len=(8, 24), image_len=16)  # bench/workloads/attention.py


def bench_env():
    # The CPU quick mode times the reference paths; Triton's interpreter would only make it slow.
    return {**os.environ, "TRITON_INTERPRET": "0"}


# ----------------------------------------------------------------------------------------------
# The workload layout
# ----------------------------------------------------------------------------------------------
def test_packed_transfusion_layout_has_the_w1_composition():
    images, documents = packed_transfusion_layout(random.Random(0), 2, 8192)
    assert (images, documents) == packed_transfusion_layout(random.Random(0), 2, 8192)
    assert (images, documents) != packed_transfusion_layout(random.Random(1), 2, 8192)
    for row_images, row_documents in zip(images, documents):
        assert sum(row_documents) == 8192  # fully packed, no padding
        assert all(512 <= n <= 2048 for n in row_documents[:-1])
        assert 512 <= row_documents[-1] < 1024  # the last document takes the rest
        starts = [sum(row_documents[:i]) for i in range(len(row_documents) + 1)]
        for start, end in row_images:
            assert end - start == 256
            doc = max(i for i, s in enumerate(starts) if s <= start)
            # inside one document, with a caption before it and text after it
            assert start - starts[doc] >= 20 and starts[doc + 1] - end >= 20
        patches = sum(end - start for start, end in row_images)
        assert 0.4 <= patches / 8192 <= 0.6
    mask = tk.IntervalMask.from_spans(8192, images, documents)
    mask.validate()


def test_packed_transfusion_layout_rejects_bad_ranges():
    with pytest.raises(ValueError, match="doc_len"):
        packed_transfusion_layout(random.Random(0), 1, 64, doc_len=(10, 5))
    with pytest.raises(ValueError, match="caption_len"):
        packed_transfusion_layout(random.Random(0), 1, 64, caption_len=(0, 5))


def test_e2e_batch_reproduces_the_layout():
    shape = e2e.shape_for(quick=True)
    batch = e2e.packed_batch(shape, seed=3)
    expected = tk.IntervalMask.from_spans(shape.seq_len, *shape.spans)
    assert torch.equal(batch.mask.kv_start, expected.kv_start)
    assert torch.equal(batch.mask.kv_end, expected.kv_end)
    assert int((batch.doc_ids >= 0).sum()) == shape.batch * shape.seq_len


@pytest.mark.parametrize("suite", ["attention", "diffusion", "lm_loss", "e2e"])
def test_peers_compute_what_tfkernels_computes(suite, monkeypatch):
    """Same inputs, same result: otherwise a time ratio compares different work."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # tfkernels' reference path: fast on the CPU
    device = torch.device("cpu")
    compared = 0
    for workload in SUITES[suite](True, device):
        inputs = workload.setup(device, 0)
        mode = workload.modes[0]  # forward, or e2e's train_step (its first call returns the loss)
        # tfkernels_seeded draws its own noise from the seed, so its loss differs by design.
        runnable = [i for i in workload.implementations if mode in (i.modes or workload.modes)
                    and i.unavailable(device, mode) is None and i.name != "tfkernels_seeded"]
        results = {}
        for implementation in runnable:
            with torch.set_grad_enabled(workload.training):
                output = implementation.prepare(inputs)(inputs)
            results[implementation.name] = (output[0] if isinstance(output, tuple) else output).detach()
        for name, result in results.items():
            torch.testing.assert_close(result, results["tfkernels"], rtol=1e-4, atol=1e-4,
                                       msg=lambda m, name=name: f"{name}: {m}")
            compared += name != "tfkernels"
    assert compared == {"attention": 18, "diffusion": 2, "lm_loss": 1, "e2e": 1}[suite]


# ----------------------------------------------------------------------------------------------
# python -m bench --quick
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.csv"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                            env=bench_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


@pytest.fixture(scope="module")
def quick_rows(quick_run):
    return read_csv(quick_run[0])


def test_quick_csv_schema(quick_run, quick_rows):
    with open(quick_run[0]) as f:
        assert tuple(f.readline().strip().split(",")) == CSV_COLUMNS
    for row in quick_rows:
        assert row["device"] == "cpu" and row["timer"] == "wall_clock" and row["quick"] is True
        assert row["torch"] == torch.__version__ and row["commit"] and row["timestamp"].endswith("Z")
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["peak_mb"] is None  # no allocator peak on the CPU
        assert row["mfu"] is None  # no device peak to divide by


def test_quick_run_has_one_row_per_case(quick_rows):
    keys = [(r["suite"], r["workload"], r["implementation"], r["mode"]) for r in quick_rows]
    assert len(keys) == len(set(keys))
    training = MODES | {"mask_build"}
    expected = {}
    for workload in ("W1_packed_hkv16", "W1_packed_hkv4", "W2_long_packed", "W3_causal", "W4_full"):
        expected[("attention", workload)] = {"tfkernels": training, "flex": {"forward", "mask_build"},
                                             "sdpa_dense_mask": MODES}
        if workload in ("W3_causal", "W4_full"):
            expected[("attention", workload)]["sdpa_flash"] = MODES
    for workload in ("W5_image_vs_cache", "W5_decode"):
        expected[("attention", workload)] = dict.fromkeys(("tfkernels", "flex", "sdpa_dense_mask", "sdpa_flash"),
                                                          {"forward"})
    for workload in ("diffusion_4x8x8", "diffusion_8x8x8"):
        expected[("diffusion", workload)] = {"tfkernels": MODES, "tfkernels_seeded": MODES, "eager": MODES,
                                             "device_copy": {"copy"}}
    expected[("lm_loss", "lm_loss")] = {"tfkernels": MODES, "eager": MODES}
    expected[("e2e", "e2e_train_step")] = {"tfkernels": {"train_step"}, "sdpa_dense_eager_losses": {"train_step"}}
    expected_keys = {(suite, workload, impl, mode) for (suite, workload), impls in expected.items()
                     for impl, modes in impls.items() for mode in modes}
    assert set(keys) == expected_keys


def test_quick_run_explains_every_skip(quick_run):
    log = quick_run[1]
    assert "CPU figures" in log
    assert "W3_causal sdpa_cudnn forward: skipped, cuDNN attention needs CUDA" in log
    assert "W1_packed_hkv16 flex backward: skipped, FlexAttention has no backward on the CPU" in log
    assert "lm_loss compiled_eager forward_backward: skipped, torch.compile peers run on CUDA only" in log
    assert "flex_eager_losses train_step: skipped, FlexAttention has no backward on the CPU" in log
    assert re.search(r"^\[1/\d+\] attention W1_packed_hkv16 tfkernels forward: [\d.]+ ms$", log, re.M)  # progress


def test_ratio_column_is_time_over_tfkernels(quick_rows):
    ours = {(r["suite"], r["workload"], r["mode"]): r["median_ms"] for r in quick_rows
            if r["implementation"] == "tfkernels"}
    for row in quick_rows:
        reference = ours.get((row["suite"], row["workload"], row["mode"]))
        if reference is None:
            assert row["implementation"] == "device_copy" and row["time_vs_tfkernels"] is None
        else:
            assert row["time_vs_tfkernels"] == pytest.approx(row["median_ms"] / reference, rel=1e-4)


def _work(row, throughput, unit):
    """What one call did, back from a throughput column: throughput x seconds."""
    return row[throughput] * unit * row["median_ms"] / 1e3


def test_attention_tflops_count_visible_pairs(quick_rows):
    images, documents = packed_transfusion_layout(random.Random(0), 2, 256, **QUICK_W1)
    pairs = {
        "W1_packed_hkv16": int(tk.IntervalMask.from_spans(256, images, documents).to_dense().sum()),
        "W3_causal": 256 * 257 // 2,
        "W4_full": 128 * 128,
        "W5_image_vs_cache": 16 * 256,
        "W5_decode": 256,
    }
    factor = {"forward": 1.0, "backward": 2.5, "forward_backward": 3.5}
    head_dim, heads_q = 32, 4
    checked = 0
    for row in quick_rows:
        if row["suite"] != "attention":
            continue
        if row["mode"] == "mask_build":
            assert row["tflops"] is None
            continue
        assert row["gb_per_s"] is None and row["tokens_per_s"] is None
        if row["workload"] in pairs:
            flops = 4 * pairs[row["workload"]] * head_dim * heads_q * factor[row["mode"]]
            assert _work(row, "tflops", 1e12) == pytest.approx(flops, rel=1e-4)
            checked += 1
    assert checked >= 30


def test_memory_bound_and_end_to_end_throughput(quick_rows):
    elements = {"diffusion_4x8x8": 8 * 4 * 8 * 8, "diffusion_8x8x8": 8 * 8 * 8 * 8}
    moved = {"forward": 4, "backward": 4, "forward_backward": 8, "copy": 8}  # float32 tensors
    for row in quick_rows:
        if row["suite"] == "diffusion":
            assert row["tflops"] is None
            assert _work(row, "gb_per_s", 1e9) == pytest.approx(moved[row["mode"]] * elements[row["workload"]] * 4,
                                                                rel=1e-4)
        elif row["suite"] == "lm_loss":
            projections = {"forward": 1, "backward": 2, "forward_backward": 3}[row["mode"]]
            assert _work(row, "tflops", 1e12) == pytest.approx(2 * 256 * 64 * 512 * projections, rel=1e-4)
        elif row["suite"] == "e2e":
            assert _work(row, "tokens_per_s", 1) == pytest.approx(2 * 256, rel=1e-4)
            assert row["tflops"] > 0 and math.isfinite(row["tflops"])


def test_unknown_suite_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--suite", "nope", "--quick"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_full_size_on_the_cpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu"])
    assert "need a CUDA GPU; use --quick" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Plots and the README table
# ----------------------------------------------------------------------------------------------
def test_plot_writes_one_png_per_workload(quick_run, quick_rows, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot script needs the bench extra (matplotlib)")
    paths = plot_csv(quick_run[0], tmp_path)
    workloads = {(r["suite"], r["workload"]) for r in quick_rows}
    assert {p.name for p in paths} == {f"quick_{s}_{w}.png" for s, w in workloads}
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert "CPU figures" in chart_title(quick_rows[:1])


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
    assert [line.split(" | ")[2] for line in table_rows] == ["forward", "backward", "forward_backward"]
    eager = {r["mode"]: r["time_vs_tfkernels"] for r in newer if r["implementation"] == "eager"}
    assert f"eager {eager['forward']:.2f}x" in table_rows[0]


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


# ----------------------------------------------------------------------------------------------
# pytest bench/ --benchmark-only
# ----------------------------------------------------------------------------------------------
def test_pytest_benchmark_entry_runs_the_workloads():
    pytest.importorskip("pytest_benchmark", reason="the entry needs pytest-benchmark (test extra)")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_bench_pytest.py", "--benchmark-only", "-q",
         "-p", "no:cacheprovider", "-k", "lm_loss", "-rs"],
        cwd=ROOT, env=bench_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    if torch.cuda.is_available():  # full size on the GPU, compiled peers included
        assert "9 passed" in result.stdout
    else:
        assert "6 passed, 3 skipped" in result.stdout
        assert "torch.compile peers run on CUDA only" in result.stdout  # -rs: skip reasons
