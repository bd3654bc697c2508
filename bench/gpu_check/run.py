"""The steps of the GPU run and the processes that run them within the time budget.

Each step is a child process in its own process group, its output appended to ``log.txt``. At its
deadline the group gets SIGINT (pytest then still writes ``tests.xml`` with the tests run so far;
``python -m bench`` has already written every row it measured), and SIGKILL ``GRACE_S`` later: a
hang, a crash or a lost CUDA context costs one step, and the next starts in a fresh process.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV, TESTS, RESULTS, SUMMARY, LOG = "env.json", "tests.xml", "results.csv", "summary.md", "log.txt"
OUTPUTS = (ENV, TESTS, RESULTS, SUMMARY, LOG)
# The suites in the order they run, each with its share of the time left for the suites (time a
# suite leaves unused goes to the ones after it): attention has the most workloads and compiled peers.
SUITE_SHARES = {"attention": 4.0, "lm_loss": 1.0, "diffusion": 0.5, "adaln": 0.5, "e2e": 1.5, "hf": 1.5}
# Packages whose version env.json records: the tests' tools, and the optional peers (their cases
# skip with the reason where they are not installed).
PACKAGES = ("numpy", "pytest", "hypothesis", "transformers", "liger-kernel", "flash-attn")
TESTS_PATH = "tests/tfkernels"  # where the GPU-marked tests are (tests/support.py's gpu_only)
GRACE_S = 15.0  # from SIGINT at a step's deadline to SIGKILL
MIN_STEP_S = 10.0  # a step with less time left than this is not started


@dataclass
class Step:
    """One step's outcome, for the summary."""

    name: str
    budget_s: float
    status: str = "not run"  # ok | failed (exit code N) | stopped at its deadline | not run: why
    seconds: float = 0.0


def log_line(outdir: Path, text: str) -> None:
    """Print ``text`` and append it to the log, which the children's output shares."""
    print(text, flush=True)
    with open(outdir / LOG, "a") as log:
        log.write(text + "\n")


def child_environment() -> dict:
    """This checkout importable, output unbuffered, the kernels compiled (never Triton's interpreter)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(PYTHONUNBUFFERED="1", TRITON_INTERPRET="0")
    return env


def run_until(command: list[str], deadline: float, log_path: Path) -> tuple[int | None, float]:
    """Run ``command`` from the repository root, output appended to ``log_path``, until
    ``deadline`` (``time.monotonic()``). Returns ``(exit code, or None when stopped at the
    deadline; seconds)``. Whatever the command leaves running (compile workers) is killed."""
    start = time.monotonic()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=child_environment(), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            try:
                return process.wait(timeout=max(0.0, deadline - time.monotonic())), time.monotonic() - start
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=GRACE_S)
                return None, time.monotonic() - start
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(dry_run: bool, commit: str | None, budget_s: float) -> dict:
    """What env.json holds: the device, the versions, the commit, the budget."""
    import torch

    from ..harness import Environment

    device = torch.device("cpu" if dry_run else "cuda")
    info = {**Environment.current(device, commit)._asdict(), "python": platform.python_version(),
            "cuda": torch.version.cuda, "platform": platform.platform(), "dry_run": dry_run, "budget_s": budget_s,
            "packages": {name: package_version(name) for name in PACKAGES}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    return info


def run_tests(outdir: Path, step: Step, deadline: float) -> None:
    """The GPU-marked tests, ``pytest -m gpu tests/tfkernels``, with pytest's result file ``tests.xml``;
    a module that cannot be collected is an error there, and the other modules' tests still run."""
    if importlib.util.find_spec("pytest") is None:
        step.status = "not run: pytest is not installed"
        return
    command = [sys.executable, "-m", "pytest", "-m", "gpu", TESTS_PATH, "-v", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={outdir / TESTS}"]
    rc, step.seconds = run_until(command, deadline, outdir / LOG)
    step.status = outcome(rc, ok=(0, 1))  # 1: some tests failed, which tests.xml says


def run_suite(outdir: Path, step: Step, deadline: float, dry_run: bool, commit: str) -> None:
    """``python -m bench --suite NAME``, its rows appended to results.csv as they are measured."""
    command = [sys.executable, "-m", "bench", "--suite", step.name, "--out", str(outdir / RESULTS), "--append",
               "--commit", commit, *(("--quick", "--device", "cpu") if dry_run else ("--device", "cuda"))]
    rc, step.seconds = run_until(command, deadline, outdir / LOG)
    step.status = outcome(rc)


def outcome(rc: int | None, ok=(0,)) -> str:
    if rc is None:
        return "stopped at its deadline"
    return "ok" if rc in ok else f"failed (exit code {rc})"


def run(outdir: Path, budget_s: float, tests_budget_s: float, suites: list[str], dry_run: bool,
        commit: str | None) -> list[Step]:
    """Every step within ``budget_s`` seconds; ``summary.md`` after each. Returns the steps."""
    from . import summary

    start = time.monotonic()
    end = start + budget_s - GRACE_S  # a step stopped at the end still has its grace in the budget
    outdir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a previous run's files (results.csv would be appended to)
        (outdir / name).unlink(missing_ok=True)
    env = environment(dry_run, commit, budget_s)
    (outdir / ENV).write_text(json.dumps(env, indent=1) + "\n")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%SZ")
    log_line(outdir, f"[gpu_check {stamp}] {env['device']}, torch {env['torch']}, triton {env['triton']}, "
                     f"commit {env['commit']}, budget {budget_s:.0f} s{', DRY RUN on the CPU' if dry_run else ''}")
    steps = [Step("tests", tests_budget_s)] + [Step(name, 0.0) for name in suites]
    for number, step in enumerate(steps):
        left = end - time.monotonic()
        if number == 0:
            step.budget_s = min(tests_budget_s, left)
        else:
            step.budget_s = left * SUITE_SHARES[step.name] / sum(SUITE_SHARES[s.name] for s in steps[number:])
        if left < MIN_STEP_S or step.budget_s <= 0:
            step.status = f"not run: {max(left, 0):.0f} s left"
        elif number == 0:
            run_tests(outdir, step, time.monotonic() + step.budget_s)
        else:
            run_suite(outdir, step, time.monotonic() + step.budget_s, dry_run, env["commit"])
        log_line(outdir, f"[gpu_check +{time.monotonic() - start:.0f} s] {step.name}: {step.status} "
                         f"({step.seconds:.0f} of {step.budget_s:.0f} s)")
        summary.write(outdir, steps)
    return steps
