"""bench/gpu_check (scripts/gpu_check.sh): the dry run on the CPU, a step stopped at its deadline,
the budget's split over the steps, and the summary's verdict from pytest's result file."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.gpu_check import __main__ as cli
from bench.gpu_check import run, summary
from bench.harness import read_csv
from bench.workloads import SUITES

from .support import ROOT, cases, key, row_key, suite_workloads

DRY_SUITES = ("diffusion", "adaln")  # the dry run's suites here; the quick run covers the others


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(out),
                             "--suites", ",".join(DRY_SUITES)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return result, out


def test_dry_run_writes_every_file_and_passes(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(run.OUTPUTS)
    env = json.loads((out / run.ENV).read_text())
    assert (env["device"], env["torch"], env["dry_run"]) == ("cpu", torch.__version__, True)
    assert set(env["packages"]) == set(run.PACKAGES)
    text = (out / run.SUMMARY).read_text()
    assert "**Verdict: pass**" in text and text in result.stdout
    for step in ("tests", *DRY_SUITES):
        assert f"] {step}: ok (" in (out / run.LOG).read_text()


def test_dry_run_collects_the_gpu_tests_and_they_skip(dry_run):
    _, out = dry_run
    tests = summary.read_junit(out / run.TESTS)
    assert len(tests) >= 40 and {outcome for _, outcome, _ in tests} == {"skipped"}
    assert all(message.startswith("needs a CUDA GPU") for *_, message in tests)
    assert "tests.tfkernels.test_attention::test_long_masks_on_gpu[causal-torch.bfloat16-2-1-8192-16-4-128]" in {
        test for test, *_ in tests}


def test_dry_run_appends_every_suite_to_one_csv(dry_run):
    _, out = dry_run
    rows = read_csv(out / run.RESULTS)
    expected = {key(w, i, m) for w, i, m, reason in cases(suite_workloads(DRY_SUITES)) if reason is None}
    assert sorted(map(row_key, rows)) == sorted(expected)
    assert "| adaln | adaln_modulate | forward | " in (out / run.SUMMARY).read_text()


def test_a_step_is_stopped_at_its_deadline_and_keeps_what_it_wrote(tmp_path):
    # A child that writes, starts a grandchild, and handles the interrupt as pytest does (writing its
    # result file), then a child that ignores the interrupt: killed after the grace.
    code = ("import pathlib, subprocess, sys, time; out = pathlib.Path(sys.argv[1]); out.write_text('row\\n'); "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "(out.parent / 'pid').write_text(str(p.pid))\n"
            "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    out.write_text('row\\ninterrupted\\n')")
    rc, seconds = run.run_until([sys.executable, "-c", code, str(tmp_path / "rows")], time.monotonic() + 3,
                                tmp_path / "log")
    assert rc is None and 3 <= seconds < 3 + run.GRACE_S
    assert (tmp_path / "rows").read_text() == "row\ninterrupted\n"
    assert _gone(int((tmp_path / "pid").read_text()))  # the grandchild went with its group
    assert run.run_until([sys.executable, "-c", "import sys; print('done'); sys.exit(3)"], time.monotonic() + 60,
                         tmp_path / "log")[0] == 3
    assert (tmp_path / "log").read_text().endswith("done\n")


def _gone(pid):
    """The process has ended (reaped, or a zombie waiting to be), within a few seconds."""
    for _ in range(50):
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_the_budget_is_split_by_shares_and_unused_time_rolls_forward(tmp_path, monkeypatch):
    budgets = {}

    def fake_step(outdir, step, deadline, *args):
        budgets[step.name] = deadline - time.monotonic()
        step.status = "ok"

    monkeypatch.setattr(run, "run_tests", fake_step)
    monkeypatch.setattr(run, "run_suite", fake_step)
    steps = run.run(tmp_path, 215.0, 50.0, ["attention", "lm_loss", "e2e"], dry_run=True, commit="abc")
    assert [s.name for s in steps] == ["tests", "attention", "lm_loss", "e2e"]
    left = 215.0 - run.GRACE_S  # each step ends at once: the time left stays the same
    attention, lm_loss, e2e = (run.SUITE_SHARES[s] for s in ("attention", "lm_loss", "e2e"))
    assert budgets["tests"] == pytest.approx(50.0, abs=1)
    assert budgets["attention"] == pytest.approx(left * attention / (attention + lm_loss + e2e), abs=1)
    assert budgets["lm_loss"] == pytest.approx(left * lm_loss / (lm_loss + e2e), abs=1)
    assert budgets["e2e"] == pytest.approx(left, abs=1)
    assert json.loads((tmp_path / run.ENV).read_text())["commit"] == "abc"
    # Written after every step: without pytest's result file the run fails, and says why.
    assert summary.problems(tmp_path, steps) == [f"tests: pytest wrote no {run.TESTS} (see the log)"]
    assert "| e2e | " in (tmp_path / run.SUMMARY).read_text()


def test_a_step_without_time_left_is_not_started(tmp_path, monkeypatch):
    def slow_step(outdir, step, deadline, *args):
        time.sleep(max(0.0, deadline - time.monotonic()))
        step.status = "stopped at its deadline"

    monkeypatch.setattr(run, "run_tests", slow_step)
    monkeypatch.setattr(run, "MIN_STEP_S", 1.0)
    monkeypatch.setattr(run, "GRACE_S", 0.0)
    steps = run.run(tmp_path, 2.0, 2.0, ["attention"], dry_run=True, commit="abc")
    assert steps[1].status.startswith("not run: ")


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.tfkernels.test_attention" name="test_head_dims_on_gpu[64]" time="1.0"/>
<testcase classname="tests.tfkernels.test_attention" name="test_head_dims_on_gpu[80]" time="1.0">
  <failure message="AssertionError: dq: max error 0.5 &gt; bound 0.01&#10;more">traceback</failure></testcase>
<testcase classname="tests.tfkernels.test_lm_loss" name="test_bf16_on_gpu[mean]" time="0.0">
  <skipped type="pytest.skip" message="needs a CUDA GPU">reason</skipped></testcase>
<testcase classname="" name="tests.tfkernels.test_diffusion" time="0.0">
  <error message="collection failure">ImportError: No module named 'hypothesis'</error></testcase>
</testsuite></testsuites>"""


def test_the_summary_reads_pytests_result_file(tmp_path):
    (tmp_path / run.TESTS).write_text(JUNIT)
    (tmp_path / run.ENV).write_text(json.dumps(dict(
        device="NVIDIA H100", torch="2.11.0", triton="3.6.0", commit="abc", timestamp="t", python="3.12", cuda="12.8",
        dry_run=False, budget_s=600, packages={"transformers": None})))
    steps = [run.Step("tests", 300, "ok", 12), run.Step("attention", 200, "stopped at its deadline", 200),
             run.Step("e2e", 50, "failed (exit code 1)", 3)]
    assert summary.problems(tmp_path, steps) == [
        "failed tests.tfkernels.test_attention::test_head_dims_on_gpu[80]: AssertionError: dq: max error 0.5 > bound 0.01",
        "error tests.tfkernels.test_diffusion: collection failure", "suite e2e: failed (exit code 1)"]
    text = summary.write(tmp_path, steps)
    assert text.startswith("# GPU run: NVIDIA H100\n") and "Packages: transformers not installed." in text
    assert "**Verdict: FAILED**" in text and "1 error, 1 failed, 1 passed, 1 skipped" in text
    assert "| attention | 200 | 200 | stopped at its deadline |" in text and "0 rows in results.csv" in text
    (tmp_path / run.TESTS).write_text(JUNIT[:300])  # cut off while being written
    ((test, outcome, message),) = summary.read_junit(tmp_path / run.TESTS)
    assert (test, outcome) == (run.TESTS, "error") and message.startswith("not readable: ")


def test_the_comparison_names_the_fastest_peer():
    def row(implementation, median_ms, ratio, tflops=None):
        return dict(suite="attention", workload="W3_causal", mode="forward", implementation=implementation,
                    median_ms=median_ms, time_vs_tfkernels=ratio, tflops=tflops, gb_per_s=None, tokens_per_s=None)

    rows = [row("tfkernels", 2.0, 1.0, tflops=400.0), row("tfkernels_seeded", 1.0, 0.5), row("sdpa_flash", 3.0, 1.5),
            row("flex", 2.5, 1.25)]
    assert summary.comparison(rows)[2:] == ["| attention | W3_causal | forward | 2 ms, 400 TFLOP/s | flex 2.5 ms | 1.25x |"]


def test_command_line(capsys):
    assert list(run.SUITE_SHARES) == [s for s in run.SUITE_SHARES if s in SUITES] and set(run.SUITE_SHARES) == set(SUITES)
    args = cli.parse_args(["out", "--suites", "hf,attention", "--budget-s", "300"])
    assert (args.suites, args.tests_budget_s) == (["attention", "hf"], 150.0)  # the run's order; half for the tests
    for argv, message in ((["--suites", "attention"], "OUTDIR is required"), (["o", "--suites", "nope"], "expected suites"),
                          (["o", "--budget-s", "20"], "--budget-s: expected at least 35 seconds, got 20")):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
        assert message in capsys.readouterr().err


def test_readme_describes_the_run():
    section = (ROOT / "bench" / "README.md").read_text().split("\n## A time-boxed GPU run\n")[1].split("\n## ")[0]
    assert "bash scripts/gpu_check.sh OUTDIR --budget-s" in section and "--dry-run" in section
    assert all(f"`{name}`" in section for name in run.OUTPUTS)


def test_every_gpu_test_is_where_the_run_looks():
    marking = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")
               if "gpu_only" in p.read_text() or "mark.gpu" in p.read_text()}
    assert marking and all(p.startswith(run.TESTS_PATH + "/") for p in marking - {"tests/bench/test_gpu_check.py"})


def test_children_import_this_checkout():
    env = run.child_environment()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT) and env["TRITON_INTERPRET"] == "0"
