"""``pytest bench/ --benchmark-only``: the workloads of ``python -m bench`` through pytest-benchmark.

One test per (workload, implementation, mode), with the same setup, input rotation and warm-up
as the harness. Full-size shapes on CUDA; without CUDA the quick shapes on the CPU (eager
reference paths). pytest-benchmark times wall clock, so each timed call ends with a CUDA
synchronisation. Peers that cannot run here skip with the reason.
"""

import pytest
import torch

from bench.harness import Settings, Skip, prepare_case
from bench.workloads import SUITES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type == "cpu"
SETTINGS = Settings.for_device(DEVICE, QUICK)
WORKLOADS = [w for make in SUITES.values() for w in make(QUICK, DEVICE)]
CASES = [
    pytest.param(w, i, m, id=f"{w.suite}-{w.name}-{i.name}-{m}")
    for w in WORKLOADS for i in w.implementations for m in (i.modes or w.modes)
]
_input_sets = {}  # the current workload's input sets only: the cases run workload by workload


def input_sets(workload):
    if workload.name not in _input_sets:
        _input_sets.clear()
        _input_sets[workload.name] = [workload.setup(DEVICE, seed) for seed in range(SETTINGS.input_sets)]
    return _input_sets[workload.name]


@pytest.mark.parametrize("workload, implementation, mode", CASES)
def test_workload(benchmark, monkeypatch, workload, implementation, mode):
    # On the CPU, time the reference path, not Triton's interpreter (tests/conftest.py sets it).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    try:
        rotate = prepare_case(workload, implementation, mode, input_sets(workload), DEVICE)
    except Skip as skip:
        pytest.skip(str(skip))

    def timed():
        rotate()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{workload.suite} {workload.name} {mode}"
    benchmark.extra_info.update(shape=workload.shape, backend=implementation.backend_on(DEVICE),
                                **{k: v for k, v in workload.work(mode)._asdict().items() if v is not None})
    rounds = SETTINGS.cpu_reps if DEVICE.type == "cpu" else 2 * SETTINGS.min_reps
    benchmark.pedantic(timed, rounds=rounds, iterations=1)
