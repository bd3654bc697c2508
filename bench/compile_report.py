"""Static compile report: every Triton kernel of tfkernels compiled for a GPU on a CPU machine.

``python -m bench.compile_report [--kernels ...] [--dtypes ...] [--head-dims ...] [--gqa ...] [--arch 90]
[--out CSV] [--jobs N]`` calls the public ops (``tk.attention`` forward and backward, ``tk.add_noise``,
``tk.diffusion_loss``, ``tk.linear_cross_entropy``) on CPU tensors, records every kernel launch they
make instead of running it, and compiles each launch for the target GPU with Triton's own compiler:
the launch's real arguments bound by Triton's own binder, so the specialisation is exactly the one a
GPU launch gets (pointers and integers divisible by 16, integers equal to 1 folded to constants).
``cuobjdump`` from the Triton wheel then reads the cubin: registers, stack frame (spilled bytes),
local loads/stores, and the SASS instruction counts that say what the kernel really uses (``HGMMA``
= Hopper wgmma, ``HMMA`` = the older mma, ``LDGSTS`` = cp.async, ``UTMALDG``/``UBLKCP`` = TMA).

Sequence lengths, batch and head counts do not change a compiled kernel beyond that specialisation,
so the ops run at one small shape (S = 1024, B = 2, Hq = 8, Hkv = 8 or 2 with GQA); only the
launch settings the launchers pick for a CUDA device (tile sizes, warps, stages) and the dtypes and
head dims matter.

Compiling happens in ``--jobs`` worker processes (spawned, with ``TRITON_INTERPRET=0``, so this
module also works from a process that runs Triton's interpreter); identical launches compile once.
Each run compiles into a fresh Triton cache, so ``compile_s`` is a real compile time (``--cache``
reuses Triton's own cache instead).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .harness import git_commit

OPS = ("attention", "diffusion", "lm_loss", "adaln")
DTYPES = ("bf16", "fp16", "fp32")
# fp32 is opt-in (--dtypes bf16,fp16,fp32): its attention kernels run FMA dots and take 10-130 s each
# to compile (1-5 s for bf16/fp16), measured on a 2-core CPU.
DEFAULT_DTYPES = ("bf16", "fp16")
HEAD_DIMS = (32, 64, 80, 96, 128, 192, 256)
ARCH_NAMES = {80: "sm_80", 90: "sm_90a", 100: "sm_100a"}
# SASS opcodes counted per kernel (by the opcode's first component, e.g. HGMMA.64x128x16.F32.BF16).
SASS_COUNTS = {"hgmma": "HGMMA", "hmma": "HMMA", "ldgsts": "LDGSTS", "utmaldg": "UTMALDG", "ublkcp": "UBLKCP",
               "ldl": "LDL", "stl": "STL"}
CSV_COLUMNS = (
    "kernel", "op", "variant", "arch", "dtype", "head_dim", "gqa", "config",
    "block_m", "block_n", "num_warps", "num_stages",
    "registers", "spill_bytes", "ldl", "stl", "shared_bytes", "instructions",
    "hgmma", "hmma", "utcmma", "ldgsts", "utmaldg", "ublkcp",
    "compile_s", "triton", "commit", "status",
)
# The small shape the ops run at (see the module docstring).
SEQ_LEN, BATCH, HEADS_Q, GQA_GROUP = 1024, 2, 8, 4


# ----------------------------------------------------------------------------------------------
# What to compile
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One call of a public op (forward and backward) whose launches are captured."""

    op: str  # attention | diffusion | lm_loss | adaln
    dtype: str  # bf16 | fp16 | fp32
    head_dim: int | None = None  # attention
    gqa: bool = False  # attention: Hkv = Hq / 4
    variant: str = ""  # diffusion, lm_loss, adaln: which arguments (see VARIANTS)

    def label(self) -> str:
        parts = [self.op, self.dtype]
        if self.head_dim is not None:
            parts.append(f"D={self.head_dim}" + (" gqa" if self.gqa else ""))
        return " ".join(parts + ([self.variant] if self.variant else []))


# diffusion: (add_noise and diffusion_loss arguments); lm_loss: the vocabulary size (50257 is not a
# multiple of 8: the row loads cannot be vectorised); adaln: the channels (PixArt-alpha's 1152, and
# the op's largest) and the form (per-sample modulation; the gated residual add with per-token rows).
VARIANTS = {
    "diffusion": ("noise eps", "seeded packed v"),
    "lm_loss": ("V=65536", "V=50257"),
    "adaln": ("C=1152", "C=1152 residual", "C=8192", "C=8192 residual"),
}


def cases(ops: Iterable[str] = OPS, dtypes: Iterable[str] = DEFAULT_DTYPES, head_dims: Iterable[int] = HEAD_DIMS,
          gqa: Iterable[bool] = (False, True)) -> list[Case]:
    """The sweep: attention per (dtype, head dim, GQA), diffusion and lm_loss per (dtype, variant)."""
    result = []
    for dtype in dtypes:
        for op in ops:
            if op == "attention":
                result += [Case(op, dtype, d, g) for d in head_dims for g in gqa]
            else:
                result += [Case(op, dtype, variant=v) for v in VARIANTS[op]]
    return result


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument as the binder sees it: its dtype and its address (for the alignment)."""

    dtype: str  # torch dtype name, e.g. "bfloat16"
    address: int

    def data_ptr(self) -> int:
        return self.address


@dataclass
class Job:
    """One captured launch to compile: the kernel's module and name, its arguments (tensors as
    ``TensorArg``), the target architecture, and ``key``: launches with equal keys compile alike."""

    case: Case
    kernel: str  # display name: _attn_fwd_kernel -> attn_fwd
    module: str
    name: str
    args: tuple
    kwargs: dict
    arch: int
    key: str = ""
    config: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Capturing launches (runs in a worker process: tfkernels imported with TRITON_INTERPRET=0)
# ----------------------------------------------------------------------------------------------
class AdapterError(RuntimeError):
    """tfkernels or Triton changed under the adapter: the report cannot capture launches faithfully."""


@contextlib.contextmanager
def launches_as_on_gpu(record: Callable):
    """The one place that reaches into tfkernels' and Triton's internals. Inside it:

    1. ``TRITON_INTERPRET=1`` in the environment: tfkernels' public dispatch (read at each call)
       sends CPU tensors to its launchers. The kernels themselves were created with the variable
       unset, so they are ``JITFunction``s, not the interpreter's functions; nothing is interpreted,
       so the dispatch's check of the interpreter's version floor
       (``tfkernels._dispatch._interpreter_checked``) is answered yes.
    2. ``triton.runtime.jit.JITFunction.run`` (what ``kernel[grid](...)`` calls) records
       ``(kernel, args, kwargs)`` through ``record`` and launches nothing.
    3. ``tfkernels.attention._block_sizes(head_dim, dtype, device)``, the attention launchers' choice
       of tile sizes, warps and stages, answers for a CUDA device (on the CPU it gives the
       interpreter's small tiles). Diffusion and LM-loss launch settings do not depend on the device.

    If a name is gone or the launchers stop asking ``_block_sizes``, this raises ``AdapterError``
    saying so, instead of reporting the interpreter's configs.
    """
    import importlib

    import torch
    from triton.runtime.jit import JITFunction

    # The module (tfkernels.attention as an attribute is the function the package exports).
    attention = importlib.import_module("tfkernels.attention")
    dispatch = importlib.import_module("tfkernels._dispatch")

    if not isinstance(getattr(attention, "_attn_fwd_kernel", None), JITFunction):
        raise AdapterError("tfkernels.attention's kernels are not JITFunctions: tfkernels was imported under "
                           "TRITON_INTERPRET=1 (compile in a worker process: see compile_jobs)")
    block_sizes = getattr(attention, "_block_sizes", None)
    if block_sizes is None:
        raise AdapterError("tfkernels.attention._block_sizes is gone: update bench.compile_report."
                           "launches_as_on_gpu to the launchers' new way of choosing tile sizes")
    asked = []

    def block_sizes_on_gpu(head_dim, dtype, device):
        cfg = block_sizes(head_dim, dtype, torch.device("cuda"))
        asked.append(cfg)
        return cfg

    def run(self, *args, grid, warmup, **kwargs):
        record(self, args, kwargs)

    saved_env, saved_run = os.environ.get("TRITON_INTERPRET"), JITFunction.run
    interpreter_checked = dispatch._interpreter_checked
    os.environ["TRITON_INTERPRET"] = "1"
    JITFunction.run = run
    attention._block_sizes = block_sizes_on_gpu
    dispatch._interpreter_checked = lambda: True
    try:
        yield asked
    finally:
        dispatch._interpreter_checked = interpreter_checked
        attention._block_sizes = block_sizes
        JITFunction.run = saved_run
        if saved_env is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _call_attention(case: Case) -> None:
    import torch

    import tfkernels as tk

    dtype, d = _torch_dtype(case.dtype), case.head_dim
    heads_kv = HEADS_Q // GQA_GROUP if case.gqa else HEADS_Q
    # Empty tensors: nothing runs, only shapes, strides, dtypes and addresses matter.
    q = torch.empty(BATCH, SEQ_LEN, HEADS_Q, d, dtype=dtype, requires_grad=True)
    k = torch.empty(BATCH, SEQ_LEN, heads_kv, d, dtype=dtype, requires_grad=True)
    v = torch.empty(BATCH, SEQ_LEN, heads_kv, d, dtype=dtype, requires_grad=True)
    out = tk.attention(q, k, v, tk.IntervalMask.causal(BATCH, SEQ_LEN))
    out.backward(torch.empty_like(out))


def _call_diffusion(case: Case) -> None:
    import torch

    import tfkernels as tk

    dtype = _torch_dtype(case.dtype)
    images, rows, channels = 16, 64, 64
    schedule = tk.NoiseSchedule.cosine(1000)
    t = torch.randint(0, 1000, (images,))
    if case.variant == "noise eps":  # a batch [N, rows, C] with the noise as a tensor
        x0, pred, noise = (torch.randn(images, rows, channels).to(dtype).requires_grad_() for _ in range(3))
        xt = tk.add_noise(x0, t, schedule, noise=noise)
        loss = tk.diffusion_loss(pred, x0, t, schedule, target="eps", noise=noise)
    elif case.variant == "seeded packed v":  # a packed patch buffer [P, C], noise from a seed
        x0, pred = (torch.randn(images * rows, channels).to(dtype).requires_grad_() for _ in range(2))
        offsets = torch.arange(0, images * rows + 1, rows)
        xt = tk.add_noise(x0, t, schedule, seed=123, offsets=offsets)
        loss = tk.diffusion_loss(pred, x0, t, schedule, target="v", seed=123, offsets=offsets)
    else:
        raise ValueError(f"unknown diffusion variant {case.variant!r}")
    (loss + xt.float().sum()).backward()


def _call_lm_loss(case: Case) -> None:
    import torch

    import tfkernels as tk

    dtype = _torch_dtype(case.dtype)
    vocab = int(case.variant.removeprefix("V="))
    rows, hidden_size = 64, 64
    hidden = torch.randn(rows, hidden_size).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_size).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows,))
    tk.linear_cross_entropy(hidden, weight, target).backward()


def _call_adaln(case: Case) -> None:
    import torch

    import tfkernels as tk

    dtype = _torch_dtype(case.dtype)
    channels = int(case.variant.split()[0].removeprefix("C="))
    batch, tokens = 2, 64
    x = torch.randn(batch, tokens, channels).to(dtype).requires_grad_()
    if case.variant.endswith("residual"):  # a DiT block's gated residual add, then the next modulation
        shift, scale, gate = (torch.randn(batch, tokens, channels).to(dtype).requires_grad_() for _ in range(3))
        residual = torch.randn(batch, tokens, channels).to(dtype).requires_grad_()
        y, h = tk.adaln_modulate(x, shift, scale, gate=gate, residual=residual)
        (y.float().sum() + h.float().sum()).backward()
    else:
        shift, scale = (torch.randn(batch, channels).to(dtype).requires_grad_() for _ in range(2))
        tk.adaln_modulate(x, shift, scale).float().sum().backward()


CALLS = {"attention": _call_attention, "diffusion": _call_diffusion, "lm_loss": _call_lm_loss, "adaln": _call_adaln}


def kernel_label(function_name: str) -> str:
    """``_attn_bwd_dq_kernel`` -> ``attn_bwd_dq``."""
    return function_name.strip("_").removesuffix("_kernel")


def _as_arg(value):
    import torch

    if isinstance(value, torch.Tensor):
        return TensorArg(str(value.dtype).removeprefix("torch."), value.data_ptr())
    return value


def capture(case: Case, arch: int) -> list[Job]:
    """The launches one case's op calls make, in order, one ``Job`` per distinct launch."""
    launches = []

    def record(kernel, args, kwargs):
        launches.append((kernel, tuple(map(_as_arg, args)), {k: _as_arg(v) for k, v in kwargs.items()}))

    with launches_as_on_gpu(record) as asked:
        CALLS[case.op](case)
    if not launches:
        raise AdapterError(f"{case.label()}: no kernel launch captured (does the op still launch Triton kernels "
                           f"through kernel[grid](...)?)")
    if case.op == "attention" and not asked:
        raise AdapterError("the attention launchers no longer ask tfkernels.attention._block_sizes for their "
                           "config: update bench.compile_report.launches_as_on_gpu")
    jobs, seen = [], set()
    for kernel, args, kwargs in launches:
        job = Job(case, kernel_label(kernel.fn.__name__), kernel.fn.__module__, kernel.fn.__name__, args, kwargs,
                  arch)
        job.key, job.config = _specialisation(job)
        if job.key not in seen:
            seen.add(job.key)
            jobs.append(job)
    return jobs


def capture_cases(cases: Sequence[Case], arch: int) -> list[Job]:
    return [job for case in cases for job in capture(case, arch)]


# ----------------------------------------------------------------------------------------------
# Compiling one launch (worker process)
# ----------------------------------------------------------------------------------------------
def _kernel(job: Job):
    import importlib

    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(job.module), job.name, None)
    if not isinstance(kernel, JITFunction):
        raise AdapterError(f"{job.module}.{job.name} is not a JITFunction (imported under TRITON_INTERPRET=1?)")
    return kernel


def _bind(job: Job):
    """What ``JITFunction.run`` computes before compiling: Triton's binder on the launch's real
    arguments, for the target ``job.arch``. Returns (kernel, target, signature, constexprs, attrs,
    options)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    kernel = _kernel(job)
    target = GPUTarget("cuda", job.arch, 32)
    backend = make_backend(target)
    kwargs = dict(job.kwargs)
    # As JITFunction.run does, for the knobs this Triton version has.
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*job.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return kernel, target, signature, constexprs, attrs, options


def _specialisation(job: Job) -> tuple[str, dict]:
    """A key equal for launches that compile alike, and the launch config to report."""
    _, _, signature, constexprs, attrs, options = _bind(job)
    names = list(signature)  # constexprs are keyed by argument paths: (index,) for a top-level argument
    constants = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    # Every constexpr but the head dim (a column of its own), then warps and stages.
    config = {k: v for k, v in constants.items() if k not in ("HEAD_DIM", "BLOCK_D")}
    config.update(num_warps=options.num_warps, num_stages=options.num_stages)
    key = repr((job.module, job.name, job.arch, sorted(signature.items()), sorted(constexprs.items(), key=repr),
                sorted(attrs.items(), key=repr), sorted(options.__dict__.items(), key=repr)))
    return key, config


def cuobjdump() -> str:
    """The ``cuobjdump`` shipped in the Triton wheel (else one on PATH)."""
    import shutil

    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if path.exists():
        return str(path)
    found = shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("no cuobjdump: neither in the Triton wheel nor on PATH")
    return found


_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def sass_counts(sass: str) -> dict:
    """Instruction count and the counts of ``SASS_COUNTS`` opcodes, plus ``utcmma`` (Blackwell's
    tcgen05 mma: UTCHMMA, UTCQMMA, ...)."""
    opcodes = [m.group(1) for m in map(_INSTRUCTION.match, sass.splitlines()) if m]
    counts = {column: sum(op == opcode for op in opcodes) for column, opcode in SASS_COUNTS.items()}
    counts["utcmma"] = sum(op.startswith("UTC") and "MMA" in op for op in opcodes)
    counts["instructions"] = len(opcodes)
    return counts


def resource_usage(text: str) -> dict:
    """Registers, stack frame and static shared memory from ``cuobjdump --dump-resource-usage``."""
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", text)
    if match is None:
        raise ValueError(f"no resource usage in cuobjdump's output: {text[:200]!r}")
    registers, stack, shared = map(int, match.groups())
    return {"registers": registers, "spill_bytes": stack, "static_shared": shared}


def compile_job(job: Job, keep: Path | None = None) -> dict:
    """Compile one launch and read its cubin: the metric columns of its rows."""
    import triton
    from triton.compiler import ASTSource

    kernel, target, signature, constexprs, attrs, options = _bind(job)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{job.kernel}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tool = cuobjdump()
        usage = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    if keep is not None:
        stem = keep / _slug(job)
        keep.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".sass").write_text(sass)
        stem.with_suffix(".ttgir").write_text(compiled.asm["ttgir"])
    usage = resource_usage(usage)
    metrics = {"registers": usage["registers"], "spill_bytes": usage["spill_bytes"],
               "shared_bytes": usage["static_shared"] + compiled.metadata.shared, **sass_counts(sass)}
    return {**metrics, "compile_s": round(seconds, 2), "status": "ok"}


def _slug(job: Job) -> str:
    case = job.case
    parts = [job.kernel, ARCH_NAMES.get(job.arch, str(job.arch)), case.dtype]
    if case.head_dim is not None:
        parts.append(f"d{case.head_dim}" + ("_gqa" if case.gqa else ""))
    if case.variant:
        parts.append(re.sub(r"\W+", "_", case.variant))
    return "_".join(parts)


def _compile_or_error(job: Job, keep: Path | None) -> dict:
    try:
        return compile_job(job, keep)
    except Exception as error:  # a kernel that does not compile is a row with the error, not a crash
        message = str(error).strip().splitlines()
        return {"status": f"error: {type(error).__name__}: {message[-1] if message else ''}"[:300]}


# ----------------------------------------------------------------------------------------------
# Driving the workers
# ----------------------------------------------------------------------------------------------
def _worker_init(cache_dir: str | None) -> None:
    # Before tfkernels is imported: real JITFunctions. (A spawned process gets its parent's sys.path.)
    os.environ["TRITON_INTERPRET"] = "0"
    if cache_dir is not None:
        os.environ["TRITON_CACHE_DIR"] = cache_dir


def _versions() -> tuple[str, str, str]:
    import triton

    import tfkernels

    return triton.__version__, str(Path(triton.__file__).parent), str(Path(tfkernels.__file__).parent)


def run(cases: Sequence[Case], archs: Sequence[int] = (90,), jobs: int = 2, cache: bool = False,
        keep: Path | None = None, select: Callable[[Case, str], bool] | None = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """Capture every case's launches and compile them for every arch: one row per (case, kernel,
    arch), in sweep order. ``select(case, kernel_label)`` keeps only the launches it returns True
    for. Work runs in ``jobs`` spawned processes; identical launches compile once."""
    with tempfile.TemporaryDirectory(prefix="compile_report_") as tmp:
        cache_dir = None if cache else tmp
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max(1, jobs), mp_context=context, initializer=_worker_init,
                                                    initargs=(cache_dir,)) as pool:
            triton_version, triton_path, tfkernels_path = pool.submit(_versions).result()
            log(f"triton {triton_version} ({triton_path}), tfkernels {tfkernels_path}, {len(cases)} cases, archs "
                f"{', '.join(ARCH_NAMES.get(a, str(a)) for a in archs)}, {max(1, jobs)} processes")
            # Capturing is cheap (nothing runs): one process per arch, the cases in order.
            captured = [job for future in [pool.submit(capture_cases, list(cases), arch) for arch in archs]
                        for job in future.result()]
            if select is not None:
                captured = [job for job in captured if select(job.case, job.kernel)]
            unique = {}
            for job in captured:
                unique.setdefault(job.key, job)
            log(f"{len(captured)} kernel launches, {len(unique)} distinct compiles")
            futures = {key: pool.submit(_compile_or_error, job, keep) for key, job in unique.items()}
            results = {}
            for future in concurrent.futures.as_completed(futures.values()):
                key = next(k for k, f in futures.items() if f is future)
                results[key] = future.result()
                log(format_row(_row(unique[key], results[key], triton_version, "")))
    head = git_commit("tfkernels")  # the kernels' commit: other files do not change a compile
    return [_row(job, results[job.key], triton_version, head) for job in captured]


def _row(job: Job, metrics: dict, triton_version: str, head: str) -> dict:
    case = job.case
    config = job.config
    config_text = " ".join(f"{k}={v}" for k, v in config.items() if k not in ("num_warps", "num_stages")) + \
        f" w{config.get('num_warps')} s{config.get('num_stages')}"
    row = {column: None for column in CSV_COLUMNS}
    row.update(kernel=job.kernel, op=case.op, variant=case.variant, arch=ARCH_NAMES.get(job.arch, str(job.arch)),
               dtype=case.dtype, head_dim=case.head_dim, gqa=case.gqa if case.op == "attention" else None,
               config=config_text.strip(), block_m=config.get("BLOCK_M"), block_n=config.get("BLOCK_N"),
               num_warps=config.get("num_warps"), num_stages=config.get("num_stages"),
               triton=triton_version, commit=head)
    row.update(metrics)
    return row


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
_TABLE = (("kernel", 18), ("arch", 7), ("dtype", 5), ("head_dim", 4), ("gqa", 4), ("registers", 4),
          ("spill_bytes", 6), ("shared_bytes", 7), ("hgmma", 5), ("hmma", 5), ("ldgsts", 6), ("utmaldg", 4),
          ("compile_s", 6), ("status", 3), ("config", 0))
_HEADERS = {"head_dim": "D", "registers": "REG", "spill_bytes": "SPILL", "shared_bytes": "SHARED", "hgmma": "HGMMA",
            "hmma": "HMMA", "ldgsts": "LDGSTS", "utmaldg": "TMA", "compile_s": "secs"}


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "gqa" if value else "-"
    return str(value)


def format_header() -> str:
    return " ".join(f"{_HEADERS.get(c, c):<{w}}" for c, w in _TABLE).rstrip()


def format_row(row: dict) -> str:
    cells = [f"{_cell(row[c]):<{w}}" for c, w in _TABLE]
    if row.get("variant"):
        cells[-1] = f"[{row['variant']}] {cells[-1]}"
    return " ".join(cells).rstrip()


def write_csv(rows: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in CSV_COLUMNS})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _list(kind: Callable, choices: Sequence | None = None) -> Callable[[str], list]:
    def parse(text: str) -> list:
        values = [kind(part) for part in text.split(",") if part]
        if choices is not None:
            bad = [v for v in values if v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad}: choose from {', '.join(map(str, choices))}")
        return values

    return parse


def _gqa(text: str) -> list[bool]:
    table = {"on": [True], "off": [False], "both": [False, True]}
    if text not in table:
        raise argparse.ArgumentTypeError("choose on, off or both")
    return table[text]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.compile_report",
                                     description="Compile every tfkernels Triton kernel for a GPU on this (CPU) "
                                                 "machine at the launchers' real configs; print and write "
                                                 "registers, spills, shared memory and SASS counts.")
    parser.add_argument("--kernels", type=_list(str), default=list(OPS),
                        help="ops (attention, diffusion, lm_loss, adaln) and/or kernel labels (attn_fwd, "
                             "attn_bwd_delta, attn_bwd_dkdv, attn_bwd_dq, add_noise, mse_fwd, mse_bwd, "
                             "cross_entropy_rows, adaln_fwd, adaln_bwd); "
                             "comma-separated (default: every op)")
    parser.add_argument("--dtypes", type=_list(str, DTYPES), default=list(DEFAULT_DTYPES),
                        help="comma-separated, from bf16,fp16,fp32 (default: bf16,fp16; fp32 attention kernels "
                             "take 10-130 s each to compile)")
    parser.add_argument("--head-dims", type=_list(int), default=list(HEAD_DIMS),
                        help=f"attention head dims (default: {','.join(map(str, HEAD_DIMS))})")
    parser.add_argument("--gqa", type=_gqa, default=[False, True],
                        help="attention with Hkv = Hq/4: on, off or both (default: both)")
    parser.add_argument("--arch", type=_list(int), default=[90],
                        help="compute capabilities, comma-separated: 90 (sm_90a, default), 80, 100 (sm_100a) "
                             "where the installed Triton supports them")
    parser.add_argument("--out", type=Path, help="CSV to write (default: bench/results/compile/<triton>_<arch>.csv)")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes (default: 2)")
    parser.add_argument("--cache", action="store_true",
                        help="reuse Triton's cache (default: a fresh one, so compile_s are real compile times)")
    parser.add_argument("--keep", type=Path, help="also write each kernel's SASS and TTGIR into this folder")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ops = [k for k in args.kernels if k in OPS] or [
        op for op, prefixes in (("attention", ("attn",)), ("diffusion", ("add_noise", "mse")),
                                ("lm_loss", ("cross_entropy",)), ("adaln", ("adaln",)))
        if any(k.startswith(prefixes) for k in args.kernels)]
    selected = cases(ops, args.dtypes, args.head_dims, args.gqa)
    if "fp32" in args.dtypes and "attention" in ops:
        print("fp32 attention: 10-130 s per kernel to compile")
    print(format_header())
    rows = run(selected, args.arch, args.jobs, args.cache, args.keep,
               select=lambda case, kernel: case.op in args.kernels or kernel in args.kernels)
    print("\nin sweep order:\n" + format_header())
    for row in rows:
        print(format_row(row))
    out = args.out or Path(__file__).resolve().parent / "results" / "compile" / (
        f"triton-{rows[0]['triton'] if rows else 'none'}_{'-'.join(ARCH_NAMES.get(a, str(a)) for a in args.arch)}.csv")
    write_csv(rows, out)
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"wrote {len(rows)} rows to {out}" + (f"; {len(failed)} did not compile" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
