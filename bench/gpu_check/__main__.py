"""``python -m bench.gpu_check OUTDIR [--dry-run] [--stages a,b] [--total S] [--commit HASH]``
(usually through ``bash scripts/gpu_check.sh OUTDIR``).

Runs the plan's stages in order, each in its own process with its own deadline, and leaves in
OUTDIR what the device tool brings back: summary.md, stages.json, log.txt, env.json,
correctness.csv, bench.csv and compile_report.csv. ``--dry-run`` (a CPU is enough) checks the
imports, every workload at its real shape and the plan on paper, then runs every stage at tiny
shapes on the CPU through the same code, and exits 1 if anything failed.

``--stage NAME OUTDIR --deadline T`` runs one stage in this process (what the runner launches).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import plan, runner, summary, wheels

wheels.append_carried()  # before any stage imports an optional peer (transformers)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", allow_abbrev=False,
                                     description="One prepared GPU run: correctness and every headline figure in "
                                                 "one call of at most 9 minutes (bench/README.md).")
    parser.add_argument("outdir", type=Path, nargs="?", help="where the files go (created; required unless --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on a CPU: check imports, real shapes and the plan, then run every stage at tiny shapes")
    parser.add_argument("--stages", type=lambda text: [s for s in text.split(",") if s],
                        help=f"comma-separated subset, run in plan order (default: {','.join(plan.STAGE_NAMES)})")
    parser.add_argument("--total", type=float, default=plan.TOTAL_S,
                        help=f"seconds for the whole run (default {plan.TOTAL_S:g}; less scales every budget down)")
    parser.add_argument("--commit", help="commit to record (the tree sent to a GPU machine has no .git)")
    parser.add_argument("--stage", choices=plan.STAGE_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.outdir is None and not args.dry_run:
        parser.error("OUTDIR is required (only a --dry-run may leave it out)")
    if args.stage and (args.outdir is None or args.deadline is None):
        parser.error("--stage needs OUTDIR and --deadline")
    try:
        args.stage_list = plan.select(args.stages)
    except ValueError as error:
        parser.error(str(error))
    return args


def clear_outputs(outdir: Path) -> None:
    """Remove this tool's files from an earlier run in ``outdir`` (nothing else)."""
    for name in plan.OUTPUT_FILES:
        (outdir / name).unlink(missing_ok=True)
    for leftover in outdir.glob("*.tmp"):
        leftover.unlink()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage:
        from .stages import run_stage

        return run_stage(args.stage, args.outdir.resolve(), args.deadline, args.dry_run, args.commit)
    if args.outdir is None:
        import tempfile

        args.outdir = Path(tempfile.mkdtemp(prefix="gpu_check_dry_"))
    outdir = args.outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    clear_outputs(outdir)
    print(("DRY RUN (CPU, tiny shapes): " if args.dry_run else "") + f"GPU check into {outdir}\n")
    print(plan.describe(args.stage_list, args.total) + "\n", flush=True)
    problems = plan.check(args.stage_list, args.total)
    if args.dry_run:
        import torch

        from . import dry_run

        torch.set_num_threads(1)  # the dry run's shapes are tiny; threads only contend on a busy CPU
        started = time.monotonic()
        lines, problems = dry_run.check_everything(args.stage_list, args.total)
        print("\n".join(lines))
        print(f"(real shapes and plan checked in {time.monotonic() - started:.1f} s)\n", flush=True)
    if problems:
        print("THE PLAN DOES NOT HOLD:\n" + "\n".join(f"- {p}" for p in problems))
        if args.dry_run:
            return 1
        print("(running it anyway: a GPU's minutes are too rare to spend on nothing)\n", flush=True)
    env = runner.stage_env()

    def launch(stage: plan.Stage, deadline: float):
        if args.dry_run and stage.name != plan.STAGES[0].name:
            # The dry run runs the first stage as the real run does (a fresh interpreter, python -m
            # bench.gpu_check --stage ...) and the others in this process: the same stage code at
            # tiny shapes, without paying for an interpreter and torch import per stage.
            from .stages import run_stage

            os.environ.update(TRITON_INTERPRET="0", TFKERNELS_AUTOTUNE="0")
            return runner.run_inline(lambda: run_stage(stage.name, outdir, deadline, True, args.commit),
                                     outdir / plan.LOG)
        command = runner.stage_command(stage.name, outdir, deadline, args.commit, args.dry_run)
        return runner.run_process(command, deadline - time.time(), outdir / plan.LOG, env=env)

    records = runner.run_plan(args.stage_list, outdir, args.total, launch, after_stage=lambda: summary.write(outdir))
    try:
        print("\n" + summary.write(outdir))
    except Exception as error:  # the files are there whatever happens to the summary
        print(f"summary.md failed: {type(error).__name__}: {error}")
    limits = plan.outdir_problems(outdir)
    for problem in limits:
        print(f"WARNING: would not come back from the device machine: {problem}")
    failed = [name for name, r in records.items() if r.get("status") != "ok"]
    if args.dry_run:
        missing = [f"{s.name}: {f}" for s in args.stage_list for f in s.writes
                   if records.get(s.name, {}).get("status") == "ok" and not (outdir / f).exists()
                   and s.name != "compile_report"]
        for name in missing:
            print(f"DRY RUN: stage {name} was not written")
        ok = not failed and not missing and not limits
        print(f"DRY RUN {'OK' if ok else 'FAILED'}: {len(records)} stages" + (f"; not ok: {', '.join(failed)}"
                                                                                 if failed else ""))
        return 0 if ok else 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
