"""``summary.md``: the headline figures of the run, assembled from whatever is in OUTDIR so far
(env.json, correctness.csv, bench.csv, stages.json), so that it can be rewritten after every stage
and a run cut off at any point still says what it measured. Torch-free.

The figures are the compass's: W1 forward+backward against FlexAttention, W3 against SDPA's flash
kernel, useful TFLOP/s forward and backward, mask build against attention, diffusion GB/s against
a device copy, LM-loss time and peak memory against eager, end-to-end tokens/s against the peers,
and whether the GPU correctness checks passed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from . import plan


def read_rows(path: Path) -> list[dict]:
    """A CSV's rows as dicts of strings (empty list when there is none yet)."""
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _find(rows: list[dict], workload: str, implementation: str, mode: str) -> dict | None:
    for row in rows:
        if (row.get("workload"), row.get("implementation"), row.get("mode")) == (workload, implementation, mode):
            return row
    return None


def _ms(row: dict | None) -> float | None:
    return None if row is None else _number(row.get("median_ms"))


def _vs(ours: dict | None, peer: dict | None, peer_name: str) -> str:
    """``12.3 ms vs Flex 15.6 ms: tfkernels 1.27x faster``; what is missing, said so."""
    if ours is None:
        return "not measured"
    text = f"{_ms(ours):.3g} ms"
    if peer is None:
        return text + f"; {peer_name}: not measured"
    ratio = _ms(peer) / _ms(ours)
    verdict = f"tfkernels {ratio:.2f}x faster" if ratio >= 1 else f"tfkernels {1 / ratio:.2f}x slower"
    return text + f" vs {peer_name} {_ms(peer):.3g} ms: {verdict}"


def _tflops(row: dict | None) -> str:
    value = None if row is None else _number(row.get("tflops"))
    return "-" if value is None else f"{value:.3g}"


def _memory(row: dict) -> str:
    value = _number(row.get("peak_mb"))
    return "" if value is None else f", {value:.0f} MiB"


def headline_rows(bench: list[dict], env: dict) -> list[tuple[str, str]]:
    """(figure, value) pairs of the summary table."""
    lines = []
    for workload, label in (("W1_packed_hkv16", "W1 fwd+bwd (Hkv 16)"), ("W1_packed_hkv4", "W1 fwd+bwd (Hkv 4, GQA)")):
        lines.append((f"{label} vs compiled Flex", _vs(_find(bench, workload, "tfkernels", "forward_backward"),
                                                       _find(bench, workload, "flex", "forward_backward"), "Flex")))
    for mode, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
        lines.append((f"W3 causal {label} vs SDPA flash", _vs(_find(bench, "W3_causal", "tfkernels", mode),
                                                              _find(bench, "W3_causal", "sdpa_flash", mode),
                                                              "SDPA flash")))
    ceiling = _number(env.get("ceilings", {}).get("matmul_tflops"))
    for workload in ("W1_packed_hkv16", "W3_causal", "W2_long_packed"):
        forward, backward = (_find(bench, workload, "tfkernels", m) for m in ("forward", "backward"))
        if forward is None and backward is None:
            continue
        value = f"{_tflops(forward)} / {_tflops(backward)}"
        if ceiling:
            value += f" (matmul ceiling {ceiling:.0f})"
        lines.append((f"useful TFLOP/s fwd / bwd, {workload}", value))
    ours_mask, flex_mask = (_find(bench, "W1_packed_hkv16", i, "mask_build") for i in ("tfkernels", "flex"))
    attention = _find(bench, "W1_packed_hkv16", "tfkernels", "forward_backward")
    if ours_mask or flex_mask:
        parts = [f"tfkernels {_ms(ours_mask):.3g} ms" if ours_mask else "tfkernels: not measured",
                 f"Flex create_block_mask {_ms(flex_mask):.3g} ms" if flex_mask else "Flex: not measured"]
        if attention:
            parts.append(f"attention fwd+bwd {_ms(attention):.3g} ms")
        lines.append(("W1 mask build vs attention", "; ".join(parts)))
    copy_ceiling = _number(env.get("ceilings", {}).get("copy_gb_per_s"))
    diffusion = sorted({r["workload"] for r in bench if r.get("suite") == "diffusion"})
    for workload in diffusion[-1:]:  # the largest (8 channels)
        ours, copy = _find(bench, workload, "tfkernels", "forward_backward"), _find(bench, workload, "device_copy",
                                                                                    "copy")
        if ours is None:
            continue
        value = f"{_number(ours['gb_per_s']):.0f} GB/s"
        if copy is not None:
            value += f" vs device copy {_number(copy['gb_per_s']):.0f} GB/s at this size"
        if copy_ceiling:
            value += f" (1 GiB copy ceiling {copy_ceiling:.0f})"
        lines.append((f"{workload} fwd+bwd", value))
    ours = _find(bench, "lm_loss", "tfkernels", "forward_backward")
    if ours is not None:
        parts = [f"tfkernels {_ms(ours):.3g} ms{_memory(ours)}"]
        for peer in ("eager", "compiled_eager", "torch_linear_cross_entropy", "liger"):
            row = _find(bench, "lm_loss", peer, "forward_backward")
            if row is not None:
                parts.append(f"{peer} {_ms(row):.3g} ms{_memory(row)}")
        lines.append(("LM loss fwd+bwd: time, peak memory", "; ".join(parts)))
    ours = _find(bench, "e2e_train_step", "tfkernels", "train_step")
    if ours is not None:
        mfu = _number(ours.get("mfu"))
        parts = [f"tfkernels {_number(ours['tokens_per_s']):,.0f}" + (f" (MFU {mfu:.1%})" if mfu is not None else "")]
        for peer in ("flex_eager_losses", "sdpa_dense_eager_losses"):
            row = _find(bench, "e2e_train_step", peer, "train_step")
            if row is not None:
                ratio = _ms(row) / _ms(ours)
                parts.append(f"{peer} {_number(row['tokens_per_s']):,.0f} ({ratio:.2f}x tfkernels' step time)")
        lines.append(("e2e tokens/s", "; ".join(parts)))
    return lines


def correctness_line(rows: list[dict], planned_checks: int | None = None) -> tuple[str, list[str]]:
    """The verdict and the failures (``passed`` is True/False; empty for checks not run).
    ``planned_checks``: how many checks the stage meant to run (a stage cut off at its deadline
    leaves no row for the checks it never reached)."""
    checks = [r for r in rows if r.get("check") != "pytest"]
    tests = [r for r in rows if r.get("check") == "pytest"]
    failed = [r for r in rows if r.get("passed") == "False"]
    not_run = [r for r in checks if r.get("passed") == ""]
    passed_checks = sum(r.get("passed") == "True" for r in checks)
    ran = len({(r["check"], r["dtype"]) for r in checks if r.get("passed") != ""})
    text = f"{passed_checks} of {len(checks) - len(not_run)} quantities pass"
    if planned_checks:
        text += f" in {ran} of {planned_checks} checks"
    if not_run:
        text += f", {len(not_run)} checks not run (budget)"
    if tests:
        outcomes = {}
        for row in tests:
            outcomes[row["detail"]] = outcomes.get(row["detail"], 0) + 1
        text += "; pytest on the GPU: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
    if not rows:
        text = "no check has run"
    complete = not not_run and (planned_checks is None or ran >= planned_checks)
    verdict = "FAILED" if failed else ("not run" if not rows else "pass" if complete else "pass so far, incomplete")
    return f"**GPU correctness: {verdict}** ({text})", [
        f"{r['check']} {r['dtype']} {r['quantity']} ({r['shape']}): {r['detail']}" for r in failed]


def markdown(outdir: Path) -> str:
    env = _read_json(outdir / plan.ENV)
    stages = _read_json(outdir / plan.STAGES_JSON)
    bench = read_rows(outdir / plan.BENCH)
    planned = stages.get("stages", {}).get("correctness", {}).get("planned_checks")
    verdict, failures = correctness_line(read_rows(outdir / plan.CORRECTNESS), planned)
    device = env.get("device", {}).get("name") or env.get("device_name") or "unknown device"
    lines = [f"# GPU check: {device}", ""]
    versions = env.get("versions", {})
    facts = [f"commit {env.get('commit', '?')}", f"torch {versions.get('torch', '?')}",
             f"triton {versions.get('triton', '?')}", f"CUDA {versions.get('cuda', '?')}",
             f"driver {env.get('nvidia_smi', {}).get('driver_version', '?')}", env.get("timestamp", "")]
    ceilings = env.get("ceilings", {})
    if ceilings:
        facts.append(f"bf16 matmul {ceilings.get('matmul_tflops', 0):.0f} TFLOP/s, copy "
                     f"{ceilings.get('copy_gb_per_s', 0):.0f} GB/s ({ceilings.get('timer', '')})")
    clock = env.get("nvidia_smi_after_load", {}).get("clocks.sm")
    if clock:
        facts.append(f"SM clock after the matmul {clock}")
    lines += ["; ".join(f for f in facts if f), ""]
    peers = env.get("optional_peers", {})
    if peers:
        lines += ["Optional peers: " + "; ".join(f"{name}: {state}" for name, state in peers.items()), ""]
    lines += [verdict, ""]
    for failure in failures[:20]:
        lines.append(f"- FAILED {failure}")
    if len(failures) > 20:
        lines.append(f"- ... and {len(failures) - 20} more (correctness.csv)")
    lines += ["", "| figure | value |", "| --- | --- |"]
    try:
        figures = headline_rows(bench, env)
    except Exception as error:  # a summary never stops the run; the CSVs hold the figures anyway
        figures = [("(summary failed)", f"{type(error).__name__}: {error}")]
    lines += [f"| {figure} | {value} |" for figure, value in figures]
    lines += ["", "| stage | budget s | took s | status | detail |", "| --- | ---: | ---: | --- | --- |"]
    records = stages.get("stages", {})
    for entry in stages.get("plan", []):
        record = records.get(entry["stage"], {})
        took = record.get("elapsed_s")
        lines.append(f"| {entry['stage']} | {entry['budget_s']:.0f} | {'' if took is None else f'{took:.0f}'} | "
                     f"{record.get('status', 'pending')} | {record.get('detail', '')} |")
    lines += ["", f"{len(bench)} benchmark rows in {plan.BENCH}; files: "
              + ", ".join(sorted(p.name for p in outdir.iterdir() if p.is_file() and not p.name.endswith(".tmp")))]
    return "\n".join(lines) + "\n"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write(outdir: Path) -> str:
    """Rewrite ``summary.md`` from what OUTDIR holds now; returns its text."""
    from .runner import write_atomic

    text = markdown(outdir)
    write_atomic(outdir / plan.SUMMARY, text)
    return text
