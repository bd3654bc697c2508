"""``python -m bench`` (bench/__main__.py): its arguments, and the quick CPU run's rows and log.

The quick run's figures are CPU figures of the reference paths; these tests check the harness
(one row per case, every skip explained), never speeds. What the run should contain is derived
from the suites (``bench.workloads.SUITES``), so adding a peer or a workload changes no test.
"""

import re

import pytest

from bench.__main__ import parse_args
from bench.workloads.attention import CANDIDATES_NEED_A_GPU
from bench.workloads.hf import MISSING_TRANSFORMERS
from bench.workloads.pixart import MISSING_DIFFUSERS

from .support import CPU, cases, key, row_key, suite_workloads


def test_quick_run_has_one_row_per_case(quick_rows):
    keys = [row_key(r) for r in quick_rows]
    assert len(keys) == len(set(keys))
    all_cases = cases(suite_workloads())
    # tfkernels itself is never unavailable (but for the hf suite without transformers or diffusers, optional
    # extras, and its candidate launch configs, which compare only on a GPU): a predicate that says so would
    # also drop its rows below.
    assert not [key(w, i, m) for w, i, m, reason in all_cases if i.ours and reason is not None
                and reason not in (MISSING_TRANSFORMERS, MISSING_DIFFUSERS, CANDIDATES_NEED_A_GPU)]
    assert set(keys) == {key(w, i, m) for w, i, m, reason in all_cases if reason is None}
    workloads = {id(w): w for w, *_ in all_cases}.values()
    for workload in workloads:  # something to compare with in every workload
        assert any(not i.ours and key(w, i, m) in set(keys) for w, i, m, _ in all_cases if w is workload), workload.name


def test_quick_run_explains_every_skip(quick_run):
    log = quick_run[1]
    assert "CPU figures" in log
    assert "W3_causal sdpa_cudnn forward: skipped, cuDNN attention needs CUDA" in log
    assert "W1_packed_hkv16 flex backward: skipped, FlexAttention has no backward on the CPU" in log
    assert "lm_loss compiled_eager forward_backward: skipped, torch.compile peers run on CUDA only" in log
    assert "flex_eager_losses train_step: skipped, FlexAttention has no backward on the CPU" in log
    all_cases = cases(suite_workloads())
    skipped = [(w, i, m, reason) for w, i, m, reason in all_cases if reason is not None]
    for w, i, m, reason in skipped:
        assert f" {w.suite} {w.name} {i.name} {m}: skipped, {reason}\n" in log
    # No other skip: a peer that fails on the CPU would lose its row silently.
    assert log.count(": skipped, ") == len(skipped)
    assert re.search(rf"^\[1/{len(all_cases)}\] attention W1_packed_hkv16 tfkernels forward: [\d.]+ ms$", log,
                     re.M)  # progress


def test_unknown_suite_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--suite", "nope", "--quick"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_full_size_on_the_cpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu"])
    assert "need a CUDA GPU; use --quick" in capsys.readouterr().err


def test_quick_on_the_cpu_is_accepted():
    assert parse_args(["--quick", "--device", "cpu"]).device == CPU
