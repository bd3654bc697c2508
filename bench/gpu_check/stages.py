"""The stages' bodies, each run as ``python -m bench.gpu_check --stage NAME OUTDIR --deadline T``
in its own process (see ``plan`` for the order and budgets, ``runner`` for the processes).

Every stage writes its results as it goes (a row, a check, a test at a time), ends by its deadline
(a case that cannot finish in the time left is not started; the runner kills what overruns), and
records per-case wall times and skips in ``stages.json`` to calibrate the cost model below. In a
dry run (``--dry-run``, on a CPU) the same code runs at the quick/tiny shapes on the CPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import harness
from ..harness import OURS, Environment, Implementation, Settings, Workload
from ..workloads import SUITES
from ..workloads import attention as attention_suite
from ..workloads import hf as hf_suite
from . import correctness, plan
from .runner import ROOT, update_stage_record, write_json


@dataclass
class Context:
    outdir: Path
    deadline: float  # time.time() by which the stage must end
    dry_run: bool = False  # CPU, quick/tiny shapes
    commit: str | None = None
    stage: str = ""
    cases: list = field(default_factory=list)  # [label, seconds, outcome] per case, for stages.json

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry_run else "cuda")

    def time_left(self) -> float:
        return self.deadline - time.time()

    def record(self, **fields) -> None:
        update_stage_record(self.outdir, self.stage, cases=self.cases, **fields)


# ----------------------------------------------------------------------------------------------
# Stage env
# ----------------------------------------------------------------------------------------------
NVIDIA_SMI_FIELDS = ("name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "temperature.gpu",
                     "power.draw", "power.limit", "memory.used", "memory.total")
MATMUL_N = 8192  # bf16 [N, N] x [N, N]: 1.1 TFLOP per call
COPY_BYTES = 2**30  # per tensor: 1 GiB read + 1 GiB written per call


NVIDIA_SMI_MINIMAL = ("name", "driver_version", "clocks.sm", "clocks.max.sm")


def nvidia_smi(fields: tuple[str, ...] = NVIDIA_SMI_FIELDS) -> dict:
    """``nvidia-smi --query-gpu`` for ``fields`` (the first GPU; a driver that rejects one field
    gets the minimal set), or why not. Reads only: the card's settings are left alone."""
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi not found"}
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"error": f"nvidia-smi: {error}"}
    if result.returncode != 0 or not result.stdout.strip():
        if fields != NVIDIA_SMI_MINIMAL:
            return nvidia_smi(NVIDIA_SMI_MINIMAL)
        return {"error": f"nvidia-smi exit {result.returncode}: {(result.stderr or result.stdout).strip()[:300]}"}
    values = [v.strip() for v in result.stdout.splitlines()[0].split(",")]
    return dict(zip(fields, values))


def optional_peers() -> dict:
    """Which optional peers this machine has (the benchmark stages skip the others, with the reason)."""
    flash = attention_suite.flash_cute_missing()
    return {
        "flex_flash (FlexAttention BACKEND=FLASH)": flash or "available",
        "torch F.linear_cross_entropy": "available" if hasattr(torch.nn.functional, "linear_cross_entropy")
        else f"not in torch {torch.__version__}",
        "liger_kernel": "available" if importlib.util.find_spec("liger_kernel") else "not installed",
        "transformers (the hf suite)": "available" if hf_suite.has_transformers() else hf_suite.MISSING_TRANSFORMERS,
        "flash_attn (hf's flash_attention_2)": "available" if importlib.util.find_spec("flash_attn")
        else "not installed",
    }


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
            else None, "numpy": numpy.__version__}


def time_ms(fn: Callable[[], object], device: torch.device, seconds: float) -> float:
    """Median time of ``fn`` in ms: ``do_bench`` (CUDA events) for about ``seconds`` on CUDA, a
    wall-clock median on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=100, rep=seconds * 1e3, return_mode="median")
    samples, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < 3:
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _matmul_ms(n: int, dtype: torch.dtype, device: torch.device, seconds: float) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    return time_ms(lambda: torch.mm(a, b, out=c), device, seconds)


def _copy_ms(nbytes: int, device: torch.device, seconds: float) -> float:
    source = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    destination = torch.empty_like(source)
    return time_ms(lambda: destination.copy_(source), device, seconds)


def ceilings(device: torch.device, seconds: float, tiny: bool) -> dict:
    """The card's bf16 matmul TFLOP/s and copy GB/s, each measured for about ``seconds`` on random
    data (never zeros: they run faster than real data)."""
    n, copy_bytes = (256, 2**22) if tiny else (MATMUL_N, COPY_BYTES)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    matmul_ms = _matmul_ms(n, dtype, device, seconds)
    copy_ms = _copy_ms(copy_bytes, device, seconds)
    return {"matmul_tflops": 2 * n**3 / (matmul_ms / 1e3) / 1e12, "matmul": f"[{n}, {n}] x [{n}, {n}] {dtype}",
            "copy_gb_per_s": 2 * copy_bytes / (copy_ms / 1e3) / 1e9,
            "copy": f"{copy_bytes / 2**30:g} GiB read + written per call",
            "timer": "do_bench median" if device.type == "cuda" else "wall clock median (CPU)"}


def stage_env(ctx: Context) -> int:
    env_path = ctx.outdir / plan.ENV
    info = {"timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": ctx.commit or harness.git_commit(), "dry_run": ctx.dry_run, "versions": versions(),
            "optional_peers": optional_peers(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    info["nvidia_smi"] = nvidia_smi()
    write_json(env_path, info)  # something even if the GPU part below hangs
    device = ctx.device
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
                          "l2_mib": getattr(props, "L2_cache_size", 0) / 2**20}
    else:
        info["device"] = {"name": "cpu (dry run)"}
    write_json(env_path, info)
    info["ceilings"] = ceilings(device, seconds=0.2 if ctx.dry_run else 1.0, tiny=ctx.dry_run)
    info["nvidia_smi_after_load"] = nvidia_smi()  # clocks right after a second of matmuls
    write_json(env_path, info)
    print(json.dumps(info, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------
# Stage correctness
# ----------------------------------------------------------------------------------------------
def append_rows(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    """Append CSV rows (with a header when the file is new), flushed at once."""
    import csv

    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in columns} for row in rows)


def stage_correctness(ctx: Context) -> int:
    check_list = correctness.checks(tiny=ctx.dry_run)
    ctx.record(planned_checks=len(check_list))  # the summary tells a cut-off stage from a complete one
    result = correctness.run_checks(
        check_list, ctx.device, lambda rows: append_rows(ctx.outdir / plan.CORRECTNESS, correctness.COLUMNS, rows),
        ctx.time_left)
    failures = result["failed"]
    if failures:
        print("\n" + "!" * 100 + f"\nGPU CORRECTNESS FAILED: {len(failures)} quantities\n" + "\n".join(failures)
              + "\n" + "!" * 100)
    ctx.record(failures=failures, not_run=result["not_run"],
               detail=f"{len(failures)} quantities FAILED" if failures else
               (f"{len(result['not_run'])} checks not run" if result["not_run"] else ""))
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------
# Benchmark stages
# ----------------------------------------------------------------------------------------------
# Cost model, in seconds on an H100/H200, guessed until a real run's stages.json calibrates it.
STARTUP_S = 8.0  # a fresh stage process: python, torch, the CUDA context
CASE_S = 1.5  # a timed case: input sets, one warm call each, memory, do_bench (>= 125 ms)
TRITON_COMPILE_S = {"attention": 8.0, "hf": 8.0}  # tfkernels' kernels of a suite, forward or backward, first call
TRITON_COMPILE_OTHER_S = 3.0  # the memory-bound kernels (diffusion, LM-loss rows)
COMPILE_S = {"forward": 20.0, "backward": 30.0}  # a torch.compile peer, per shape: forward, then backward graphs
E2E_CASE_S = 15.0  # model build (370M) and ~25 training steps
HF_CASE_S = 6.0  # the hf suite: a 159M transformers model's build and ~15 training steps


@dataclass(frozen=True)
class BenchStage:
    suites: tuple[str, ...]
    workloads: tuple[str, ...] | None  # None: every workload of the suites, in order
    first: tuple[str, ...] = ()  # implementations to run first in each workload (cheap before compiled)
    last: tuple[str, ...] = ()  # implementations to run last (the slow compiles)
    peer_modes: tuple[str, ...] | None = ("forward", "forward_backward", "mask_build", "copy", "train_step")


ATTENTION_FIRST = ("tfkernels", "sdpa_flash", "sdpa_cudnn", "sdpa_dense_mask")
ATTENTION_LAST = ("flex", "flex_flash")
BENCH_STAGES = {
    "attention": BenchStage(("attention",), ("W1_packed_hkv16", "W3_causal", "W1_packed_hkv4"),
                            ATTENTION_FIRST, ATTENTION_LAST),
    "attention_more": BenchStage(("attention",), ("W2_long_packed", "W4_full", "W5_image_vs_cache", "W5_decode"),
                                 ATTENTION_FIRST, ATTENTION_LAST),
    "losses": BenchStage(("lm_loss", "diffusion", "adaln"), None, ("tfkernels", "eager"), ("compiled_eager",)),
    "e2e": BenchStage(("e2e", "hf"), None, ("tfkernels", "sdpa_dense_eager_losses", "sdpa"),
                      ("flex_eager_losses", "flex_attention")),
}


def _ordered(workload: Workload, stage: BenchStage) -> Workload:
    """The workload with its implementations in the stage's order (``first``, the mask builds, the
    others, ``last``): cheap cases before the compiled peers, so a slow compile cut off at the
    deadline loses little."""

    def rank(item):
        position, implementation = item
        if implementation.modes == ("mask_build",):  # cheap, and a headline: right after tfkernels' own
            return (0, 0 if implementation.ours else 1, position)
        if implementation.name in stage.first:
            return (0, stage.first.index(implementation.name), position)
        if implementation.name in stage.last:
            return (2, stage.last.index(implementation.name), position)
        return (1, 0, position)

    ordered = [i for _, i in sorted(enumerate(workload.implementations), key=rank)]
    return dataclasses.replace(workload, implementations=ordered)


def stage_workloads(name: str, quick: bool, device: torch.device) -> list[Workload]:
    """The stage's workloads, in its order, implementations reordered; a workload it names that
    the suites do not define is an error (a rename must not silently drop a headline)."""
    stage = BENCH_STAGES[name]
    workloads = [w for suite in stage.suites for w in SUITES[suite](quick, device)]
    if stage.workloads is not None:
        by_name = {w.name: w for w in workloads}
        missing = [n for n in stage.workloads if n not in by_name]
        if missing:
            raise KeyError(f"stage {name}: no workload {', '.join(missing)} in suites {', '.join(stage.suites)}")
        workloads = [by_name[n] for n in stage.workloads]
    return [_ordered(w, stage) for w in workloads]


DRY_RUN_MODES = ("forward", "mask_build", "copy", "train_step")  # the dry run's cases: enough to pass every path


def selected(name: str, dry_run: bool = False) -> Callable[[Workload, Implementation, str], bool]:
    """Every mode of tfkernels; the peers' modes that the stage times (their backward-only mode,
    a compiled graph's second use, is left out for time). The dry run keeps one mode of each
    (the quick CPU run of ``python -m bench --quick`` covers every case already)."""
    stage = BENCH_STAGES[name]
    if dry_run:  # (FlexAttention runs uncompiled on a CPU, slowly and through none of the GPU's code)
        return lambda workload, implementation, mode: mode in DRY_RUN_MODES and not (
            implementation.name.startswith("flex") and mode == "forward")
    return lambda workload, implementation, mode: implementation.ours or stage.peer_modes is None \
        or mode in stage.peer_modes


def _compile_key(workload: Workload) -> str:
    """Workloads whose compiled peers share graphs: the attention ones with the same tensor shapes."""
    match = re.match(r"(B=\d+ Sq=\d+ Sk=\d+ Hq=\d+ Hkv=\d+ D=\d+)", workload.shape)
    return match.group(1) if match else workload.name


class CostModel:
    """Seconds a case is expected to take, given the cases before it (compiles happen once)."""

    def __init__(self):
        self.compiled: set = set()

    def estimate(self, workload: Workload, implementation: Implementation, mode: str) -> float:
        seconds = {"e2e": E2E_CASE_S, "hf": HF_CASE_S}.get(workload.suite, CASE_S)
        passes = ["forward"] + (["backward"] if mode in ("backward", "forward_backward", "train_step") else [])
        # (tfkernels' backend label would ask CUDA which backend runs: ours never compiles with torch.compile)
        if not implementation.ours and "compile" in implementation.backend_on(torch.device("cuda")):
            for part in passes:
                key = (implementation.name, _compile_key(workload), part)
                if key not in self.compiled:
                    self.compiled.add(key)
                    seconds += COMPILE_S[part]
        elif implementation.ours and mode != "mask_build":
            for part in passes:
                key = (OURS, workload.suite, part)
                if key not in self.compiled:
                    self.compiled.add(key)
                    seconds += TRITON_COMPILE_S.get(workload.suite, TRITON_COMPILE_OTHER_S)
        return seconds


def planned_cases(name: str, workloads: list[Workload]) -> list[tuple[Workload, Implementation, str, float]]:
    """The stage's cases on the GPU with their estimated seconds (skipping what cannot run on CUDA)."""
    keep, model, cases = selected(name), CostModel(), []
    cuda = torch.device("cuda")
    for workload in workloads:
        for implementation in workload.implementations:
            for mode in implementation.modes or workload.modes:
                if keep(workload, implementation, mode) and implementation.unavailable(cuda, mode) is None:
                    cases.append((workload, implementation, mode, model.estimate(workload, implementation, mode)))
    return cases


def run_bench_stage(ctx: Context, name: str) -> int:
    device, quick = ctx.device, ctx.dry_run
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "0"  # time the reference paths, not Triton's interpreter
    workloads = stage_workloads(name, quick, device)
    settings = Settings.for_device(device, quick)
    if ctx.dry_run:
        settings = dataclasses.replace(settings, input_sets=1, cpu_reps=2)
    env = Environment.current(device, ctx.commit)
    path = ctx.outdir / plan.BENCH
    earlier = harness.read_csv(path) if path.exists() else []
    model = CostModel()
    started = {"t": time.monotonic()}

    def gate(workload, implementation, mode):
        started["t"] = time.monotonic()
        if implementation.unavailable(device, mode) is not None:
            return None  # the harness skips it with its own reason
        needed = model.estimate(workload, implementation, mode)
        if ctx.time_left() < needed:
            return f"stage budget: needs ~{needed:.0f} s, {max(ctx.time_left(), 0):.0f} s left"
        return None

    def log(line: str) -> None:
        print(line, flush=True)
        match = re.match(r"\[\d+/\d+\] (.*?): (.*)$", line)
        if match:
            outcome = match.group(2)
            seconds = 0.0 if outcome.startswith("skipped") else time.monotonic() - started["t"]
            ctx.cases.append([match.group(1), round(seconds, 2), outcome])
            ctx.record()

    current: list[dict] = []  # the rows of the workload running now

    def on_row(rows: list[dict]) -> None:
        current[:] = [dict(r) for r in rows]
        everything = earlier + current
        harness.add_ratios(everything)
        write_csv_atomic(everything, path)

    errors = []
    for workload in workloads:  # one workload at a time: an error in one does not lose the others
        if ctx.time_left() <= 0:
            break
        current.clear()
        try:
            harness.run_workloads([workload], settings, env, log=log, select=selected(name, ctx.dry_run), gate=gate,
                                  on_row=on_row)
        except Exception as error:  # the workload's rows so far stay: on_row wrote them, kept below
            message = f"{workload.name}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"ERROR in tfkernels, {message}", flush=True)
            errors.append(message)
            if correctness.cuda_context_lost(error):
                errors.append("CUDA context lost: the stage's remaining workloads not run")
                earlier += current
                break
        earlier += current
    skipped = [c for c in ctx.cases if c[2].startswith("skipped, stage budget")]
    ctx.record(failures=errors, detail="; ".join(errors) if errors else
               (f"{len(skipped)} cases skipped for time" if skipped else ""))
    return 1 if errors else 0


def write_csv_atomic(rows: list[dict], path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    harness.write_csv(rows, temporary)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------
# Stage compile_report
# ----------------------------------------------------------------------------------------------
def compile_report_args(outdir: Path) -> list[str]:
    """The attention kernels at the training shapes' dtype and head dim, with this machine's Triton
    and ptxas (its CSV is written at the end: a cut-off run leaves none)."""
    jobs = max(1, min(4, (os.cpu_count() or 2) - 1))
    return ["--kernels", "attention", "--dtypes", "bf16", "--head-dims", "128", "--gqa", "off",
            "--jobs", str(jobs), "--out", str(outdir / plan.COMPILE_REPORT)]


def stage_compile_report(ctx: Context) -> int:
    if importlib.util.find_spec("bench.compile_report") is None:
        ctx.record(detail="bench/compile_report.py does not exist: skipped")
        print("bench.compile_report: not there, skipped")
        return 0
    module = importlib.import_module("bench.compile_report")
    args = compile_report_args(ctx.outdir)
    module.parse_args(args)  # the arguments this stage passes are still the module's
    if ctx.dry_run:
        ctx.record(detail="dry run: arguments checked, nothing compiled")
        print("bench.compile_report", " ".join(args), ": arguments accepted (dry run: not run)")
        return 0
    return module.main(args)


# ----------------------------------------------------------------------------------------------
# Stage tests_gpu
# ----------------------------------------------------------------------------------------------
GPU_ONLY_TESTS = "on_gpu and not autotuned"  # the GPU-only tests of tests/tfkernels, autotuning left out
OTHER_TESTS = "not on_gpu and not autotuned"
# ``pytest -v``: "tests/x.py::test[id, may have spaces] PASSED  [ 10%]" (or "SKIPPED (reason) [...]").
PYTEST_LINE = re.compile(r"^(tests/\S+?::.+?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)(?= |$)")


def parse_pytest_line(line: str) -> dict | None:
    """A row of correctness.csv from one line of ``pytest -v`` output (None for other lines)."""
    match = PYTEST_LINE.match(line.strip())
    if match is None:
        return None
    node, outcome = match.groups()
    path, _, test = node.partition("::")
    return dict(check="pytest", op=path, dtype="", shape="", quantity=test, max_error="", eager_error="",
                passed={"PASSED": True, "FAILED": False, "ERROR": False, "XPASS": False}.get(outcome, ""),
                detail=outcome.lower(), seconds="")


def run_pytest(ctx: Context, expression: str, paths: list[str]) -> dict:
    """``pytest -v PATHS -k EXPRESSION``, each test's outcome appended to correctness.csv as its
    line appears; stopped at the stage's deadline."""
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *paths, "-k", expression]
    counts = {}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "TRITON_INTERPRET": "0"})
    try:
        for line in process.stdout:
            print(line, end="", flush=True)
            row = parse_pytest_line(line)
            if row is not None:
                append_rows(ctx.outdir / plan.CORRECTNESS, correctness.COLUMNS, [row])
                counts[row["detail"]] = counts.get(row["detail"], 0) + 1
            if ctx.time_left() < 0:
                break
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    return counts


def collect(expression: str) -> int:
    """How many tests ``pytest tests/tfkernels -k EXPRESSION`` selects (collected in this process)."""
    import pytest

    class Count:
        selected = 0

        def pytest_collection_finish(self, session):
            Count.selected = len(session.items)

    pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                 str(ROOT / "tests" / "tfkernels"), "-k", expression], plugins=[Count()])
    return Count.selected


def stage_tests_gpu(ctx: Context) -> int:
    if ctx.dry_run:  # the selections must not be empty (a renamed test would run nothing on the GPU)
        gpu_only, others = collect(GPU_ONLY_TESTS), collect(OTHER_TESTS)
        ctx.record(detail=f"dry run: {gpu_only} GPU-only tests and {others} others selected, not run")
        return 0 if gpu_only and others else 1
    paths = ["tests/tfkernels"]
    counts = run_pytest(ctx, GPU_ONLY_TESTS, paths)
    if ctx.time_left() > 20:
        for outcome, n in run_pytest(ctx, OTHER_TESTS, paths).items():
            counts[outcome] = counts.get(outcome, 0) + n
    failed = counts.get("failed", 0) + counts.get("error", 0)
    ctx.record(counts=counts, detail=", ".join(f"{n} {o}" for o, n in sorted(counts.items())) or "no test ran")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
STAGE_FUNCTIONS: dict[str, Callable[[Context], int]] = {
    "env": stage_env,
    "correctness": stage_correctness,
    "attention": lambda ctx: run_bench_stage(ctx, "attention"),
    "attention_more": lambda ctx: run_bench_stage(ctx, "attention_more"),
    "losses": lambda ctx: run_bench_stage(ctx, "losses"),
    "e2e": lambda ctx: run_bench_stage(ctx, "e2e"),
    "compile_report": stage_compile_report,
    "tests_gpu": stage_tests_gpu,
}


def run_stage(name: str, outdir: Path, deadline: float, dry_run: bool, commit: str | None) -> int:
    """One stage in this process (``--stage``): its exit code (1: failures it reported)."""
    if not dry_run and not torch.cuda.is_available():
        print(f"stage {name}: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    if dry_run:
        torch.set_num_threads(1)  # tiny shapes gain nothing from threads, and lose a lot on a busy CPU
    ctx = Context(outdir, deadline, dry_run, commit, name)
    ctx.record(started=datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%SZ"))
    return STAGE_FUNCTIONS[name](ctx)

