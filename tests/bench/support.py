"""What the bench test modules share: where the repository is, the environment the quick run
needs, and the cases the suites define (derived from ``bench.workloads.SUITES``, so that adding a
peer or a workload needs no test change)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.workloads import SUITES

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
MODES = {"forward", "backward", "forward_backward"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Implementations whose output differs from tfkernels' by design, with why.
DIFFERENT_BY_DESIGN = {"tfkernels_seeded": "draws its own noise from the seed"}


def bench_env():
    # The CPU quick mode times the reference paths; Triton's interpreter would only make it slow.
    return {**os.environ, "TRITON_INTERPRET": "0"}


def suite_workloads(suites=None, quick=True, device=CPU):
    """The workloads of ``suites`` (default: all), in run order."""
    return [w for suite in (suites or SUITES) for w in SUITES[suite](quick, device)]


def cases(workloads, device=CPU):
    """``(workload, implementation, mode, reason)`` for every case the harness runs, in its
    order; ``reason`` says why the implementation cannot run on ``device`` (None: it runs)."""
    return [(w, i, m, i.unavailable(device, m)) for w in workloads for i in w.implementations
            for m in (i.modes or w.modes)]


def key(workload, implementation, mode):
    """A case as the CSV names it."""
    return workload.suite, workload.name, implementation.name, mode


def row_key(row):
    return row["suite"], row["workload"], row["implementation"], row["mode"]


def work(row, throughput, unit):
    """What one call did, back from a throughput column: throughput x seconds."""
    return row[throughput] * unit * row["median_ms"] / 1e3


def assert_peers_agree(suite):
    """Same inputs, same result: otherwise a time ratio compares different work.

    Every implementation that runs a workload's first mode on the CPU (forward, or e2e's
    train_step, whose first call returns the loss) is compared with tfkernels, except those in
    ``DIFFERENT_BY_DESIGN``; each workload must compare at least one peer.
    """
    compared = 0
    for workload in SUITES[suite](True, CPU):
        inputs = workload.setup(CPU, 0)
        mode = workload.modes[0]
        in_mode = [i for i in workload.implementations if mode in (i.modes or workload.modes)]
        runnable = [i for i in in_mode if i.unavailable(CPU, mode) is None and i.name not in DIFFERENT_BY_DESIGN]
        results = {}
        for implementation in runnable:
            with torch.set_grad_enabled(workload.training):
                output = implementation.prepare(inputs)(inputs)
            results[implementation.name] = (output[0] if isinstance(output, tuple) else output).detach()
        assert "tfkernels" in results, f"{workload.name}: tfkernels did not run {mode}"
        for name, result in results.items():
            torch.testing.assert_close(result, results["tfkernels"], rtol=1e-4, atol=1e-4,
                                       msg=lambda m, name=name, w=workload.name: f"{w} {name}: {m}")
        peers = [i.name for i in runnable if not i.ours]
        assert peers, f"{workload.name}: no peer runs {mode} on the CPU to compare with"
        compared += len(peers)
    # Every peer that runs on the CPU in a workload's first mode was compared, none left out.
    expected = sum(1 for w in SUITES[suite](True, CPU) for i in w.implementations
                   if not i.ours and w.modes[0] in (i.modes or w.modes) and i.unavailable(CPU, w.modes[0]) is None)
    assert compared == expected


SKIPS_WITHOUT = """
import sys
sys.modules[{package!r}] = None
import torch
from bench import harness
from bench.workloads import {suite}
cpu = torch.device("cpu")
for quick in (True, False):
    for workload in {suite}.workloads(quick, cpu):
        assert workload.work("train_step").flops > 0, workload.shape
settings = harness.Settings(cpu, quick=True, input_sets=1, cpu_reps=1)
env = harness.Environment("cpu", "t", "t", "t", "t")
rows = harness.run_workloads({suite}.workloads(True, cpu), settings, env)
assert rows == [] and sys.modules[{package!r}] is None
"""


def skips_without(package: str, suite: str) -> list[str]:
    """With ``package`` blocked from importing, the workloads of ``bench.workloads.<suite>`` still build at
    both sizes and the harness runs none: the skip lines it logs (a fresh process)."""
    result = subprocess.run([sys.executable, "-c", SKIPS_WITHOUT.format(package=package, suite=suite)], cwd=ROOT,
                            env=bench_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if ": skipped, " in line]
