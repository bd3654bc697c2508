"""bench/compile_report.py: its parsing of cuobjdump's output, the sweep, the command line, and the
compile gate (issue 13, item 3): a handful of the attention kernels' default configs compiled for
sm_90a, asserting what holds on main today so that nothing merged makes it worse:

- every kernel compiles, uses at most the 227 KB of shared memory a Hopper block may have, uses
  wgmma (HGMMA) and cp.async (LDGSTS);
- no spill where there is none today; no more spill than today where there is (the bounds below,
  measured with triton 3.9.0, per launch: each kernel is launched twice per call, the tile walk and the
  rerun of non-finite work items). Lower a bound when a kernel improves.

The full sweep (``python -m bench.compile_report``, ~200 compiles) is no part of the suite; set
``COMPILE_REPORT_SWEEP=1`` to run it as a test.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from bench import compile_report as cr

from .support import ROOT

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
        /*0010*/              @!P1 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;  /* 0x0 */
        /*0020*/               @P0 LDGSTS.E.BYPASS.128 [R188], desc[UR14][R60.64], P2 ;  /* 0x0 */
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;      /* 0x0 */
        /*0040*/             @!UP0 UTMALDG.2D [UR8], [UR4] ;                  /* 0x0 */
        /*0050*/                   STL.64 [R1+0x8], R2 ;                      /* 0x0 */
        /*0060*/                   LDL R3, [R1+0x8] ;                         /* 0x0 */
        /*0070*/                   UTCHMMA gdesc[UR4], gdesc[UR6], tmem[UR8] ;  /* 0x0 */
        /*0080*/                   EXIT ;                                     /* 0x0 */
        .headerflags    @"EF_CUDA_SM90 HGMMA LDGSTS"
"""


def test_sass_counts():
    assert cr.sass_counts(SASS) == dict(hgmma=1, hmma=1, ldgsts=1, utmaldg=1, ublkcp=0, ldl=1, stl=1, utcmma=1,
                                        instructions=9)


def test_resource_usage():
    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function _attn_fwd_kernel:\n  REG:241 STACK:16 SHARED:1280 LOCAL:0 "
            "CONSTANT[0]:1052 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert cr.resource_usage(text) == dict(registers=241, spill_bytes=16, static_shared=1280)
    with pytest.raises(ValueError, match="no resource usage"):
        cr.resource_usage("nothing")


def test_default_sweep():
    cases = cr.cases()
    attention = [c for c in cases if c.op == "attention"]
    assert {(c.dtype, c.head_dim, c.gqa) for c in attention} == {
        (dtype, d, gqa) for dtype in ("bf16", "fp16") for d in (32, 64, 80, 96, 128, 192, 256) for gqa in (False, True)}
    assert {(c.op, c.dtype, c.variant) for c in cases if c.op != "attention"} == {
        (op, dtype, variant) for op in ("diffusion", "lm_loss", "adaln") for dtype in ("bf16", "fp16")
        for variant in cr.VARIANTS[op]}
    assert len(cr.cases(dtypes=["fp32"], ops=["attention"], head_dims=[64], gqa=[True])) == 1


def test_command_line_defaults_and_choices():
    args = cr.parse_args([])
    assert (args.dtypes, args.head_dims, args.gqa, args.arch, args.jobs) == (
        ["bf16", "fp16"], list(cr.HEAD_DIMS), [False, True], [90], 2)
    args = cr.parse_args(["--kernels", "attn_fwd,lm_loss", "--dtypes", "fp32", "--head-dims", "80,96", "--gqa", "on",
                          "--arch", "80,90,100", "--jobs", "4"])
    assert (args.kernels, args.dtypes, args.head_dims, args.gqa, args.arch) == (
        ["attn_fwd", "lm_loss"], ["fp32"], [80, 96], [True], [80, 90, 100])
    with pytest.raises(SystemExit):
        cr.parse_args(["--dtypes", "fp8"])


def test_kernel_label():
    assert cr.kernel_label("_attn_bwd_dq_kernel") == "attn_bwd_dq"
    assert cr.kernel_label("_attn_bwd_dq_program") == "attn_bwd_dq"
    assert cr.kernel_label("_cross_entropy_rows_kernel") == "cross_entropy_rows"


# One walk's SASS, shortened: a prologue, a loop of 2 HGMMA (64x64x16 and 64x128x16) and 3 EX2 that is
# closed by a backward branch, an outer loop around it, and a second (masked) copy with more instructions.
LOOPS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0040*/                   MUFU.EX2 R3, R3 ;
        /*0050*/                   MUFU.EX2 R4, R4 ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, R120, gdesc[UR8].tnspB, R24 ;
        /*0070*/                   MUFU.EX2 R5, R5 ;
        /*0080*/               @P2 BRA 0x30 ;
        /*0090*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*00a0*/                   FSEL R6, R6, -INF, P0 ;
        /*00b0*/                   FSEL R8, R8, -INF, P1 ;
        /*00c0*/                   MUFU.EX2 R7, R7 ;
        /*00d0*/                   MUFU.EX2 R8, R8 ;
        /*00e0*/                   HGMMA.64x128x16.F32.BF16 R24, R120, gdesc[UR8].tnspB, R24 ;
        /*00f0*/               @P3 BRA 0x90 ;
        /*0100*/               @P4 BRA 0x20 ;
        /*0110*/                   BRA 0x120 ;
        /*0120*/                   EXIT ;
"""


def test_hgmma_loops_are_the_innermost_backward_branches_with_wgmma():
    loops = cr.hgmma_loops(cr.parse_sass(LOOPS))
    assert [(loop[0].address, loop[-1].address) for loop in loops] == [(0x30, 0x80), (0x90, 0xf0)]


def test_useful_work_of_the_interior_loop():
    # The interior loop (0x30-0x80, 6 instructions): per warpgroup 64*64*16 + 64*128*16 MACs; with 8 warps
    # (2 warpgroups), a 128 x 64 forward step needs 2 * 128 * 64 * 16 at D = 16.
    work = cr.useful_work("attn_fwd", LOOPS, block_m=128, block_n=64, block_d=16, num_warps=8)
    issued = (64 * 64 * 16 + 64 * 128 * 16) * 2
    assert work == {"loop_instructions": 6, "mma_redundancy": round(issued / (2 * 128 * 64 * 16), 3),
                    "ex2_per_score": round(3 * 32 * 8 / (128 * 64), 3), "instr_per_64x64": 6 * 8 * 4096 // (128 * 64)}
    # A kernel without a wgmma loop has no figures.
    assert set(cr.useful_work("attn_fwd", SASS, 64, 64, 64, 4).values()) == {None}


@needs_triton
def test_capture_refuses_interpreted_kernels(monkeypatch):
    """Under TRITON_INTERPRET=1 (this suite) tfkernels' kernels are the interpreter's: the capture
    must say so rather than record nothing (the report compiles in spawned processes)."""
    from triton.runtime.jit import JITFunction

    import tfkernels  # noqa: F401

    if isinstance(sys.modules["tfkernels.attention"]._attn_kernel, JITFunction):
        pytest.skip("tfkernels was imported without TRITON_INTERPRET=1 here")
    with pytest.raises(cr.AdapterError, match="TRITON_INTERPRET=1"):
        cr.capture(cr.Case("attention", "bf16", 64), 90)


@needs_triton
def test_command_line_writes_the_csv(tmp_path):
    """One small kernel end to end: capture, compile in a worker, cuobjdump, table and CSV."""
    out = tmp_path / "report.csv"
    result = subprocess.run([sys.executable, "-m", "bench.compile_report", "--kernels", "attn_bwd_delta", "--dtypes",
                             "bf16", "--head-dims", "64", "--gqa", "off", "--jobs", "1", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = cr.read_csv(out)
    assert [(r["kernel"], r["arch"], r["dtype"], r["head_dim"], r["status"]) for r in rows] == [
        ("attn_bwd_delta", "sm_90a", "bf16", "64", "ok")]
    with open(out) as f:
        assert tuple(f.readline().strip().split(",")) == cr.CSV_COLUMNS
    row = rows[0]
    assert int(row["registers"]) > 0 and int(row["instructions"]) > 0 and float(row["compile_s"]) >= 0
    assert row["triton"] and row["commit"] and row["config"] == "DLSE=None HAS_DLSE=False BLOCK_M=64 w4 s3"
    assert cr.format_header().split()[0] == "kernel" and "attn_bwd_delta" in result.stdout


# ----------------------------------------------------------------------------------------------
# The gate
# ----------------------------------------------------------------------------------------------
# (kernel, head dim, GQA, pass) -> most spill bytes allowed (bf16, triton 3.9.0): 0 where the launch is spill-free
# today, else what it spills today. Pass "main" is the tile walk (RERUN=False); "rerun" the second launch of every
# call, which recomputes only the work items flagged non-finite (RERUN=True).
SPILL_BOUND = {
    ("attn_fwd", 64, False, "main"): 0, ("attn_fwd", 64, False, "rerun"): 0,
    ("attn_fwd", 128, False, "main"): 0, ("attn_fwd", 128, False, "rerun"): 0,
    ("attn_fwd", 256, False, "main"): 0, ("attn_fwd", 256, False, "rerun"): 0,
    ("attn_bwd_dq", 64, False, "main"): 0, ("attn_bwd_dq", 64, False, "rerun"): 0,
    ("attn_bwd_dq", 128, False, "main"): 0, ("attn_bwd_dq", 128, False, "rerun"): 0,
    ("attn_bwd_dq", 256, False, "main"): 0, ("attn_bwd_dq", 256, False, "rerun"): 24,
    ("attn_bwd_dkdv", 64, False, "main"): 0, ("attn_bwd_dkdv", 64, False, "rerun"): 0,
    ("attn_bwd_dkdv", 64, True, "main"): 0, ("attn_bwd_dkdv", 64, True, "rerun"): 0,
    ("attn_bwd_dkdv", 128, False, "main"): 0, ("attn_bwd_dkdv", 128, False, "rerun"): 0,
    ("attn_bwd_dkdv", 128, True, "main"): 0, ("attn_bwd_dkdv", 128, True, "rerun"): 0,
    # 64 x 256 fp32 dK and dV accumulators take 128 of a thread's 255 registers at 8 warps
    ("attn_bwd_dkdv", 256, False, "main"): 144, ("attn_bwd_dkdv", 256, False, "rerun"): 672,
    ("attn_bwd_dkdv", 256, True, "main"): 208, ("attn_bwd_dkdv", 256, True, "rerun"): 656,
}
SHARED_LIMIT_SM90 = 232448  # 227 KB: the most shared memory one block may use on Hopper


def launch_key(row):
    return row["kernel"], row["head_dim"], row["gqa"], "rerun" if "RERUN=True" in row["config"] else "main"


def label(key):
    kernel, head_dim, gqa, which = key
    return f"{kernel}-D{head_dim}{'-gqa' if gqa else ''}-{which}"


@pytest.fixture(scope="module")
def gate_rows():
    """(kernel, head dim, GQA, pass) -> the rows of its launches (one, unless a new variant appeared)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    kernels = {key[:3] for key in SPILL_BOUND}
    cases = [cr.Case("attention", "bf16", d, gqa) for d, gqa in sorted({(d, g) for _, d, g in kernels})]
    rows = cr.run(cases, archs=(90,), jobs=2, cache=True, log=lambda line: None,
                  select=lambda case, kernel: (kernel, case.head_dim, case.gqa) in kernels)
    by_launch = {}
    for row in rows:
        by_launch.setdefault(launch_key(row), []).append(row)
    return by_launch


def describe(rows):
    return "; ".join(f"{r['config']}: {r['registers']} registers, {r['spill_bytes']} B spilled, {r['shared_bytes']} B "
                     f"shared, {r['hgmma']} HGMMA, {r['ldgsts']} LDGSTS, {r['status']}" for r in rows)


def test_gate_compiles_exactly_the_selected_launches(gate_rows):
    # The bounds are per launch variant: a new one (other constexprs) needs its own decision here,
    # not a silent share of another's bound.
    assert set(gate_rows) == set(SPILL_BOUND), {label(k): describe(v) for k, v in gate_rows.items()
                                                 if k not in SPILL_BOUND}
    for key, rows in gate_rows.items():
        assert all(r["arch"] == "sm_90a" and r["status"] == "ok" for r in rows), (label(key), describe(rows))
        assert len(rows) == 1, f"{label(key)}: {len(rows)} launch variants now: {describe(rows)}"


@pytest.mark.parametrize("key", sorted(SPILL_BOUND), ids=label)
def test_gate_spills_shared_memory_and_loads(gate_rows, key):
    rows = gate_rows[key]
    assert all(r["spill_bytes"] <= SPILL_BOUND[key] for r in rows), (SPILL_BOUND[key], describe(rows))
    assert all(r["shared_bytes"] <= SHARED_LIMIT_SM90 for r in rows), describe(rows)
    # The K/V (or Q/dO) tile loads are pipelined with cp.async.
    assert all(r["ldgsts"] > 0 for r in rows), describe(rows)


@pytest.mark.parametrize("key", sorted(SPILL_BOUND), ids=label)
def test_gate_uses_wgmma(gate_rows, key):
    rows = gate_rows[key]
    assert all(r["hgmma"] > 0 for r in rows), describe(rows)


@pytest.mark.skipif(os.environ.get("COMPILE_REPORT_SWEEP") != "1", reason="the full sweep: COMPILE_REPORT_SWEEP=1")
def test_full_sweep_compiles():
    rows = cr.run(cr.cases(), archs=(90,), jobs=os.cpu_count() or 2, cache=True, log=lambda line: None)
    assert rows and all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    attention = [r for r in rows if r["op"] == "attention"]
    assert all(r["shared_bytes"] <= SHARED_LIMIT_SM90 for r in attention)


def test_a_kernel_that_does_not_compile_is_an_error_row():
    job = cr.Job(cr.Case("attention", "bf16", 64), "gone", "tfkernels.attention", "_no_such_kernel", (), {}, 90)
    assert cr._compile_or_error(job, None)["status"].startswith("error: AdapterError: tfkernels.attention._no_such_kernel")
