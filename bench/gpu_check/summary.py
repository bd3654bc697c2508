"""``summary.md`` of the GPU run, from what OUTDIR holds: the verdict, the GPU tests' outcomes (read
from pytest's ``tests.xml``), each step's time, and tfkernels against the fastest peer in every
workload and mode of ``results.csv``."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

from ..harness import OURS, read_csv
from .run import ENV, RESULTS, SUMMARY, TESTS, TESTS_PATH, Step

OUTCOMES = {"failure": "failed", "error": "error", "skipped": "skipped"}  # junit element -> pytest outcome
THROUGHPUT = (("tflops", "TFLOP/s"), ("gb_per_s", "GB/s"), ("tokens_per_s", "tokens/s"))
LISTED = 20  # failures listed in the summary; tests.xml has them all


def read_junit(path: Path) -> list[tuple[str, str, str]]:
    """``(test, outcome, message)`` per test case of a pytest junit file (none without the file; one
    error for a file that is not complete XML, as from a pytest killed while writing it)."""
    if not path.exists():
        return []
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        return [(path.name, "error", f"not readable: {error}")]
    cases = []
    for case in root.iter("testcase"):
        result = next((child for child in case if child.tag in OUTCOMES), None)
        test = "::".join(part for part in (case.get("classname"), case.get("name")) if part)
        message = "" if result is None else (result.get("message") or "").strip().split("\n", 1)[0]
        cases.append((test, "passed" if result is None else OUTCOMES[result.tag], message))
    return cases


def problems(outdir: Path, steps: list[Step]) -> list[str]:
    """What makes the run fail (empty: it passed, possibly incomplete for time)."""
    found = []
    tests = steps[0]
    cases = read_junit(outdir / TESTS)
    if tests.status.startswith(("failed", "not run")):
        found.append(f"tests: {tests.status}")
    elif not (outdir / TESTS).exists():
        found.append(f"tests: pytest wrote no {TESTS} (see the log)")
    elif not cases:
        found.append("tests: no GPU-marked test was collected")
    found += [f"{outcome} {test}: {message}" for test, outcome, message in cases if outcome in ("failed", "error")]
    found += [f"suite {s.name}: {s.status}" for s in steps[1:] if s.status.startswith("failed")]
    return found


def comparison(rows: list[dict]) -> list[str]:
    """Per workload and mode: tfkernels' time and throughput, the fastest peer and its time over tfkernels'."""
    lines = ["| suite | workload | mode | tfkernels | fastest peer | its time / tfkernels' |",
             "| --- | --- | --- | --- | --- | ---: |"]
    for ours in (r for r in rows if r["implementation"] == OURS):
        key = (ours["suite"], ours["workload"], ours["mode"])
        peers = [r for r in rows if (r["suite"], r["workload"], r["mode"]) == key
                 and not r["implementation"].startswith(OURS) and r["time_vs_tfkernels"] is not None]
        fastest = min(peers, key=lambda r: r["median_ms"], default=None)
        text = f"{ours['median_ms']:.4g} ms" + "".join(
            f", {ours[column]:.4g} {unit}" for column, unit in THROUGHPUT if ours[column] is not None)
        peer = "-" if fastest is None else f"{fastest['implementation']} {fastest['median_ms']:.4g} ms"
        ratio = "" if fastest is None else f"{fastest['time_vs_tfkernels']:.3g}x"
        lines.append(f"| {' | '.join(key)} | {text} | {peer} | {ratio} |")
    return lines


def markdown(outdir: Path, steps: list[Step]) -> str:
    env = json.loads((outdir / ENV).read_text())
    packages = ", ".join(f"{name} {version or 'not installed'}" for name, version in env["packages"].items())
    lines = [f"# GPU run: {env['device']}", "",
             f"commit {env['commit']}; python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
             f"CUDA {env['cuda']}; {env['timestamp']}; budget {env['budget_s']:.0f} s"
             + ("; DRY RUN on the CPU (quick shapes, the GPU tests skip)" if env["dry_run"] else ""), "",
             f"Packages: {packages}.", ""]
    found = problems(outdir, steps)
    incomplete = [s.name for s in steps if s.status.startswith(("stopped", "not run"))]
    verdict = "FAILED" if found else "pass" + (f" (incomplete: {', '.join(incomplete)})" if incomplete else "")
    lines.append(f"**Verdict: {verdict}**")
    lines += [""] * bool(found) + [f"- {problem}" for problem in found[:LISTED]]
    if len(found) > LISTED:
        lines.append(f"- ... and {len(found) - LISTED} more ({TESTS}, log.txt)")
    cases = read_junit(outdir / TESTS)
    counts = Counter(outcome for _, outcome, _ in cases)
    skips = Counter(message for _, outcome, message in cases if outcome == "skipped")
    lines += ["", f"GPU tests (`pytest -m gpu {TESTS_PATH}`, {TESTS}): "
              + (", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "none ran")]
    lines += [f"- skipped {n}x: {reason}" for reason, n in skips.most_common()]
    lines += ["", "| step | budget s | took s | status |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {s.name} | {s.budget_s:.0f} | {s.seconds:.0f} | {s.status} |" for s in steps]
    rows = read_csv(outdir / RESULTS) if (outdir / RESULTS).exists() else []
    lines += ["", f"{len(rows)} rows in {RESULTS}. tfkernels against the fastest peer (above 1x: tfkernels is "
                  "faster):", "", *comparison(rows)]
    return "\n".join(lines) + "\n"


def write(outdir: Path, steps: list[Step]) -> str:
    """Rewrite ``summary.md``; returns its text."""
    text = markdown(outdir, steps)
    (outdir / SUMMARY).write_text(text)
    return text
