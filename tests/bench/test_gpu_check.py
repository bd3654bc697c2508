"""bench/gpu_check (scripts/gpu_check.sh): the dry run as CI runs it, and the parts that work the same
on a CPU: the plan and its budgets, the stage runner (deadlines, kills, incremental files), the
summary, the device tool's limits on OUTDIR, the stages' case selection and cost model, and the
correctness checks' bookkeeping."""

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import harness
from bench.gpu_check import __main__ as cli
from bench.gpu_check import correctness, plan, runner, stages, summary
from bench.workloads import hf as hf_suite
from bench.workloads import pixart

from .support import ROOT

CUDA = torch.device("cuda")  # labels only: building a workload touches no GPU


# ------------------------------------------------------------------------------ the dry run
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(out)], cwd=ROOT,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    return result, out


def test_dry_run_passes_and_prints_the_plan(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "DRY RUN OK: 8 stages" in result.stdout
    for stage in plan.STAGES:  # the plan's table, then each stage's status line
        assert f" {stage.name} " in result.stdout.split("\n\n")[1]
        assert f"] {stage.name}: ok (" in result.stdout
    assert plan.describe(list(plan.STAGES)).splitlines()[-1] in result.stdout
    assert "540 of 540 s" in result.stdout
    # Every workload at its real shape, and the cost model's verdict per stage.
    assert "W1_packed_hkv16: B=2 Sq=8192 Sk=8192 Hq=16 Hkv=16 D=128 packed" in result.stdout
    assert "e2e_train_step: 370M params" in result.stdout
    assert "correctness: attn_packed_gqa bfloat16 B=1 Sq=8192" in result.stdout
    assert "THE PLAN DOES NOT HOLD" not in result.stdout


def test_dry_run_writes_what_the_gpu_run_brings_back(dry_run):
    _, out = dry_run
    assert plan.outdir_problems(out) == []
    names = {p.name for p in out.iterdir()}
    assert names == set(plan.OUTPUT_FILES) - {plan.COMPILE_REPORT}  # the compile report is not run dry
    records = json.loads((out / plan.STAGES_JSON).read_text())
    assert [entry["stage"] for entry in records["plan"]] == list(plan.STAGE_NAMES)
    assert all(records["stages"][name]["status"] == "ok" for name in plan.STAGE_NAMES)
    env = json.loads((out / plan.ENV).read_text())
    assert env["versions"]["torch"] == torch.__version__ and env["ceilings"]["copy_gb_per_s"] > 0
    rows = harness.read_csv(out / plan.BENCH)
    # Without transformers and diffusers the hf suite's cases are skipped.
    optional = {"hf"} if hf_suite.has_transformers() or pixart.has_diffusers() else set()
    assert {r["suite"] for r in rows} == {"attention", "diffusion", "lm_loss", "adaln", "e2e"} | optional
    assert {r["workload"] for r in rows if r["suite"] == "attention"} == {
        w.name for w in stages.stage_workloads("attention", True, torch.device("cpu"))
        + stages.stage_workloads("attention_more", True, torch.device("cpu"))}
    checks = summary.read_rows(out / plan.CORRECTNESS)
    assert {r["check"] for r in checks} == {c.name for c in correctness.checks(tiny=True)}
    # On the CPU the ops run their reference: every quantity must pass its anchored bound.
    assert all(r["passed"] == "True" for r in checks)
    assert re.match(r"dry run: \d+ GPU-only tests and \d+ others selected", records["stages"]["tests_gpu"]["detail"])
    assert "**GPU correctness: pass**" in (out / plan.SUMMARY).read_text()


# ------------------------------------------------------------------------------ the plan
def test_plan_fits_the_run_and_the_device_limits():
    assert sum(s.budget_s for s in plan.STAGES) <= plan.TOTAL_S <= 540
    assert plan.check(list(plan.STAGES)) == []
    assert len(plan.OUTPUT_FILES) < plan.MAX_FILES  # room for one temporary file at a kill
    assert plan.STAGE_NAMES[:2] == ("env", "correctness")  # priority: the card, then correctness
    assert set(plan.STAGE_NAMES) == set(stages.STAGE_FUNCTIONS)


def test_budgets_roll_forward_and_scale_down():
    stage_list = [plan.Stage("a", 10, "", ()), plan.Stage("b", 20, "", ()), plan.Stage("c", 30, "", ())]
    assert plan.deadlines(stage_list, 60, start=100.0) == [110.0, 130.0, 160.0]
    assert plan.budgets(stage_list, 30) == [5.0, 10.0, 15.0]  # --total below the sum: all scaled
    assert plan.deadlines(stage_list, 30, 0.0)[-1] == pytest.approx(30)
    assert "--total 600 s is over" in plan.check(stage_list, 600)[0]
    with pytest.raises(ValueError, match="unknown stage"):
        plan.select(["env", "nope"])
    assert [s.name for s in plan.select(["tests_gpu", "env"])] == ["env", "tests_gpu"]  # plan order


def test_outdir_limits(tmp_path):
    assert plan.outdir_problems(tmp_path) == []
    for i in range(plan.MAX_FILES + 1):
        (tmp_path / f"f{i}.txt").write_text("x")
    with open(tmp_path / "big.csv", "wb") as f:
        f.truncate(plan.MAX_FILE_BYTES + 1)  # sparse: no disk used
    (tmp_path / "a b.txt").write_text("x")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "x.txt").write_text("x")
    problems = "\n".join(plan.outdir_problems(tmp_path))
    assert "files, over 8" in problems
    assert "big.csv: 16777217 bytes" in problems
    assert "a b.txt: name has characters" in problems
    assert "more than 2 folders down" in problems


def test_command_line_needs_an_outdir_except_dry(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args([])
    assert "OUTDIR is required" in capsys.readouterr().err
    assert cli.parse_args(["--dry-run"]).outdir is None
    with pytest.raises(SystemExit):
        cli.parse_args(["out", "--stages", "env,nope"])


# ------------------------------------------------------------------------------ the runner
def _fake_stage(code: str):
    """A stage process that runs ``code`` (OUT: the output folder) instead of a real stage."""
    return [sys.executable, "-c", "import sys, time, pathlib; OUT = pathlib.Path(sys.argv[1]); " + code]


@pytest.fixture
def quick_runner(monkeypatch):
    monkeypatch.setattr(runner, "MIN_STAGE_S", 0.2)
    monkeypatch.setattr(runner, "KILL_GRACE_S", 0.5)


def test_a_stage_past_its_budget_is_cut_its_rows_kept_and_the_next_runs(tmp_path, quick_runner):
    codes = {
        # Writes its first row at once, then hangs (a compile that never returns).
        "slow": "(OUT / 'slow.csv').write_text('row 1\\n'); time.sleep(60)",
        "next": "(OUT / 'next.csv').write_text('row\\n')",
    }
    stage_list = [plan.Stage("slow", 1.0, "", ()), plan.Stage("next", 1.0, "", ())]
    summaries = []

    def launch(stage, deadline):
        return runner.run_process(_fake_stage(codes[stage.name]) + [str(tmp_path)], deadline - time.time(),
                                  tmp_path / plan.LOG)

    start = time.monotonic()
    records = runner.run_plan(stage_list, tmp_path, 2.0, launch, after_stage=lambda: summaries.append(1),
                              echo=lambda line: None)
    assert time.monotonic() - start < 5
    assert records["slow"]["status"] == "timed out" and records["slow"]["elapsed_s"] < 2
    assert (tmp_path / "slow.csv").read_text() == "row 1\n"  # written before the kill: kept
    assert records["next"]["status"] == "ok"
    assert (tmp_path / "next.csv").read_text() == "row\n"
    assert len(summaries) == 2  # the summary is rewritten after every stage
    assert "===== stage next: budget 1 s" in (tmp_path / plan.LOG).read_text()


def test_unused_time_rolls_forward_and_a_late_stage_is_not_started(tmp_path, quick_runner):
    stage_list = [plan.Stage(n, 1.0, "", ()) for n in ("quick", "hog", "late")]
    deadlines = {}

    def launch(stage, deadline):
        deadlines[stage.name] = deadline
        if stage.name == "hog":  # overruns the time of the stages after it (a launcher gone wrong)
            time.sleep(max(0.0, deadline + 1.2 - time.time()))
        return 0, False, 0.0

    start = time.time()
    records = runner.run_plan(stage_list, tmp_path, 3.0, launch, echo=lambda line: None)
    # quick ended at once: hog's deadline is still start + 2 (its own second and quick's unused one).
    assert deadlines["hog"] - start == pytest.approx(2.0, abs=0.2)
    assert records["late"]["status"] == "not run" and "no time left" in records["late"]["detail"]
    assert "late" not in deadlines


def test_a_failing_stage_is_recorded_and_the_plan_goes_on(tmp_path, quick_runner):
    def launch(stage, deadline):
        command = _fake_stage("sys.exit(3)" if stage.name == "bad" else "pass") + [str(tmp_path)]
        return runner.run_process(command, deadline - time.time(), tmp_path / plan.LOG)

    records = runner.run_plan([plan.Stage("bad", 5, "", ()), plan.Stage("good", 5, "", ())], tmp_path, 10, launch,
                              echo=lambda line: None)
    assert records["bad"]["status"] == "failed" and records["bad"]["rc"] == 3
    assert records["good"]["status"] == "ok"


def test_a_killed_stage_takes_its_child_processes_with_it(tmp_path, quick_runner):
    code = ("import subprocess; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "(OUT / 'pid').write_text(str(p.pid)); time.sleep(60)")
    rc, timed_out, seconds = runner.run_process(_fake_stage(code) + [str(tmp_path)], 1.5, tmp_path / plan.LOG)
    assert (rc, timed_out) == (None, True) and seconds < 5
    pid = int((tmp_path / "pid").read_text())
    for _ in range(50):  # reaped by init shortly after the kill
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {pid} still running after its stage was killed")


def test_stage_command_is_a_fresh_interpreter_with_the_deadline(tmp_path):
    command = runner.stage_command("e2e", tmp_path, 123.5, "abc123", dry_run=False)
    assert command[:3] == [sys.executable, "-m", "bench.gpu_check"]
    args = cli.parse_args(command[3:])
    assert (args.stage, args.outdir, args.deadline, args.commit, args.dry_run) == ("e2e", tmp_path, 123.5, "abc123",
                                                                                    False)
    env = runner.stage_env()
    assert env["TRITON_INTERPRET"] == "0" and env["TFKERNELS_AUTOTUNE"] == "0"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


def test_log_is_cut_in_the_middle(tmp_path):
    log = tmp_path / plan.LOG
    log.write_bytes(b"first line\n" + b"x" * 5000 + b"\nlast line\n")
    runner.trim_log(log, cap=1000)
    text = log.read_text()
    assert len(text) <= 1000 and text.startswith("first line") and text.endswith("last line\n")
    assert "log.txt cut:" in text


# ------------------------------------------------------------------------------ the summary
def _bench_row(workload, implementation, mode, median_ms, suite="attention", **columns):
    row = {column: None for column in harness.CSV_COLUMNS}
    row.update(suite=suite, workload=workload, shape="s", implementation=implementation, backend="b", mode=mode,
               dtype="bfloat16", device="NVIDIA H200", torch="2.11", triton="3.6", commit="abc", timer="do_bench",
               timestamp="2030-01-02T00:00:00Z", quick=False, median_ms=median_ms, p20_ms=median_ms,
               p80_ms=median_ms, **columns)
    return row


def test_summary_from_rows(tmp_path):
    rows = [
        _bench_row("W1_packed_hkv16", "tfkernels", "forward_backward", 10.0),
        _bench_row("W1_packed_hkv16", "flex", "forward_backward", 15.0),
        _bench_row("W1_packed_hkv16", "tfkernels", "forward", 3.0, tflops=400.0),
        _bench_row("W1_packed_hkv16", "tfkernels", "backward", 7.0, tflops=350.0),
        _bench_row("W1_packed_hkv16", "tfkernels", "mask_build", 0.1),
        _bench_row("W1_packed_hkv16", "flex", "mask_build", 2.0),
        _bench_row("W3_causal", "tfkernels", "forward", 4.0),
        _bench_row("W3_causal", "sdpa_flash", "forward", 2.0),
        _bench_row("lm_loss", "tfkernels", "forward_backward", 20.0, suite="lm_loss", peak_mb=300.0),
        _bench_row("lm_loss", "eager", "forward_backward", 30.0, suite="lm_loss", peak_mb=8000.0),
        _bench_row("diffusion_8x32x32", "tfkernels", "forward_backward", 0.1, suite="diffusion", gb_per_s=2000.0),
        _bench_row("diffusion_8x32x32", "device_copy", "copy", 0.08, suite="diffusion", gb_per_s=2500.0),
        _bench_row("e2e_train_step", "tfkernels", "train_step", 100.0, suite="e2e", tokens_per_s=160000.0, mfu=0.4),
        _bench_row("e2e_train_step", "sdpa_dense_eager_losses", "train_step", 200.0, suite="e2e",
                   tokens_per_s=80000.0),
    ]
    harness.add_ratios(rows)
    harness.write_csv(rows, tmp_path / plan.BENCH)
    stages.append_rows(tmp_path / plan.CORRECTNESS, correctness.COLUMNS, [
        dict(check="attn_causal", op="attention", dtype="bfloat16", shape="S=8192", quantity="dq", passed=False,
             detail="dq: max error 0.5 > bound 0.01"),
        dict(check="attn_causal", op="attention", dtype="bfloat16", shape="S=8192", quantity="out", passed=True),
        dict(check="attn_d64", op="-", dtype="float16", shape="S=4096", quantity="-", passed="",
             detail="not run: stage budget"),
        stages.parse_pytest_line("tests/tfkernels/test_lm_loss.py::test_bf16_on_gpu[mean] PASSED     [ 50%]"),
    ])
    runner.write_json(tmp_path / plan.ENV, {"device": {"name": "NVIDIA H200"}, "commit": "abc",
                                            "ceilings": {"matmul_tflops": 780.0, "copy_gb_per_s": 4300.0},
                                            "optional_peers": {"liger_kernel": "not installed"}})
    runner.write_json(tmp_path / plan.STAGES_JSON, {
        "plan": [{"stage": "env", "budget_s": 15}, {"stage": "attention", "budget_s": 150}],
        "stages": {"env": {"status": "ok", "elapsed_s": 9.0}, "correctness": {"planned_checks": 16},
                   "attention": {"status": "timed out", "elapsed_s": 150, "detail": "killed"}}})
    text = summary.write(tmp_path)
    assert text == (tmp_path / plan.SUMMARY).read_text()
    assert text.startswith("# GPU check: NVIDIA H200")
    assert "Optional peers: liger_kernel: not installed" in text
    assert "**GPU correctness: FAILED** (1 of 2 quantities pass in 1 of 16 checks, 1 checks not run (budget); " \
           "pytest on the GPU: 1 passed)" in text
    assert "- FAILED attn_causal bfloat16 dq (S=8192): dq: max error 0.5 > bound 0.01" in text
    assert "| W1 fwd+bwd (Hkv 16) vs compiled Flex | 10 ms vs Flex 15 ms: tfkernels 1.50x faster |" in text
    assert "| W1 fwd+bwd (Hkv 4, GQA) vs compiled Flex | not measured |" in text
    assert "| W3 causal fwd vs SDPA flash | 4 ms vs SDPA flash 2 ms: tfkernels 2.00x slower |" in text
    assert "| useful TFLOP/s fwd / bwd, W1_packed_hkv16 | 400 / 350 (matmul ceiling 780) |" in text
    assert "tfkernels 0.1 ms; Flex create_block_mask 2 ms; attention fwd+bwd 10 ms" in text
    assert "2000 GB/s vs device copy 2500 GB/s at this size (1 GiB copy ceiling 4300)" in text
    assert "tfkernels 20 ms, 300 MiB; eager 30 ms, 8000 MiB" in text
    assert "tfkernels 160,000 (MFU 40.0%); sdpa_dense_eager_losses 80,000 (2.00x tfkernels' step time)" in text
    assert "| attention | 150 | 150 | timed out | killed |" in text


def test_correctness_verdict_says_when_checks_are_missing():
    row = dict(check="attn_causal", dtype="bfloat16", quantity="out", shape="s", passed="True", detail="")
    assert summary.correctness_line([row], planned_checks=1)[0].startswith("**GPU correctness: pass** (1 of 1")
    # Cut off at its deadline: the checks it never reached have no row.
    assert summary.correctness_line([row], planned_checks=16)[0].startswith(
        "**GPU correctness: pass so far, incomplete** (1 of 1 quantities pass in 1 of 16 checks)")


def test_summary_of_an_empty_outdir(tmp_path):
    text = summary.markdown(tmp_path)
    assert "**GPU correctness: not run** (no check has run)" in text
    assert "| W1 fwd+bwd (Hkv 16) vs compiled Flex | not measured |" in text


def test_pytest_lines_become_rows():
    row = stages.parse_pytest_line("tests/tfkernels/test_attention.py::test_head_dims_on_gpu[64] FAILED [ 10%]")
    assert (row["check"], row["op"], row["quantity"], row["passed"], row["detail"]) == (
        "pytest", "tests/tfkernels/test_attention.py", "test_head_dims_on_gpu[64]", False, "failed")
    assert stages.parse_pytest_line("tests/x.py::t SKIPPED (needs a CUDA GPU) [100%]")["passed"] == ""
    assert stages.parse_pytest_line("collected 12 items / 3 deselected") is None
    row = stages.parse_pytest_line("tests/a.py::test_bad[q: expected float16, got x] PASSED [ 10%]")
    assert (row["quantity"], row["passed"]) == ("test_bad[q: expected float16, got x]", True)


# ------------------------------------------------------------------------------ the stages
def test_attention_stage_runs_cheap_cases_first_and_no_peer_backward():
    workloads = stages.stage_workloads("attention", quick=False, device=CUDA)
    assert [w.name for w in workloads] == ["W1_packed_hkv16", "W3_causal", "W1_packed_hkv4"]
    w1 = workloads[0]
    names = [(i.name, i.modes) for i in w1.implementations]
    assert names[:3] == [("tfkernels", None), ("tfkernels", ("mask_build",)), ("flex", ("mask_build",))]
    assert [n for n, _ in names[-2:]] == ["flex", "flex_flash"]  # the compiles last
    keep = stages.selected("attention")
    cases = [(i.name, m) for i in w1.implementations for m in (i.modes or w1.modes) if keep(w1, i, m)]
    assert ("tfkernels", "backward") in cases and ("flex", "backward") not in cases
    assert ("flex", "forward_backward") in cases and ("flex", "mask_build") in cases


def test_cost_model_compiles_once_per_shape():
    workloads = {w.name: w for w in stages.stage_workloads("attention", quick=False, device=CUDA)}
    cases = {(w.name, i.name, m): s for w, i, m, s in stages.planned_cases("attention", list(workloads.values()))}
    compile_forward = stages.COMPILE_S["forward"]
    assert cases[("W1_packed_hkv16", "flex", "forward")] == stages.CASE_S + compile_forward
    assert cases[("W1_packed_hkv16", "flex", "forward_backward")] == stages.CASE_S + stages.COMPILE_S["backward"]
    assert cases[("W3_causal", "flex", "forward")] == stages.CASE_S  # same tensor shapes as W1 Hkv 16
    assert cases[("W1_packed_hkv4", "flex", "forward")] == stages.CASE_S + compile_forward  # GQA: new shapes
    assert ("W1_packed_hkv16", "flex_flash", "forward") not in cases or stages.attention_suite.flash_cute_missing() \
        is None


def test_every_workload_is_in_a_stage():
    scheduled = {w.name for name in stages.BENCH_STAGES for w in stages.stage_workloads(name, True, CUDA)}
    assert scheduled == {w.name for build in harness_suites() for w in build(True, CUDA)}


def harness_suites():
    from bench.workloads import SUITES

    return SUITES.values()


def test_correctness_checks_are_written_one_by_one_and_survive_errors(tmp_path):
    path = tmp_path / plan.CORRECTNESS

    def good(device):
        return [correctness._row("good", "op", torch.bfloat16, "s", "out", torch.ones(2), torch.ones(2),
                                 torch.ones(2))]

    def broken(device):
        raise ValueError("kernel said no")

    def lost(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def check(name, run, estimate=1.0):
        return correctness.Check(name, torch.bfloat16, estimate, (name,), run, "s")

    check_list = [check("good", good), check("broken", broken), check("slow", good, estimate=1e6),
                  check("lost", lost), check("after", good)]
    written = []

    def write(rows):
        written.append([r["check"] for r in rows])
        stages.append_rows(path, correctness.COLUMNS, rows)

    result = correctness.run_checks(check_list, "cpu", write, time_left=lambda: 100.0, log=lambda line: None)
    assert written == [["good"], ["broken"], ["slow"], ["lost"], ["after"]]  # a write per check, in order
    rows = summary.read_rows(path)
    assert [(r["check"], r["passed"]) for r in rows] == [("good", "True"), ("broken", "False"), ("slow", ""),
                                                          ("lost", "False"), ("after", "")]
    assert "ValueError: kernel said no" in rows[1]["detail"]
    assert "stage budget" in rows[2]["detail"] and "CUDA context lost" in rows[4]["detail"]
    assert len(result["failed"]) == 2 and len(result["not_run"]) == 2


def test_correctness_plan_covers_the_issue():
    checks = correctness.attention_checks()
    assert {c.dtype for c in checks} == {torch.bfloat16, torch.float16}
    assert {c.dim for c in checks} >= {64, 128, 256, 80}
    assert {c.mask for c in checks} >= {"packed", "causal", "image_decode", "irregular"}
    assert any(c.heads_q != c.heads_kv for c in checks) and any(c.seq_q == 1 for c in checks)
    assert max(c.seq_q for c in checks) == 8192 and min(c.seq_k for c in checks if c.seq_q > 1) >= 4096
    names = [c.name for c in correctness.checks(tiny=False)]
    assert names[:4] == ["attn_packed_gqa", "attn_causal", "attn_decode_1", "attn_image_decode"]
    assert {"diffusion", "linear_cross_entropy"} <= set(names[4:6])


def test_compile_report_arguments_are_the_modules(tmp_path):
    compile_report = pytest.importorskip("bench.compile_report")
    args = compile_report.parse_args(stages.compile_report_args(tmp_path))
    assert args.out == tmp_path / plan.COMPILE_REPORT


def test_csv_rows_round_trip_through_the_stage_writer(tmp_path):
    rows = [_bench_row("W3_causal", "tfkernels", "forward", 4.0), _bench_row("W3_causal", "sdpa_flash", "forward", 2.0)]
    harness.add_ratios(rows)
    stages.write_csv_atomic(rows, tmp_path / plan.BENCH)
    back = harness.read_csv(tmp_path / plan.BENCH)
    assert [r["time_vs_tfkernels"] for r in back] == [1.0, 0.5]
    assert not list(tmp_path.glob("*.tmp"))
    with open(tmp_path / plan.BENCH) as f:
        assert tuple(next(csv.reader(f))) == harness.CSV_COLUMNS


def test_readme_documents_the_stages_and_files():
    text = (ROOT / "bench" / "README.md").read_text()
    section = text.split("\n## One prepared GPU run\n")[1].split("\n## ")[0]
    documented = re.findall(r"^\| (\d) \| `(\w+)` \| (\d+) \|", section, re.M)
    assert documented == [(str(n), s.name, f"{s.budget_s:.0f}") for n, s in enumerate(plan.STAGES, 1)]
    files = re.findall(r"^\| `([\w.]+)` \| ", section.split("What comes back")[1], re.M)
    assert sorted(files) == sorted(plan.OUTPUT_FILES)
    assert "bash scripts/gpu_check.sh --dry-run" in section and "NOTES.md" in section


def test_an_error_in_tfkernels_fails_its_workload_only_and_keeps_its_rows(tmp_path, monkeypatch):
    def call(inputs):
        return inputs.data * 2

    def broken(inputs):
        raise RuntimeError("kernel failed")

    def workload(name, second):
        return harness.Workload(
            suite="attention", name=name, shape="s", dtype=torch.float32,
            setup=lambda device, seed: harness.InputSet(torch.ones(4)),
            implementations=[harness.Implementation("tfkernels", lambda first: call, backend="b"),
                             harness.Implementation("tfkernels_seeded", lambda first: second, backend="b")],
            modes=("forward",), work=lambda mode: harness.Work(), training=False)

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored after the test (the stage sets it to 0 on a CPU)
    monkeypatch.setattr(stages, "stage_workloads", lambda name, quick, device: [workload("bad", broken),
                                                                               workload("good", call)])
    ctx = stages.Context(tmp_path, time.time() + 60, dry_run=True, stage="attention")
    assert stages.run_bench_stage(ctx, "attention") == 1
    rows = harness.read_csv(tmp_path / plan.BENCH)
    assert [(r["workload"], r["implementation"]) for r in rows] == [("bad", "tfkernels"), ("good", "tfkernels"),
                                                                    ("good", "tfkernels_seeded")]
    record = json.loads((tmp_path / plan.STAGES_JSON).read_text())["stages"]["attention"]
    assert record["failures"] == ["bad: RuntimeError: kernel failed"]


# ----------------------------------------------------------------------------------------------
# Carried wheels (scripts/gpu_wheels.sh -> .gpu_wheels -> bench.gpu_check.wheels)
# ----------------------------------------------------------------------------------------------
def test_carried_wheels_are_unpacked_and_appended_after_site_packages(tmp_path, monkeypatch, capsys):
    import zipfile

    from bench.gpu_check import wheels

    carried = tmp_path / "wheels"
    carried.mkdir()
    with zipfile.ZipFile(carried / "tfk_carried_probe-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("tfk_carried_probe/__init__.py", "VALUE = 42\n")
        wheel.writestr("tfk_carried_probe-1.0.dist-info/METADATA", "Name: tfk_carried_probe\nVersion: 1.0\n")
    assert wheels.main([str(carried)]) == 0
    target = capsys.readouterr().out.strip()
    assert target and (Path(target) / "tfk_carried_probe" / "__init__.py").is_file()
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("TFKERNELS_CARRIED_PATH", target)
    assert wheels.append_carried() == target and sys.path[-1] == target  # last: the machine's packages win
    assert wheels.append_carried() == target and sys.path.count(target) == 1
    monkeypatch.delitem(sys.modules, "tfk_carried_probe", raising=False)
    import tfk_carried_probe

    assert tfk_carried_probe.VALUE == 42


def test_no_carried_wheels_prints_nothing(tmp_path, monkeypatch, capsys):
    from bench.gpu_check import wheels

    assert wheels.main([str(tmp_path / "absent")]) == 0
    assert wheels.main([str(tmp_path)]) == 0  # a folder without wheels
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("TFKERNELS_CARRIED_PATH", "")
    assert wheels.append_carried() is None
    assert wheels.main([]) == 2
