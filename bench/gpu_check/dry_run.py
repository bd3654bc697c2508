"""What ``--dry-run`` checks on a CPU before the stages run at tiny shapes: that everything the GPU
run imports is there, that every workload builds at its real shape and every one is in a stage,
that the correctness checks build their real-size masks and fit in GPU memory, and that the plan
fits its budgets on paper (the cost model in ``stages``; hard limits: the budgets' sum, and our own
cases in each stage)."""

from __future__ import annotations

import importlib

import torch

from ..workloads import SUITES
from . import correctness, plan, stages

MODULES = ("torch", "triton", "numpy", "pytest", "tfkernels", "tfkernels.testing", "tfkernels.reference",
           "transfusion_core", "bench.harness", "bench.workloads.attention", "bench.workloads.diffusion",
           "bench.workloads.lm_loss", "bench.workloads.e2e", "torch.nn.attention.flex_attention")
GPU_MEMORY_BYTES = 80 * 2**30  # an H100's; the H200 has 141 GB


def imports() -> tuple[list[str], list[str]]:
    lines, problems = [], []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
            lines.append(f"  import {name}: {getattr(module, '__version__', 'ok')}")
        except Exception as error:  # what the GPU image lacks must be known before the run
            problems.append(f"import {name}: {type(error).__name__}: {error}")
    for peer, state in stages.optional_peers().items():
        lines.append(f"  optional peer {peer}: {state}")
    return lines, problems


def benchmark_plan(budget_of: dict[str, float]) -> tuple[list[str], list[str]]:
    """Every workload at its real shape, the cases each stage runs on the GPU and their estimate."""
    lines, problems = [], []
    cuda = torch.device("cuda")  # labels and dtypes only: building a workload touches no GPU
    scheduled = set()
    for name in stages.BENCH_STAGES:
        try:
            workloads = stages.stage_workloads(name, quick=False, device=cuda)
        except KeyError as error:
            problems.append(str(error))
            continue
        cases = stages.planned_cases(name, workloads)
        for workload in workloads:
            scheduled.add((workload.suite, workload.name))
            for mode in workload.modes:
                workload.work(mode)  # FLOP / byte counts at the real shape
            lines.append(f"  {name}: {workload.name}: {workload.shape}")
        ours = stages.STARTUP_S + sum(s for w, i, m, s in cases if i.ours)
        everything = stages.STARTUP_S + sum(s for *_, s in cases)
        budget = budget_of.get(name)
        lines.append(f"  {name}: {len(cases)} cases on the GPU, estimated {everything:.0f} s (tfkernels' own "
                     f"{ours:.0f} s) for a budget of {budget:.0f} s"
                     + ("" if everything <= budget else "; cases that do not fit are skipped at run time"))
        if ours > budget:
            problems.append(f"stage {name}: tfkernels' own cases need ~{ours:.0f} s, over its {budget:.0f} s")
    for suite, build in SUITES.items():
        for workload in build(False, cuda):
            if (suite, workload.name) not in scheduled:
                problems.append(f"workload {suite}/{workload.name} is in no stage of the GPU run")
    return lines, problems


def correctness_plan(budget: float) -> tuple[list[str], list[str]]:
    """The real-size checks: masks built (on the CPU), memory of the float64 reference, estimate."""
    lines, problems = [], []
    for check in correctness.attention_checks():
        mask = check.build_mask("cpu")
        if mask.batch_size != check.batch or mask.seq_len_q > check.seq_q or mask.seq_len_k > check.seq_k:
            problems.append(f"{check.name}: mask {mask.batch_size}x{mask.seq_len_q}x{mask.seq_len_k} does not match")
        memory = correctness.dense_memory_bytes(check)
        if memory > GPU_MEMORY_BYTES:
            problems.append(f"{check.name}: the float64 reference needs ~{memory / 2**30:.0f} GiB")
        lines.append(f"  correctness: {check.name} {str(check.dtype).removeprefix('torch.')} {check.shape()}, "
                     f"{mask.visible_pairs() / 1e6:.1f}M visible pairs, float64 reference ~{memory / 2**30:.1f} GiB")
    estimates = correctness.estimate(correctness.checks(tiny=False))
    total = stages.STARTUP_S + sum(estimates)
    lines.append(f"  correctness: {len(estimates)} checks, estimated {total:.0f} s for a budget of {budget:.0f} s")
    first = stages.STARTUP_S + sum(estimates[:4])
    if first > budget:
        problems.append(f"stage correctness: its first four checks need ~{first:.0f} s, over its {budget:.0f} s")
    return lines, problems


def check_everything(stage_list: list[plan.Stage], total_s: float) -> tuple[list[str], list[str]]:
    """All of the above: (report lines, problems)."""
    budget_of = {s.name: b for s, b in zip(stage_list, plan.budgets(stage_list, total_s))}
    lines, problems = [], list(plan.check(stage_list, total_s))
    for part in (imports, lambda: benchmark_plan(budget_of),
                 lambda: correctness_plan(budget_of.get("correctness", plan.STAGES[1].budget_s))):
        more_lines, more_problems = part()
        lines += more_lines
        problems += more_problems
    return lines, problems
