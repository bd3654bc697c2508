"""The plan of the one prepared GPU run: its stages in priority order, their time budgets, the
deadlines the runner gives them, and the files the run leaves in OUTDIR.

Budgets roll forward: stage ``i`` must end by ``start + budget_0 + ... + budget_i``, so time a
stage leaves unused goes to the next ones, and a stage that hangs costs only its own budget. When
``--total`` is below the sum of the budgets they are scaled down together.

Torch-free on purpose: the parent process that runs the plan never imports torch (it must not
touch CUDA before its stage processes do, and it should start in milliseconds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TOTAL_S = 540.0  # the whole run: 9 minutes, inside the device tool's 10-minute command limit

# What the run writes into OUTDIR (the device tool returns at most 8 files, each under 16 MiB,
# 64 MiB together, no deeper than OUTDIR/a/b/file, names of letters, digits, '.', '_' and '-').
SUMMARY = "summary.md"  # the summary table, rewritten after every stage
STAGES_JSON = "stages.json"  # the plan, each stage's status, per-case times and skips
LOG = "log.txt"  # every stage process's output
ENV = "env.json"  # stage env: device, driver, versions, clocks, matmul and copy ceilings
CORRECTNESS = "correctness.csv"  # stages correctness and tests_gpu: one row per compared quantity / test
BENCH = "bench.csv"  # the benchmark stages: bench.harness's CSV, one row per (workload, implementation, mode)
COMPILE_REPORT = "compile_report.csv"  # stage compile_report: bench.compile_report's CSV
OUTPUT_FILES = (SUMMARY, STAGES_JSON, LOG, ENV, CORRECTNESS, BENCH, COMPILE_REPORT)
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
MAX_TOTAL_BYTES = 64 * 2**20
MAX_DEPTH = 2  # folders below OUTDIR
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
LOG_CAP_BYTES = 12 * 2**20  # log.txt is cut in the middle past this


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float
    what: str
    writes: tuple[str, ...]


STAGES = (
    Stage("env", 15, "environment: GPU, driver, torch/triton/CUDA versions, SM clock; 1 s bf16 matmul and copy "
                     "ceilings", (ENV,)),
    Stage("correctness", 100, "GPU correctness, bf16 and fp16: attention out/lse/dq/dk/dv vs float64 at S = 4096-8192 "
                             "(packed Transfusion, irregular, causal, GQA, D = 64/128/256/80, decode); diffusion ops; "
                             "linear cross-entropy; anchored tolerances (tfkernels.testing)", (CORRECTNESS,)),
    Stage("attention", 150, "W1 (Hkv 16), W3, W1 (Hkv 4) vs compiled FlexAttention (mask build timed apart) and SDPA "
                            "(flash, cuDNN, dense mask): forward, forward+backward; tfkernels also backward",
          (BENCH,)),
    Stage("attention_more", 75, "W2, W4, W5, the same modes", (BENCH,)),
    Stage("losses", 65, "LM loss (time, peak memory vs eager, compiled eager, torch's F.linear_cross_entropy), "
                        "diffusion (GB/s vs device copy) and adaLN modulation (GB/s vs eager, compiled eager)",
          (BENCH,)),
    Stage("e2e", 95, "end-to-end training step (370M model) vs compiled Flex + eager losses and SDPA dense mask; "
                     "then a 159M transformers Gemma3 step on W1 per attn_implementation (tfkernels, sdpa, "
                     "flash_attention_2, flex_attention) where transformers is installed, and a diffusers PixArt-alpha "
                     "step with the default and the tfkernels processors where diffusers is", (BENCH,)),
    Stage("compile_report", 15, "bench.compile_report (attention, bf16, D = 128) with this machine's Triton and "
                                "ptxas, if the module exists", (COMPILE_REPORT,)),
    Stage("tests_gpu", 25, "tests/tfkernels on the GPU: the GPU-only tests first, then the rest while time is left",
          (CORRECTNESS,)),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def select(names: list[str] | None) -> list[Stage]:
    """The stages named (in plan order), or all."""
    if not names:
        return list(STAGES)
    unknown = sorted(set(names) - set(STAGE_NAMES))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGE_NAMES)}")
    return [s for s in STAGES if s.name in names]


def budgets(stages: list[Stage], total_s: float = TOTAL_S) -> list[float]:
    """Each stage's budget, scaled down together when their sum exceeds ``total_s``."""
    planned = sum(s.budget_s for s in stages)
    scale = min(1.0, total_s / planned) if planned else 1.0
    return [s.budget_s * scale for s in stages]


def deadlines(stages: list[Stage], total_s: float, start: float) -> list[float]:
    """Absolute end of each stage: ``start`` plus the budgets up to and including it (rollover)."""
    ends, elapsed = [], 0.0
    for budget in budgets(stages, total_s):
        elapsed += budget
        ends.append(start + elapsed)
    return ends


def check(stages: list[Stage], total_s: float = TOTAL_S) -> list[str]:
    """What is wrong with the plan on paper (empty: it fits)."""
    problems = []
    planned = sum(s.budget_s for s in stages)
    if planned > TOTAL_S:
        problems.append(f"the stage budgets add up to {planned:g} s, over the run's {TOTAL_S:g} s")
    if total_s > TOTAL_S:
        problems.append(f"--total {total_s:g} s is over the {TOTAL_S:g} s a run may take")
    written = {f for s in stages for f in s.writes} | {SUMMARY, STAGES_JSON, LOG}
    if not written <= set(OUTPUT_FILES):
        problems.append(f"stages write files outside OUTPUT_FILES: {sorted(written - set(OUTPUT_FILES))}")
    if len(OUTPUT_FILES) > MAX_FILES - 1:  # one spare for a file being replaced when the run is cut off
        problems.append(f"{len(OUTPUT_FILES)} output files: at most {MAX_FILES - 1} leave room for a temporary one")
    return problems


def describe(stages: list[Stage], total_s: float = TOTAL_S) -> str:
    """The plan as a text table."""
    lines = [f"{'#':>2} {'stage':<15} {'budget s':>8} {'ends by s':>9}  what"]
    for number, (stage, budget, end) in enumerate(zip(stages, budgets(stages, total_s),
                                                      deadlines(stages, total_s, 0.0)), 1):
        lines.append(f"{number:>2} {stage.name:<15} {budget:>8.0f} {end:>9.0f}  {stage.what}")
    lines.append(f"   {'total':<15} {sum(budgets(stages, total_s)):>8.0f} of {total_s:.0f} s")
    return "\n".join(lines)


def outdir_problems(outdir: Path) -> list[str]:
    """What in ``outdir`` would not come back from the device machine (its limits, above)."""
    problems, files, total = [], 0, 0
    for path in sorted(outdir.rglob("*")):
        relative = path.relative_to(outdir)
        if any(not NAME.match(part) for part in relative.parts):
            problems.append(f"{relative}: name has characters other than letters, digits, '.', '_', '-'")
        if path.is_symlink():
            problems.append(f"{relative}: a link")
        elif path.is_file():
            files += 1
            size = path.stat().st_size
            total += size
            if len(relative.parts) - 1 > MAX_DEPTH:
                problems.append(f"{relative}: more than {MAX_DEPTH} folders down")
            if size > MAX_FILE_BYTES:
                problems.append(f"{relative}: {size} bytes, over {MAX_FILE_BYTES}")
    if files > MAX_FILES:
        problems.append(f"{files} files, over {MAX_FILES}")
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{total} bytes in all, over {MAX_TOTAL_BYTES}")
    return problems
