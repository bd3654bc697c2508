"""``python -m bench.plot CSV [--out DIR]``: one PNG chart per workload of a benchmark CSV.

Each chart groups the modes along x with one bar per implementation: the median time, with the
20th-80th percentile range as an error bar. The title names the device, versions and commit; a CSV
from the CPU is titled as CPU figures so that a chart is never mistaken for a GPU result. Needs
matplotlib (``pip install -e ".[bench]"``); renders headless.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .harness import OURS, read_csv


def chart_title(rows: list[dict]) -> str:
    first = rows[0]
    where = first["device"]
    if first["device"] == "cpu":
        where = "CPU figures (wall clock, reference paths; not GPU figures)"
    elif first["quick"]:
        where += " (quick shapes)"
    return (f"{first['suite']} / {first['workload']}: {first['shape']}\n"
            f"{where}, torch {first['torch']}, triton {first['triton']}, commit {first['commit']}")


def plot_workload(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or GPU machines
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    implementations = list(dict.fromkeys(r["implementation"] for r in rows))
    implementations.sort(key=lambda name: name != OURS)  # ours first, the peers in run order
    width = 0.8 / len(implementations)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(modes) * len(implementations) ** 0.5), 4.5))
    for i, implementation in enumerate(implementations):
        by_mode = {r["mode"]: r for r in rows if r["implementation"] == implementation}
        xs = [m + (i - (len(implementations) - 1) / 2) * width for m, mode in enumerate(modes) if mode in by_mode]
        runs = [by_mode[mode] for mode in modes if mode in by_mode]
        medians = [r["median_ms"] for r in runs]
        spread = [[r["median_ms"] - r["p20_ms"] for r in runs], [r["p80_ms"] - r["median_ms"] for r in runs]]
        ax.bar(xs, medians, width, yerr=spread, capsize=2, label=implementation)
    times = [r["median_ms"] for r in rows]
    if max(times) > 20 * min(times):  # peers often differ by orders of magnitude
        ax.set_yscale("log")
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("median time (ms), p20-p80")
    ax.set_title(chart_title(rows), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_csv(csv_path: Path, out_dir: Path | None = None) -> list[Path]:
    """Write ``<csv stem>_<suite>_<workload>.png`` per workload; returns the paths."""
    rows = read_csv(csv_path)
    out_dir = out_dir or csv_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    workloads = dict.fromkeys((r["suite"], r["workload"]) for r in rows)
    paths = []
    for suite, workload in workloads:
        path = out_dir / f"{csv_path.stem}_{suite}_{workload}.png"
        plot_workload([r for r in rows if (r["suite"], r["workload"]) == (suite, workload)], path)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description="PNG charts from a benchmark CSV")
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, help="directory for the PNGs (default: the CSV's)")
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        parser.error(f"{args.csv}: no such file")
    for path in plot_csv(args.csv, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
