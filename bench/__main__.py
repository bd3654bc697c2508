"""``python -m bench [--suite attention|diffusion|lm_loss|e2e|adaln|hf|all] [--quick] [--out PATH] [--append]``.

Runs the suites' workloads with every implementation in every mode and writes one CSV row per
(workload, implementation, mode), each as soon as it is measured. Full-size workloads need a CUDA
GPU; ``--quick`` runs small shapes (on the CPU: the eager reference paths, wall-clock timed, as a
check of the harness).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .harness import CSV_COLUMNS, Environment, Settings, default_output, run_workloads
from .results_csv import write_rows
from .workloads import SUITES


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--suite", default="all", choices=(*SUITES, "all"), help="which suite to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes: the CPU check of the harness (figures are CPU figures, labelled so)")
    parser.add_argument("--out", type=Path,
                        help="CSV to write (default: bench/results/<device>_<UTC time>.csv; quick runs in "
                             "bench/results/quick/)")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to an existing CSV of the same columns instead of replacing it")
    parser.add_argument("--commit", help="commit to record when the checkout has no git metadata "
                                          "(default: git rev-parse HEAD, +dirty with local changes)")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="where to run (default: cuda when available, else cpu)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.device.type == "cpu" and not args.quick:
        parser.error("the full-size workloads need a CUDA GPU; use --quick for the CPU check")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        # tfkernels reads the variable at each call: with it, the CPU rows would time Triton's
        # interpreter, which says nothing about the kernels' speed.
        print("TRITON_INTERPRET=1 ignored: on the CPU the benchmarks time the reference paths")
        os.environ["TRITON_INTERPRET"] = "0"
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    workloads = [w for suite in suites for w in SUITES[suite](args.quick, device)]
    env = Environment.current(device, args.commit)
    out = args.out or default_output(env.device, args.quick)
    if not args.append:
        write_rows(out, [], CSV_COLUMNS)  # the header: rows follow as they are measured
    rows = run_workloads(workloads, Settings.for_device(device, args.quick), env,
                         on_row=lambda row: write_rows(out, [row], CSV_COLUMNS, append=True))
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
