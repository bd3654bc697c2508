"""The quick run (``python -m bench --quick --device cpu``) whose CSV and log several bench test
modules check: run once per session."""

import subprocess
import sys

import pytest

from bench.harness import read_csv

from .support import ROOT, bench_env


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.csv"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                            env=bench_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


@pytest.fixture(scope="session")
def quick_rows(quick_run):
    return read_csv(quick_run[0])
