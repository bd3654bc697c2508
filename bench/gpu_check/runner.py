"""Running the plan: each stage in its own process with its own deadline, its output appended to
the log, its status recorded in ``stages.json`` and the summary rewritten as soon as it ends.

A stage that hangs or crashes (a CUDA error, a compiler that never returns) is killed at its
deadline with its whole process group; what it wrote before stays, and the next stage starts on
time in a fresh process. Torch-free, like ``plan``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import plan

ROOT = Path(__file__).resolve().parents[2]
MIN_STAGE_S = 3.0  # a stage with less time left than this is not started
KILL_GRACE_S = 3.0  # SIGTERM, then SIGKILL after this


# ----------------------------------------------------------------------------------------------
# Files written while a run may be cut off at any moment
# ----------------------------------------------------------------------------------------------
def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a run killed mid-write leaves the previous version."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


def update_stage_record(outdir: Path, stage: str, **fields) -> None:
    """Merge ``fields`` into ``stages.json``'s record of ``stage`` (one writer at a time: the
    parent between stages, the stage's own process while it runs)."""
    path = outdir / plan.STAGES_JSON
    data = read_json(path)
    data.setdefault("stages", {}).setdefault(stage, {}).update(fields)
    write_json(path, data)


def trim_log(path: Path, cap: int = plan.LOG_CAP_BYTES) -> None:
    """Keep the log under ``cap`` bytes: its first and last parts, with a note in between."""
    if not path.exists() or path.stat().st_size <= cap:
        return
    data = path.read_bytes()
    head, tail = data[: cap // 4], data[-(cap - cap // 4 - 200):]
    note = f"\n\n[... log.txt cut: {len(data) - len(head) - len(tail)} bytes left out ...]\n\n".encode()
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(head + note + tail)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------
# One stage process
# ----------------------------------------------------------------------------------------------
def run_process(command: Sequence[str], timeout_s: float, log_path: Path, env: dict | None = None,
                cwd: Path = ROOT) -> tuple[int | None, bool, float]:
    """Run ``command`` in a new process group, output appended to ``log_path``; past
    ``timeout_s`` the whole group (compile workers too) gets SIGTERM, then SIGKILL.

    Returns ``(exit code or None when killed, timed out, seconds)``.
    """
    start = time.monotonic()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                   start_new_session=True)
        try:
            rc = process.wait(timeout=max(0.0, timeout_s))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # what it left behind (compile workers), if anything
            return rc, False, time.monotonic() - start
        except subprocess.TimeoutExpired:
            _kill_group(process)
            return None, True, time.monotonic() - start
        except BaseException:  # KeyboardInterrupt: leave nothing running behind us
            _kill_group(process)
            raise


def _kill_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_inline(function: Callable[[], int], log_path: Path) -> tuple[int | None, bool, float]:
    """Run ``function`` in this process with its output appended to ``log_path`` (the dry run's
    way: the stages at tiny shapes without a fresh interpreter each). No deadline is enforced.

    Returns ``(exit code, False, seconds)``; an exception is exit code 1, its traceback logged.
    """
    import contextlib
    import traceback

    start = time.monotonic()
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            rc = function()
        except Exception:
            traceback.print_exc()
            rc = 1
    return rc, False, time.monotonic() - start


def stage_env() -> dict:
    """The environment of a stage process: this checkout importable, output unbuffered, the
    kernels compiled (never Triton's interpreter), autotuning off."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    env.update(PYTHONUNBUFFERED="1", TRITON_INTERPRET="0", TFKERNELS_AUTOTUNE="0")
    return env


def stage_command(stage: str, outdir: Path, deadline: float, commit: str | None, dry_run: bool) -> list[str]:
    """``python -m bench.gpu_check --stage NAME ...``: one stage in a fresh interpreter."""
    command = [sys.executable, "-m", "bench.gpu_check", "--stage", stage, str(outdir), "--deadline", f"{deadline:.3f}"]
    if commit:
        command += ["--commit", commit]
    if dry_run:
        command.append("--dry-run")
    return command


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
Launch = Callable[[plan.Stage, float], tuple[int | None, bool, float]]  # (stage, wall-clock deadline) -> result


def run_plan(stages: list[plan.Stage], outdir: Path, total_s: float, launch: Launch,
             after_stage: Callable[[], None] = lambda: None, echo: Callable[[str], None] = print) -> dict:
    """Run ``stages`` in order, each by ``launch(stage, deadline)`` (``deadline``: ``time.time()``
    by which it must end), recording each one's status in ``stages.json`` and calling
    ``after_stage`` (which rewrites the summary) after each. Returns the stage records."""
    outdir.mkdir(parents=True, exist_ok=True)
    wall_start, start = time.time(), time.monotonic()
    ends = plan.deadlines(stages, total_s, 0.0)
    budgets = plan.budgets(stages, total_s)
    data = read_json(outdir / plan.STAGES_JSON)
    data["plan"] = [{"stage": s.name, "budget_s": round(b, 1), "ends_by_s": round(e, 1), "what": s.what}
                    for s, b, e in zip(stages, budgets, ends)]
    data["total_s"] = total_s
    write_json(outdir / plan.STAGES_JSON, data)
    for stage, budget, end in zip(stages, budgets, ends):
        left = end - (time.monotonic() - start)
        if left < MIN_STAGE_S:
            update_stage_record(outdir, stage.name, status="not run", budget_s=round(budget, 1), elapsed_s=0.0,
                                detail=f"no time left ({max(left, 0):.1f} s)")
        else:
            with open(outdir / plan.LOG, "a") as log:
                log.write(f"\n===== stage {stage.name}: budget {budget:.0f} s, {left:.0f} s until its deadline "
                          f"(t = {time.monotonic() - start:.1f} s) =====\n")
            rc, timed_out, elapsed = launch(stage, wall_start + end)
            own = read_json(outdir / plan.STAGES_JSON).get("stages", {}).get(stage.name, {}).get("detail", "")
            if timed_out:
                status, detail = "timed out", f"killed at its deadline after {elapsed:.0f} s, its rows until then kept"
            elif rc == 0:
                status, detail = "ok", ""
            else:
                status, detail = "failed", f"exit code {rc}"
            detail = "; ".join(part for part in (detail, own) if part)
            update_stage_record(outdir, stage.name, status=status, detail=detail, rc=rc, elapsed_s=round(elapsed, 1),
                                budget_s=round(budget, 1))
        try:  # bookkeeping must never stop the run: the stages' own files are what matters
            trim_log(outdir / plan.LOG)
            after_stage()
        except Exception as error:
            echo(f"[gpu_check] after stage {stage.name}: {type(error).__name__}: {error}")
        record = read_json(outdir / plan.STAGES_JSON)["stages"][stage.name]
        note = f"; {record['detail']}" if record.get("detail") else ""
        echo(f"[gpu_check t={time.monotonic() - start:4.0f} s] {stage.name}: {record['status']} "
             f"({record.get('elapsed_s', 0):.0f} of {budget:.0f} s){note}")
    for leftover in outdir.glob("*.tmp"):
        leftover.unlink()
    return read_json(outdir / plan.STAGES_JSON).get("stages", {})
