"""The benchmark harness: workloads, implementations, modes, timing, memory and the CSV.

A ``Workload`` is one fixed, seeded problem (shapes, layout, dtype) with a ``setup`` that builds
one input set of fresh random data from a seed, and the ``Implementation``s that solve it: ours
(``tfkernels``) and the peers people use today. The harness runs every implementation in every
mode on the same input sets, in the same process, and writes one CSV row per
(workload, implementation, mode).

Modes:
    forward, backward, forward_backward: an implementation's call returns the output to
        differentiate (or a tuple whose first element is it); ``backward`` times
        ``torch.autograd.grad`` against a forward graph built before the clock starts.
    any other name (``mask_build``, ``train_step``): the implementation's call is timed as is.

Timing: on CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call, warm-up
excluded) with the median and the 20th/80th percentiles; every input set is run once first
(compilation, autotuning) and the calls then cycle through the input sets. On the CPU (the quick
mode that checks the harness) a wall-clock median of a few calls, labelled ``timer=wall_clock``:
those are CPU figures, never GPU ones.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .results_csv import ENVIRONMENT_COLUMNS, read_rows, write_rows

OURS = "tfkernels"
DIFFERENTIABLE_MODES = ("forward", "backward", "forward_backward")
# Useful work of a backward pass relative to its forward (FlashAttention's convention: dQ, dK, dV
# and the recomputed scores); forward+backward is 1 + 2.5.
BACKWARD_WORK = 2.5
MODE_WORK = {"forward": 1.0, "backward": BACKWARD_WORK, "forward_backward": 1.0 + BACKWARD_WORK}

# Attention workloads: visible (q, k) pairs and the pairs computed by tfkernels' tile walk and by a
# FlexAttention block mask (bench.tile_waste); the same in every row of a workload, empty elsewhere.
TILE_WASTE_COLUMNS = ("visible_pairs", "fwd_tile_pairs", "fwd_waste", "bwd_tile_pairs", "bwd_waste",
                      "flex_block_pairs", "flex_waste")
CSV_COLUMNS = (
    "suite", "workload", "shape", "implementation", "backend", "mode", "dtype",
    *ENVIRONMENT_COLUMNS, "timer", "quick",
    "median_ms", "p20_ms", "p80_ms", "peak_mb",
    "tflops", "gb_per_s", "tokens_per_s", "mfu", "time_vs_tfkernels",
    *TILE_WASTE_COLUMNS,
)
NUMERIC_COLUMNS = ("median_ms", "p20_ms", "p80_ms", "peak_mb", "tflops", "gb_per_s", "tokens_per_s", "mfu",
                   "time_vs_tfkernels", *TILE_WASTE_COLUMNS)

# Dense bf16 tensor-core peak (no sparsity) per device, for MFU; matched on the CUDA device name.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


class Work(NamedTuple):
    """What one call in a mode accomplishes; each present field gives a throughput column."""

    flops: float | None = None  # useful floating-point operations -> tflops (and mfu with tokens)
    bytes: float | None = None  # useful bytes moved -> gb_per_s (memory-bound ops)
    tokens: float | None = None  # tokens processed -> tokens_per_s (end to end)


class InputSet(NamedTuple):
    """One set of inputs: ``data`` for the implementations, plus what the backward modes need."""

    data: Any
    leaves: tuple = ()  # tensors whose gradients the backward modes compute
    grad_output: torch.Tensor | None = None  # upstream gradient of the output; None: a scalar loss


@dataclass
class Implementation:
    """One way to run a workload.

    ``prepare(first_input_set)`` builds what the implementation keeps across calls (a dense mask,
    a block mask, a compiled function, a model) and returns ``call(input_set)``. ``modes``
    overrides the workload's; ``unavailable(device, mode)`` says why it cannot run there
    (GPU-only peers, no CPU backward). ``backend`` names what actually runs, e.g. the Triton
    kernels or the eager reference.
    """

    name: str
    prepare: Callable[[InputSet], Callable[[InputSet], Any]]
    backend: str | Callable[[torch.device], str]
    modes: tuple[str, ...] | None = None
    unavailable: Callable[[torch.device, str], str | None] = lambda device, mode: None

    def backend_on(self, device: torch.device) -> str:
        return self.backend(device) if callable(self.backend) else self.backend

    @property
    def ours(self) -> bool:
        """tfkernels itself (``tfkernels``, ``tfkernels_seeded``): its errors are never skipped."""
        return self.name == OURS or self.name.startswith(OURS + "_")


@dataclass
class Workload:
    suite: str
    name: str
    shape: str  # human-readable shapes and dtype
    dtype: torch.dtype
    setup: Callable[[torch.device, int], InputSet]  # one input set from a seed
    implementations: list[Implementation]
    modes: tuple[str, ...]
    work: Callable[[str], Work]  # per mode
    # Forward mode runs with autograd recording (a training forward) unless this is False
    # (inference shapes such as decoding).
    training: bool = True
    # Workload-level figures, computed once when the workload runs: (CSV columns, a line to print),
    # e.g. the attention workloads' tile waste (TILE_WASTE_COLUMNS).
    summary: Callable[[], tuple[dict, str]] | None = None


@dataclass
class Settings:
    device: torch.device
    quick: bool
    input_sets: int = 3  # rotated: each call sees other data than the previous one
    warmup_ms: float = 25.0  # do_bench
    rep_ms: float = 100.0  # do_bench: time budget of the measured calls ...
    min_reps: int = 10  # ... stretched so that slow calls (a training step) still get this many
    cpu_reps: int = 5  # wall-clock calls on the CPU

    @classmethod
    def for_device(cls, device: torch.device, quick: bool) -> Settings:
        return cls(device, quick, input_sets=2 if device.type == "cpu" else 3)


class Environment(NamedTuple):
    """The CSV's environment columns (``results_csv.ENVIRONMENT_COLUMNS``), in that order."""

    device: str
    torch: str
    triton: str
    commit: str
    timestamp: str

    @classmethod
    def current(cls, device: torch.device, commit: str | None = None) -> Environment:
        """This process's device and versions; ``commit`` overrides the checkout's (a copy of
        the tree without git metadata)."""
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = "none"
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(name, torch.__version__, triton_version, commit or git_commit(), stamp)


def git_commit(*paths: str) -> str:
    """Short commit of the checkout, ``+dirty`` when tracked files (under ``paths``, if given) differ from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


class Skip(Exception):
    """An implementation cannot run this case here; the message says why."""


# ----------------------------------------------------------------------------------------------
# One case: (workload, implementation, mode) -> a callable that cycles through the input sets
# ----------------------------------------------------------------------------------------------
def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _gradients(output, inputs: InputSet):
    return torch.autograd.grad(_first(output), inputs.leaves, inputs.grad_output, retain_graph=True)


def case_calls(workload: Workload, implementation: Implementation, mode: str,
               input_sets: Sequence[InputSet]) -> list[Callable[[], Any]]:
    """One zero-argument call per input set that runs ``implementation`` in ``mode``."""
    call = implementation.prepare(input_sets[0])
    if mode not in DIFFERENTIABLE_MODES:
        return [lambda inputs=inputs: call(inputs) for inputs in input_sets]
    if mode == "forward":
        grad_enabled = workload.training

        def forward(inputs):
            with torch.set_grad_enabled(grad_enabled):
                return call(inputs)

        return [lambda inputs=inputs: forward(inputs) for inputs in input_sets]
    if mode == "forward_backward":
        return [lambda inputs=inputs: _gradients(call(inputs), inputs) for inputs in input_sets]
    # backward: the forward graphs are built now, outside the timed region, and kept.
    outputs = [call(inputs) for inputs in input_sets]
    return [lambda out=out, inputs=inputs: _gradients(out, inputs) for out, inputs in zip(outputs, input_sets)]


def rotating(calls: Sequence[Callable[[], Any]]) -> Callable[[], Any]:
    """One call that runs the next input set's call each time."""
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


@contextlib.contextmanager
def peer_errors_as_skips(implementation: Implementation):
    """Out of memory, or a peer without a kernel for this shape or backend (SDPA's "No available
    kernel"), becomes a ``Skip`` with the reason; an error in tfkernels itself propagates."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        raise Skip(f"out of memory ({_first_line(error)})") from None
    except Exception as error:
        if implementation.ours:
            raise
        raise Skip(f"{type(error).__name__}: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else ""


def prepare_case(workload: Workload, implementation: Implementation, mode: str,
                 input_sets: Sequence[InputSet], device: torch.device) -> Callable[[], Any]:
    """The case's rotating call, warmed up once on every input set (compilation, autotuning).

    Raises ``Skip`` when the implementation cannot run the case here.
    """
    reason = implementation.unavailable(device, mode)
    if reason is not None:
        raise Skip(reason)
    with peer_errors_as_skips(implementation):
        calls = case_calls(workload, implementation, mode, input_sets)
        for call in calls:
            call()
    return rotating(calls)


class Timing(NamedTuple):
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mb: float | None
    timer: str


def measure(rotate: Callable[[], Any], settings: Settings) -> Timing:
    """Time a warmed-up rotating call and measure the peak memory of one call."""
    if settings.device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        rotate()
        torch.cuda.synchronize()
        estimate_ms = (time.perf_counter() - start) * 1e3
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
        rep_ms = max(settings.rep_ms, settings.min_reps * estimate_ms)
        median, p20, p80 = triton.testing.do_bench(rotate, warmup=settings.warmup_ms, rep=rep_ms,
                                                   quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80, peak_mb, "do_bench")
    # CPU: there is no allocator peak to read, so peak_mb stays empty.
    samples = []
    for _ in range(settings.cpu_reps):
        start = time.perf_counter()
        rotate()
        samples.append((time.perf_counter() - start) * 1e3)
    p20, _, _, p80 = statistics.quantiles(samples, n=5, method="inclusive")
    return Timing(statistics.median(samples), p20, p80, None, "wall_clock")


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
def throughput(work: Work, median_ms: float, device_name: str) -> dict:
    seconds = median_ms / 1e3
    columns = {"tflops": None, "gb_per_s": None, "tokens_per_s": None, "mfu": None}
    if work.flops is not None:
        columns["tflops"] = work.flops / seconds / 1e12
    if work.bytes is not None:
        columns["gb_per_s"] = work.bytes / seconds / 1e9
    if work.tokens is not None:
        columns["tokens_per_s"] = work.tokens / seconds
        peak = peak_flops(device_name)
        if work.flops is not None and peak is not None:
            columns["mfu"] = work.flops / seconds / peak
    return columns


def write_csv(rows: list[dict], path: Path) -> None:
    """The benchmark rows as ``path``, replacing it."""
    write_rows(path, rows, CSV_COLUMNS)


def read_csv(path: Path) -> list[dict]:
    """Rows with the numeric columns as floats (None where empty) and ``quick`` as a bool."""
    return read_rows(path, numbers=NUMERIC_COLUMNS, flags=("quick",))


# ----------------------------------------------------------------------------------------------
# Running workloads
# ----------------------------------------------------------------------------------------------
def run_workloads(workloads: Sequence[Workload], settings: Settings, env: Environment,
                  log: Callable[[str], None] = print, *,
                  on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every (workload, implementation, mode) and return the rows.

    A peer that cannot run (GPU-only, no kernel for the shape, out of memory) is skipped with the
    reason logged; an error in tfkernels itself is raised, never skipped.

    ``time_vs_tfkernels`` is filled in as each row is made, from tfkernels' row of the same
    workload and mode: every suite lists tfkernels first, so it is there when a peer's row is.
    ``on_row(row)``, called with each row as it is made, lets a caller write rows as they come.
    """
    if settings.device.type == "cuda":
        # Each peer compiles once per shape and grad mode; past dynamo's default limit of 8
        # compiled variants a function silently falls back to eager and would be timed as such.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    cpu_caveat = ", CPU figures: wall clock on the reference paths, not GPU figures"
    log(f"device {env.device}, torch {env.torch}, triton {env.triton}, commit {env.commit}"
        + (cpu_caveat if settings.device.type == "cpu" else ""))
    cases = [(w, i, m) for w in workloads for i in w.implementations for m in (i.modes or w.modes)]
    rows, ours = [], {}  # ours: (suite, workload, mode) -> tfkernels' median
    input_sets, current = None, None
    for number, (workload, implementation, mode) in enumerate(cases, 1):
        label = f"[{number}/{len(cases)}] {workload.suite} {workload.name} {implementation.name} {mode}"
        if workload is not current:
            input_sets, current = None, workload  # free the previous workload's inputs first
            _empty_cache(settings.device)
            input_sets = [workload.setup(settings.device, seed) for seed in range(settings.input_sets)]
            summary_columns = {}
            if workload.summary is not None:
                summary_columns, text = workload.summary()
                log(f"{workload.suite} {workload.name}: {text}")
        try:
            rotate = prepare_case(workload, implementation, mode, input_sets, settings.device)
            with peer_errors_as_skips(implementation):
                timing = measure(rotate, settings)
        except Skip as skip:
            log(f"{label}: skipped, {skip}")
            continue
        finally:
            rotate = None  # the case's state (graphs, masks, models) goes before the next one
            _empty_cache(settings.device)
        work = workload.work(mode)
        row = {
            "suite": workload.suite, "workload": workload.name, "shape": workload.shape,
            "implementation": implementation.name, "backend": implementation.backend_on(settings.device),
            "mode": mode, "dtype": str(workload.dtype).removeprefix("torch."),
            **env._asdict(), "quick": settings.quick, **timing._asdict(),
            **throughput(work, timing.median_ms, env.device),
            **dict.fromkeys(TILE_WASTE_COLUMNS), **summary_columns,
        }
        key = (workload.suite, workload.name, mode)
        if implementation.name == OURS:
            ours[key] = timing.median_ms
        # Above 1: tfkernels is faster. Empty where tfkernels has no row to compare with.
        row["time_vs_tfkernels"] = timing.median_ms / ours[key] if key in ours else None
        rows.append(row)
        peak = f", peak {timing.peak_mb:.4g} MB" if timing.peak_mb is not None else ""
        log(f"{label}: {timing.median_ms:.4g} ms{peak}")
        if on_row is not None:
            on_row(row)
    return rows


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def default_output(device_name: str, quick: bool) -> Path:
    """``bench/results/<device>_<UTC time>.csv``; quick runs go to ``bench/results/quick/``
    (ignored by git: they are harness checks, not results)."""
    slug = "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower() or "device"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    results = Path(__file__).resolve().parent / "results"
    return (results / "quick" if quick else results) / f"{slug}_{stamp}.csv"
