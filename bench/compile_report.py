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
import math
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

from .harness import Environment, git_commit
from .results_csv import read_rows, write_rows

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
    "loop_instructions", "loop_spills", "mma_redundancy", "ex2_per_score", "instr_per_64x64",
    "compile_s", "status", "device", "torch", "triton", "commit", "timestamp",
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
    variant: str = ""  # diffusion, lm_loss, adaln: which arguments (see VARIANTS); attention: "holes" or ""
    configs: object = None  # attention: a tfkernels.attention.PassConfigs to launch with instead of the defaults

    def label(self) -> str:
        parts = [self.op, self.dtype]
        if self.head_dim is not None:
            parts.append(f"D={self.head_dim}" + (" gqa" if self.gqa else ""))
        return " ".join(parts + ([self.variant] if self.variant else []) + (["candidate"] if self.configs else []))


# diffusion: (add_noise and diffusion_loss arguments); lm_loss: the vocabulary size (50257 is not a
# multiple of 8: the row loads cannot be vectorised); adaln: the channels (PixArt-alpha's 1152, and
# the op's largest) and the form (per-sample modulation; the gated residual add with per-token rows).
VARIANTS = {
    "diffusion": ("noise eps", "seeded packed v"),
    "lm_loss": ("V=65536", "V=50257"),
    "adaln": ("C=1152", "C=1152 residual", "C=8192", "C=8192 residual"),
}


def cases(ops: Iterable[str] = OPS, dtypes: Iterable[str] = DEFAULT_DTYPES, head_dims: Iterable[int] = HEAD_DIMS,
          gqa: Iterable[bool] = (False, True), holes: bool = False) -> list[Case]:
    """The sweep: attention per (dtype, head dim, GQA), and with ``holes`` also under a mask with hidden
    spans (the kernels' HOLES variant); diffusion and lm_loss per (dtype, variant)."""
    result = []
    masks = ("", "holes") if holes else ("",)
    for dtype in dtypes:
        for op in ops:
            if op == "attention":
                result += [Case(op, dtype, d, g, variant=m) for d in head_dims for g in gqa for m in masks]
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
    """The report cannot capture or compile a launch faithfully (e.g. the kernels are the interpreter's)."""


@dataclass(frozen=True)
class KernelRef:
    """A Triton function passed to a kernel as an argument (a constexpr), by module and name: a
    launch's arguments travel to the compiling process, and a JITFunction does not pickle."""

    module: str
    name: str


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _call_attention(case: Case) -> None:
    import random

    import torch

    import tfkernels as tk
    from tfkernels.attention import use_launch_configs
    from tfkernels.testing import packed_transfusion_layout

    dtype, d = _torch_dtype(case.dtype), case.head_dim
    heads_kv = HEADS_Q // GQA_GROUP if case.gqa else HEADS_Q
    # Empty tensors: nothing runs, only shapes, strides, dtypes and addresses matter.
    q = torch.empty(BATCH, SEQ_LEN, HEADS_Q, d, dtype=dtype, requires_grad=True)
    k = torch.empty(BATCH, SEQ_LEN, heads_kv, d, dtype=dtype, requires_grad=True)
    v = torch.empty(BATCH, SEQ_LEN, heads_kv, d, dtype=dtype, requires_grad=True)
    if case.variant == "holes":  # packed rows whose images are each a noisy (hidden) and a clean copy
        images, documents, hidden = packed_transfusion_layout(random.Random(0), BATCH, SEQ_LEN, doc_len=(256, 512),
                                                              caption_len=(16, 64), image_len=64, clean_copies=True)
        mask = tk.IntervalMask.from_spans(SEQ_LEN, images, documents, hidden=hidden)
    elif not case.variant:
        mask = tk.IntervalMask.causal(BATCH, SEQ_LEN)
    else:
        raise ValueError(f"unknown attention variant {case.variant!r}")
    with contextlib.nullcontext() if case.configs is None else use_launch_configs(case.configs):
        out = tk.attention(q, k, v, mask)
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
    """``_attn_bwd_dq_kernel`` -> ``attn_bwd_dq``; ``_attn_bwd_dq_program`` (a program of the attention
    kernel) -> ``attn_bwd_dq``."""
    return function_name.strip("_").removesuffix("_kernel").removesuffix("_program")


def _as_arg(value):
    """A launch argument as it travels to the compiling process."""
    import torch
    from triton.runtime.jit import JITFunction

    if isinstance(value, torch.Tensor):
        return TensorArg(str(value.dtype).removeprefix("torch."), value.data_ptr())
    if isinstance(value, JITFunction):
        return KernelRef(value.fn.__module__, value.fn.__name__)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):  # a tuple argument; a NamedTuple is a constexpr
        return tuple(map(_as_arg, value))
    return value


def _job_label(kernel: str, args: tuple, kwargs: dict) -> str:
    """A kernel's label, or for a kernel that takes its program as an argument (the attention
    kernel), the program's."""
    program = next((a for a in (*args, *kwargs.values()) if isinstance(a, KernelRef)), None)
    return kernel_label(program.name if program is not None else kernel)


def capture(case: Case, arch: int) -> list[Job]:
    """The launches one case's op calls make on ``arch``, in order, one ``Job`` per distinct launch
    (``tfkernels.launch.record_launches``: nothing runs)."""
    from tfkernels.launch import RecordingUnavailableError, record_launches

    try:
        with record_launches(f"sm_{arch}") as launches:
            CALLS[case.op](case)
    except RecordingUnavailableError as error:
        raise AdapterError(f"{error} (compile in a worker process: see compile_jobs)") from error
    if not launches:
        raise AdapterError(f"{case.label()}: the op launched no Triton kernel")
    jobs, seen = [], set()
    for launch in launches:
        args = tuple(map(_as_arg, launch.args))
        kwargs = {k: _as_arg(v) for k, v in launch.kwargs.items()}
        job = Job(case, _job_label(launch.kernel.fn.__name__, args, kwargs), launch.kernel.fn.__module__,
                  launch.kernel.fn.__name__, args, kwargs, arch)
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
def _jit_function(module: str, name: str):
    import importlib

    from triton.runtime.jit import JITFunction

    function = getattr(importlib.import_module(module), name, None)
    if not isinstance(function, JITFunction):
        raise AdapterError(f"{module}.{name} is not a JITFunction (imported under TRITON_INTERPRET=1?)")
    return function


def _resolved(value):
    """A launch argument back as the kernel takes it (``KernelRef`` -> the JITFunction)."""
    if isinstance(value, KernelRef):
        return _jit_function(value.module, value.name)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(map(_resolved, value))
    return value


def _bind(job: Job):
    """What ``JITFunction.run`` computes before compiling: Triton's binder on the launch's real
    arguments, for the target ``job.arch``. Returns (kernel, target, signature, constexprs, attrs,
    options)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    kernel = _jit_function(job.module, job.name)
    target = GPUTarget("cuda", job.arch, 32)
    backend = make_backend(target)
    kwargs = {k: _resolved(v) for k, v in job.kwargs.items()}
    # As JITFunction.run does, for the knobs this Triton version has.
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*map(_resolved, job.args), **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return kernel, target, signature, constexprs, attrs, options


def _specialisation(job: Job) -> tuple[str, dict]:
    """A key equal for launches that compile alike, and the launch config to report."""
    _, _, signature, constexprs, attrs, options = _bind(job)
    names = list(signature)  # constexprs are keyed by argument paths: (index,) for a top-level argument
    constants = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    config = {}
    for name, value in constants.items():
        if hasattr(value, "_fields"):  # a NamedTuple of constexprs (the attention kernel's META): its fields
            config.update(value._asdict())
        elif not hasattr(value, "fn"):  # a Triton function (the attention kernel's PROGRAM) is the label
            config[name] = value
    # Every constexpr (the head dim is a column of its own in the rows), then warps and stages.
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


_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\S*)\s*([^;]*);")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # first component: HGMMA
    modifiers: str  # the rest: .64x128x16.F32.BF16
    operands: str


def parse_sass(sass: str) -> list[Instruction]:
    """The instructions of ``cuobjdump --dump-sass`` output, in address order."""
    return [Instruction(int(m.group(1), 16), m.group(2), m.group(3), m.group(4).strip())
            for m in map(_INSTRUCTION.match, sass.splitlines()) if m]


def sass_counts(sass: str) -> dict:
    """Instruction count and the counts of ``SASS_COUNTS`` opcodes, plus ``utcmma`` (Blackwell's
    tcgen05 mma: UTCHMMA, UTCQMMA, ...)."""
    opcodes = [i.opcode for i in parse_sass(sass)]
    counts = {column: sum(op == opcode for op in opcodes) for column, opcode in SASS_COUNTS.items()}
    counts["utcmma"] = sum(op.startswith("UTC") and "MMA" in op for op in opcodes)
    counts["instructions"] = len(opcodes)
    return counts


# ----------------------------------------------------------------------------------------------
# Useful work per tile (the attention walks)
# ----------------------------------------------------------------------------------------------
# The GEMMs of one tile step, each BLOCK_M x BLOCK_N x BLOCK_D: forward S = QK^T, O += PV; dK/dV S, dP = dO V^T,
# dV += P^T dO, dK += dS^T Q; dQ S, dP, dQ += dS K.
GEMMS_PER_STEP = {"attn_fwd": 2, "attn_bwd_dkdv": 4, "attn_bwd_dq": 3}
_HGMMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)\.")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


def hgmma_loops(instructions: Sequence[Instruction]) -> list[list[Instruction]]:
    """The innermost loops that issue wgmma. A loop is the address range from a backward branch's
    target to the branch (``BRA`` to a lower address: how every loop closes in SASS); it issues wgmma
    if an HGMMA lies in the range; innermost: no other such loop lies strictly inside it."""
    ranges = []
    for instruction in instructions:
        target = _BRANCH_TARGET.search(instruction.operands) if instruction.opcode == "BRA" else None
        if target is not None and int(target.group(1), 16) <= instruction.address:
            lo, hi = int(target.group(1), 16), instruction.address
            if any(i.opcode == "HGMMA" and lo <= i.address <= hi for i in instructions):
                ranges.append((lo, hi))
    innermost = [r for r in set(ranges)
                 if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    return [[i for i in instructions if lo <= i.address <= hi] for lo, hi in sorted(innermost)]


def useful_work(kernel: str, sass: str, block_m: int, block_n: int, block_d: int, num_warps: int) -> dict:
    """Per tile step of an attention walk, from its SASS: the interior loop (of the innermost wgmma
    loops, the one with the fewest instructions: the edge tiles' loops add the element mask to the
    same work; with holes, the forward's and dQ's only innermost loop is the run of unmasked tiles,
    inside the loop over runs and masked tiles), and in it

    - ``mma_redundancy``: the MACs its HGMMAs issue (M x N x K of each, times the ``num_warps / 4``
      warpgroups that each issue the loop's instructions) over the MACs the step needs,
      ``GEMMS_PER_STEP[kernel] * BLOCK_M * BLOCK_N * BLOCK_D``. Above 1 when warpgroups compute the
      same product (a 64-row GEMM on two warpgroups);
    - ``ex2_per_score``: MUFU.EX2 per warp x 32 lanes x warps over the step's BLOCK_M x BLOCK_N scores
      (the forward's per-row rescale adds BLOCK_M);
    - ``instr_per_64x64``: the loop's instructions x warps, per 64 x 64 (query, key) pairs;
    - ``loop_spills``: its local loads and stores (LDL, STL): a spill inside the loop costs every step.

    Empty for a kernel without a wgmma loop."""
    loops = hgmma_loops(parse_sass(sass))
    if not loops:
        return {"loop_instructions": None, "loop_spills": None, "mma_redundancy": None, "ex2_per_score": None,
                "instr_per_64x64": None}
    loop = min(loops, key=len)
    warpgroups = num_warps / 4
    issued = sum(math.prod(map(int, _HGMMA_SHAPE.search(i.modifiers).groups()))
                 for i in loop if i.opcode == "HGMMA") * warpgroups
    needed = GEMMS_PER_STEP[kernel] * block_m * block_n * block_d
    scores = block_m * block_n
    ex2 = sum(i.opcode == "MUFU" and i.modifiers.startswith(".EX2") for i in loop)
    return {"loop_instructions": len(loop), "loop_spills": sum(i.opcode in ("LDL", "STL") for i in loop),
            "mma_redundancy": round(issued / needed, 3),
            "ex2_per_score": round(ex2 * 32 * num_warps / scores, 3),
            "instr_per_64x64": round(len(loop) * num_warps * 4096 / scores)}


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
    config = job.config
    if job.kernel in GEMMS_PER_STEP:
        metrics.update(useful_work(job.kernel, sass, config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_D"],
                                   config["num_warps"]))
    return {**metrics, "compile_s": round(seconds, 2), "status": "ok"}


def _slug(job: Job) -> str:
    case = job.case
    parts = [job.kernel + ("_rerun" if job.config.get("RERUN") else ""), ARCH_NAMES.get(job.arch, str(job.arch)),
             case.dtype]
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
    config_text = " ".join(f"{k}={v}" for k, v in config.items()
                           if k not in ("num_warps", "num_stages", "HEAD_DIM", "BLOCK_D")) + \
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
# The gate
# ----------------------------------------------------------------------------------------------
# Every default walk launch of the attention kernels (not the rerun, which runs only for work items with a
# non-finite result) does the work its tile needs once: no GEMM issued twice (two warpgroups on the same
# 64 rows), about one exp2 per score (the forward adds one per row for the rescale).
USEFUL_WORK_LIMITS = {"mma_redundancy": 1.05, "ex2_per_score": 1.25}
# (kernel, BLOCK_D) walks exempt from USEFUL_WORK_LIMITS, with why: see LAUNCH_RULES' reasons.
USEFUL_WORK_EXCEPTIONS = {
    ("attn_bwd_dkdv", 256): "dK and dV of 64 keys x 256 fp32 do not fit one warpgroup's registers: two warpgroups "
                            "share 64 keys and duplicate the score GEMMs",
}
# (kernel, BLOCK_D, walk or rerun) -> most spilled bytes allowed, on triton 3.6 and 3.9; every other launch spills
# nothing, and no walk but the exceptions above spills inside its interior loop. BLOCK_D 256 covers head dims
# 129-256: below 256 the head-dim mask of the loads takes registers too.
SPILL_ALLOWANCE = {
    ("attn_fwd", 256, "walk"): 32,  # D = 192: the prologue and epilogue, none in the loop
    ("attn_bwd_dkdv", 256, "walk"): 384,
    ("attn_bwd_dkdv", 256, "rerun"): 768,
    ("attn_bwd_dq", 256, "rerun"): 64,
}
# The launches of a mask with holes (config HOLES=True) that need more than SPILL_ALLOWANCE, none inside a loop: dQ's
# walk (before and after its walk loop), at BLOCK_D 256 (LAUNCH_RULES' holes_only row)
# 160 B on triton 3.9 and 8 B on 3.6, at BLOCK_D 128 32 B on 3.6 and nothing on 3.9; the forward rerun at BLOCK_D
# 256 8 B on 3.9, 16 B on 3.6 (the configs tried are in bench/README.md); at BLOCK_D 128 the dK/dV rerun on
# triton 3.6, nothing on 3.9.
HOLES_SPILL_ALLOWANCE = {
    ("attn_fwd", 256, "rerun"): 16,
    ("attn_bwd_dq", 256, "walk"): 160,
    ("attn_bwd_dq", 128, "walk"): 32,
    ("attn_bwd_dkdv", 128, "rerun"): 24,
}


def _number(value) -> float | None:
    return None if value in (None, "") else float(value)


def gate_failures(rows: Iterable[dict]) -> list[str]:
    """What breaks the gate in report rows (fresh, or read back from a CSV): a launch that did not
    compile, spills more than ``SPILL_ALLOWANCE`` (``HOLES_SPILL_ALLOWANCE`` for a mask with holes), or (a walk)
    spills inside its interior loop or exceeds ``USEFUL_WORK_LIMITS`` (per step)."""
    failures = []
    for row in rows:
        if row["op"] != "attention":
            continue
        name = f"{row['kernel']} {row['dtype']} D={row['head_dim']}{' gqa' if row['gqa'] in (True, 'True') else ''} " \
               f"[{row['config']}]"
        if row["status"] != "ok":
            failures.append(f"{name}: {row['status']}")
            continue
        block_d = max(16, 1 << (int(row["head_dim"]) - 1).bit_length())
        which = "rerun" if "RERUN=True" in row["config"] else "walk"
        holes = "HOLES=True" in row["config"]
        key = (row["kernel"], block_d, which)
        allowed = (HOLES_SPILL_ALLOWANCE if holes else {}).get(key, SPILL_ALLOWANCE.get(key, 0))
        if _number(row["spill_bytes"]) > allowed:
            failures.append(f"{name}: {row['spill_bytes']} bytes spilled, at most {allowed} allowed")
        if which == "walk" and row["kernel"] in GEMMS_PER_STEP and \
                (row["kernel"], block_d) not in USEFUL_WORK_EXCEPTIONS:
            if _number(row["loop_spills"]):
                failures.append(f"{name}: {row['loop_spills']} local loads/stores in the interior loop")
            for column, limit in USEFUL_WORK_LIMITS.items():
                value = _number(row[column])
                if value is None or value > limit:
                    failures.append(f"{name}: {column} {value}, at most {limit}")
    return failures


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
_TABLE = (("kernel", 18), ("arch", 7), ("dtype", 5), ("head_dim", 4), ("gqa", 4), ("registers", 4),
          ("spill_bytes", 6), ("shared_bytes", 7), ("hgmma", 5), ("hmma", 5), ("ldgsts", 6), ("utmaldg", 4),
          ("mma_redundancy", 5), ("ex2_per_score", 5), ("instr_per_64x64", 6), ("compile_s", 6), ("status", 3),
          ("config", 0))
_HEADERS = {"head_dim": "D", "registers": "REG", "spill_bytes": "SPILL", "shared_bytes": "SHARED", "hgmma": "HGMMA",
            "hmma": "HMMA", "ldgsts": "LDGSTS", "utmaldg": "TMA", "mma_redundancy": "MMAx",
            "ex2_per_score": "EX2/S", "instr_per_64x64": "I/64²", "compile_s": "secs"}


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
    """The report's rows with bench's CSV writer; the rows carry the compiling Triton and the kernels'
    commit, the environment adds where the compile ran (this CPU machine), its torch and the time."""
    import torch

    environment = Environment.current(torch.device("cpu"))
    where = {"device": environment.device, "torch": environment.torch, "timestamp": environment.timestamp}
    write_rows(path, rows, CSV_COLUMNS, environment=where)


def read_csv(path: Path) -> list[dict]:
    return read_rows(path)


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
    parser.add_argument("--holes", action="store_true",
                        help="also compile attention under a mask with holes (hidden spans: the kernels' HOLES "
                             "variant), variant 'holes' in the rows")
    parser.add_argument("--arch", type=_list(int), default=[90],
                        help="compute capabilities, comma-separated: 90 (sm_90a, default), 80, 100 (sm_100a) "
                             "where the installed Triton supports them")
    parser.add_argument("--out", type=Path, help="CSV to write (default: bench/results/compile/<triton>_<arch>.csv)")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes (default: 2)")
    parser.add_argument("--cache", action="store_true",
                        help="reuse Triton's cache (default: a fresh one, so compile_s are real compile times)")
    parser.add_argument("--keep", type=Path, help="also write each kernel's SASS and TTGIR into this folder")
    parser.add_argument("--gate", action="store_true",
                        help="exit non-zero unless every attention launch passes the gate: no spill beyond "
                             "SPILL_ALLOWANCE, and every walk's MMA redundancy and EX2 per score within "
                             "USEFUL_WORK_LIMITS")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ops = [k for k in args.kernels if k in OPS] or [
        op for op, prefixes in (("attention", ("attn",)), ("diffusion", ("add_noise", "mse")),
                                ("lm_loss", ("cross_entropy",)), ("adaln", ("adaln",)))
        if any(k.startswith(prefixes) for k in args.kernels)]
    selected = cases(ops, args.dtypes, args.head_dims, args.gqa, args.holes)
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
    if args.gate:
        failures = gate_failures(rows)
        print("gate: " + ("; ".join(failures) if failures else f"every attention launch passes ({len(rows)} rows)"))
        return 1 if failures or failed else 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
