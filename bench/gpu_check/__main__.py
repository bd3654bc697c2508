"""``python -m bench.gpu_check OUTDIR [--budget-s S] [--tests-budget-s S] [--suites a,b] [--commit HASH]``
and ``python -m bench.gpu_check --dry-run [OUTDIR]`` (the same steps on a CPU). Exit code 1 when a
test or a suite failed (summary.md says which), 0 otherwise, also when time ran out."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from . import run, summary


def suite_list(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in run.SUITE_SHARES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected suites from {','.join(run.SUITE_SHARES)}, got {text!r}")
    return [name for name in run.SUITE_SHARES if name in names]  # in the run's order


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", allow_abbrev=False,
                                     description="Validate and benchmark tfkernels on a GPU within a time budget.")
    parser.add_argument("outdir", type=Path, nargs="?", help="where the files go (required unless --dry-run)")
    parser.add_argument("--budget-s", type=float, default=600.0, help="seconds for the whole run (default 600)")
    parser.add_argument("--tests-budget-s", type=float,
                        help="at most this much of it for the GPU tests (default: half the budget)")
    parser.add_argument("--suites", type=suite_list, default=list(run.SUITE_SHARES),
                        help=f"comma-separated (default, and the order they run in: {','.join(run.SUITE_SHARES)})")
    parser.add_argument("--commit", help="the commit to record where the checkout has no git metadata")
    parser.add_argument("--dry-run", action="store_true",
                        help="on a CPU: the same steps, the GPU tests skipping and the suites at --quick shapes")
    args = parser.parse_args(argv)
    if args.outdir is None and not args.dry_run:
        parser.error("OUTDIR is required (only a --dry-run may leave it out)")
    least = 2 * run.MIN_STEP_S + run.GRACE_S  # time for the tests and one suite
    if args.budget_s < least:
        parser.error(f"--budget-s: expected at least {least:g} seconds, got {args.budget_s:g}")
    if args.tests_budget_s is None:
        args.tests_budget_s = args.budget_s / 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here: --dry-run runs the same steps on the CPU", file=sys.stderr)
            return 2
    outdir = (args.outdir or Path(tempfile.mkdtemp(prefix="gpu_check_"))).resolve()
    steps = run.run(outdir, args.budget_s, args.tests_budget_s, args.suites, args.dry_run, args.commit)
    print("\n" + (outdir / run.SUMMARY).read_text())
    return 1 if summary.problems(outdir, steps) else 0


if __name__ == "__main__":
    sys.exit(main())
