"""bench/test_bench_pytest.py: ``pytest bench/ --benchmark-only`` runs the workloads through
pytest-benchmark, one test per case; the expected passes and skips come from the suite."""

import re
import subprocess
import sys

import pytest
import torch

from .support import ROOT, bench_env, cases, suite_workloads


def test_pytest_benchmark_entry_runs_the_workloads():
    pytest.importorskip("pytest_benchmark", reason="the entry needs pytest-benchmark (test extra)")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_bench_pytest.py", "--benchmark-only", "-q",
         "-p", "no:cacheprovider", "-k", "lm_loss", "-rs"],
        cwd=ROOT, env=bench_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    # As the entry runs them: full size on the GPU (compiled peers included), quick shapes on the CPU.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm_loss = cases(suite_workloads(["lm_loss"], quick=device.type == "cpu", device=device), device)
    reasons = [reason for *_, reason in lm_loss if reason is not None]
    summary = f"{len(lm_loss) - len(reasons)} passed" + (f", {len(reasons)} skipped" if reasons else "")
    assert re.search(rf"\b{summary}\b", result.stdout), result.stdout[-3000:]
    for reason in set(reasons):  # -rs: skip reasons
        assert reason in result.stdout
    if device.type == "cpu":
        assert "torch.compile peers run on CUDA only" in result.stdout
