"""bench/compile_report.py: its parsing of cuobjdump's output and of the wgmma loops, the sweep, the
command line, and the compile gate: the attention kernels' default configs at head dims 64, 128 and 256
(GQA on and off) compiled for sm_90a, each launch held to ``bench.compile_report.gate_failures``
(it compiles, spills no more than its allowance, and a walk issues each GEMM and exp2 once), using
at most the 227 KB of shared memory a Hopper block may have, wgmma (HGMMA) and cp.async (LDGSTS);
the gate shown to fail on configs that duplicate warpgroups; and the forward's interior loop no
longer than a plain FlashAttention-2 loop at the same tile.

The full sweep (``python -m bench.compile_report``, ~200 compiles) is no part of the suite; set
``COMPILE_REPORT_SWEEP=1`` to run it as a test.
"""

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

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
    assert [c.variant for c in cr.cases(dtypes=["bf16"], ops=["attention"], head_dims=[64], gqa=[True],
                                        holes=True)] == ["", "holes"]
    assert cr.parse_args(["--holes"]).holes and not cr.parse_args([]).holes


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
    assert work == {"loop_instructions": 6, "loop_spills": 0, "mma_redundancy": round(issued / (2 * 128 * 64 * 16), 3),
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
SHARED_LIMIT_SM90 = 232448  # 227 KB: the most shared memory one block may use on Hopper
# Head dims of each tile band (BLOCK_D 64, 128, 256), GQA on and off: every attention launch of bf16 at them.
GATE_CASES = [cr.Case("attention", "bf16", d, gqa) for d in (64, 128, 256) for gqa in (False, True)]


def row(**values):
    base = dict(op="attention", kernel="attn_bwd_dq", dtype="bf16", head_dim=128, gqa=False, status="ok",
                config="BLOCK_M=128 BLOCK_N=64 RERUN=False w8 s3", spill_bytes=0, loop_spills=0, mma_redundancy=1.0,
                ex2_per_score=1.0)
    return base | values


def test_gate_failures_name_the_launch_and_the_limit():
    assert cr.gate_failures([row(), row(kernel="attn_fwd", ex2_per_score=1.062), row(op="lm_loss", status="x")]) == []
    assert cr.gate_failures([row(mma_redundancy=1.667, ex2_per_score="2.0")]) == [
        "attn_bwd_dq bf16 D=128 [BLOCK_M=128 BLOCK_N=64 RERUN=False w8 s3]: mma_redundancy 1.667, at most 1.05",
        "attn_bwd_dq bf16 D=128 [BLOCK_M=128 BLOCK_N=64 RERUN=False w8 s3]: ex2_per_score 2.0, at most 1.25"]
    # The rerun is held to spills only; the D = 256 dK/dV walk is an exception to the useful-work limits, not
    # to its spill allowance; a head dim of 192 has the tiles of 256.
    rerun = "BLOCK_M=128 BLOCK_N=32 RERUN=True w8 s3"
    assert cr.gate_failures([row(config=rerun, mma_redundancy=2.0),
                             row(kernel="attn_bwd_dkdv", head_dim=192, mma_redundancy=1.5, ex2_per_score=2.0)]) == []
    allowance = cr.SPILL_ALLOWANCE[("attn_bwd_dkdv", 256, "walk")]
    assert cr.gate_failures([row(kernel="attn_bwd_dkdv", head_dim=256, spill_bytes=allowance + 8, gqa=True)]) == [
        f"attn_bwd_dkdv bf16 D=256 gqa [BLOCK_M=128 BLOCK_N=64 RERUN=False w8 s3]: {allowance + 8} bytes spilled, "
        f"at most {allowance} allowed"]
    assert cr.gate_failures([row(loop_spills="2", spill_bytes=8, head_dim=192, kernel="attn_fwd")]) == [
        "attn_fwd bf16 D=192 [BLOCK_M=128 BLOCK_N=64 RERUN=False w8 s3]: 2 local loads/stores in the interior loop"]
    assert cr.gate_failures([row(spill_bytes="8"), row(status="error: x", mma_redundancy=None)]) == [
        "attn_bwd_dq bf16 D=128 [BLOCK_M=128 BLOCK_N=64 RERUN=False w8 s3]: 8 bytes spilled, at most 0 allowed",
        "attn_bwd_dq bf16 D=128 [BLOCK_M=128 BLOCK_N=64 RERUN=False w8 s3]: error: x"]


def test_gate_holds_the_walks_of_a_mask_with_holes_per_step():
    """A mask with holes: the interior loop of the forward and dQ walks is a run of unmasked tiles, one step per
    iteration, held to the useful-work limits as every walk; their spills to HOLES_SPILL_ALLOWANCE where it names
    them, else to SPILL_ALLOWANCE, as every walk."""
    holes = "HOLES=True BLOCK_M=128 BLOCK_N=64 RERUN=False w8 s3"
    assert cr.gate_failures([row(config=holes), row(kernel="attn_fwd", config=holes, ex2_per_score=1.062)]) == []
    assert cr.gate_failures([row(kernel="attn_fwd", config=holes, spill_bytes=8),
                             row(kernel="attn_bwd_dkdv", config=holes, mma_redundancy=2.0),
                             row(config=holes, mma_redundancy=2.0, ex2_per_score=2.0)]) == [
        f"attn_fwd bf16 D=128 [{holes}]: 8 bytes spilled, at most 0 allowed",
        f"attn_bwd_dkdv bf16 D=128 [{holes}]: mma_redundancy 2.0, at most 1.05",
        f"attn_bwd_dq bf16 D=128 [{holes}]: mma_redundancy 2.0, at most 1.05",
        f"attn_bwd_dq bf16 D=128 [{holes}]: ex2_per_score 2.0, at most 1.25"]
    allowance = cr.HOLES_SPILL_ALLOWANCE[("attn_bwd_dq", 256, "walk")]
    assert allowance > cr.SPILL_ALLOWANCE.get(("attn_bwd_dq", 256, "walk"), 0)
    plain = "HOLES=False BLOCK_M=128 BLOCK_N=32 RERUN=False w8 s2"
    assert cr.gate_failures([row(config=holes, head_dim=256, spill_bytes=allowance),
                             row(config=holes, head_dim=256, spill_bytes=allowance + 8, loop_spills=2),
                             row(config=plain, head_dim=256, spill_bytes=allowance)]) == [
        f"attn_bwd_dq bf16 D=256 [{holes}]: {allowance + 8} bytes spilled, at most {allowance} allowed",
        f"attn_bwd_dq bf16 D=256 [{holes}]: 2 local loads/stores in the interior loop",
        f"attn_bwd_dq bf16 D=256 [{plain}]: {allowance} bytes spilled, at most 0 allowed"]


@needs_triton
def test_launches_of_a_mask_with_holes_compile_and_pass_the_gate():
    """The HOLES variant of every pass at D = 64, 128 and 256 (with and without GQA) for sm_90a, at head dims
    129-256 with its own configs: it compiles, passes the gate (its spills within the allowances and none inside
    the interior loop, each GEMM and exp2 once per step), and issues wgmma, and cp.async wherever the launch has
    more than one stage; dK/dV's walk (the same loop, other tile ranges) is held to the useful-work limits too."""
    cases = [cr.Case("attention", "bf16", d, gqa, variant="holes") for d, gqa in ((64, True), (128, False),
                                                                                  (128, True), (256, False),
                                                                                  (256, True))]
    rows = cr.run(cases, archs=(90,), jobs=2, cache=True, log=lambda line: None)
    walks = [r for r in rows if r["kernel"] != "attn_bwd_delta"]
    assert len(walks) == 6 * len(cases) and all("HOLES=True" in r["config"] for r in walks), describe(walks)
    assert cr.gate_failures(rows) == []
    assert all(r["hgmma"] > 0 and (r["ldgsts"] > 0) == (r["num_stages"] > 1) and r["shared_bytes"] <= SHARED_LIMIT_SM90
               for r in walks), describe(walks)
    # Head dims 129-256 run the holes configs, one warpgroup per 64 query rows in the forward and dQ walks.
    wide = [r for r in walks if r["head_dim"] == 256 and r["kernel"] in ("attn_fwd", "attn_bwd_dq") and "RERUN=False" in r["config"]]
    assert len(wide) == 4 and all(r["block_m"] == 16 * r["num_warps"] and r["loop_spills"] == 0 for r in wide), \
        describe(wide)


@pytest.fixture(scope="module")
def gate_rows():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    return cr.run(GATE_CASES, archs=(90,), jobs=2, cache=True, log=lambda line: None)


def describe(rows):
    return "; ".join(f"{r['kernel']} D={r['head_dim']} {r['config']}: {r['registers']} registers, {r['spill_bytes']} B "
                     f"spilled, {r['shared_bytes']} B shared, {r['hgmma']} HGMMA, {r['ldgsts']} LDGSTS, "
                     f"{r['mma_redundancy']} MMA redundancy, {r['ex2_per_score']} EX2/score, {r['status']}"
                     for r in rows)


def test_gate_passes_every_default_launch(gate_rows):
    kernels = {r["kernel"] for r in gate_rows}
    assert kernels == {"attn_fwd", "attn_bwd_delta", "attn_bwd_dkdv", "attn_bwd_dq"}
    assert cr.gate_failures(gate_rows) == []
    walks = [r for r in gate_rows if r["kernel"] != "attn_bwd_delta"]
    # Each case launches every walk twice (the walk and its rerun), wgmma and cp.async in both.
    assert len(walks) == 6 * len(GATE_CASES), describe(walks)
    assert all(r["hgmma"] > 0 and r["ldgsts"] > 0 and r["shared_bytes"] <= SHARED_LIMIT_SM90 for r in walks), \
        describe(walks)


@needs_triton
def test_gate_fails_on_duplicated_warpgroups():
    """The D = 128 backward configs of old (dQ 64 x 64 and dK/dV 64 keys x 32 queries, 8 warps) put 64 rows on two
    warpgroups: the gate must see the duplicated score GEMMs and exponentials."""
    from tfkernels.attention import LaunchConfig, launch_configs

    old = replace(launch_configs(128, torch.bfloat16, "sm_90"), dkdv=LaunchConfig(32, 64, 8, 3),
                  dq=LaunchConfig(64, 64, 8, 3), dkdv_rerun=None)
    rows = cr.run([cr.Case("attention", "bf16", 128, configs=old)], archs=(90,), jobs=2, cache=True,
                  log=lambda line: None, select=lambda case, kernel: kernel in ("attn_bwd_dkdv", "attn_bwd_dq"))
    walks = {r["kernel"]: r for r in rows if "RERUN=False" in r["config"]}
    assert (walks["attn_bwd_dkdv"]["mma_redundancy"], walks["attn_bwd_dq"]["mma_redundancy"]) == (1.5, 1.667)
    assert walks["attn_bwd_dkdv"]["ex2_per_score"] == walks["attn_bwd_dq"]["ex2_per_score"] == 2.0
    failures = cr.gate_failures(rows)
    assert sum("mma_redundancy" in f for f in failures) == sum("ex2_per_score" in f for f in failures) == 2, failures


YARDSTICK = """
import json
from bench import compile_report as cr
from tfkernels.attention import launch_configs
import torch

config = launch_configs(128, torch.bfloat16, "sm_90").forward
case = cr.Case("attention", "bf16", 128)
ours = next(job for job in cr.capture(case, 90) if job.kernel == "attn_fwd" and not job.config["RERUN"])
tensor, heads = cr.TensorArg("bfloat16", 1 << 20), 8
plain = cr.Job(case, "attn_fwd", "tests.bench.fa2_yardstick", "fa2_forward_kernel",
               (tensor, tensor, tensor, tensor, 1024 * heads * 128, heads * 128, 128, heads, 1024, 0.125),
               dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=128, num_warps=config.num_warps,
                    num_stages=config.num_stages), 90)
plain.key, plain.config = cr._specialisation(plain)
print(json.dumps({"config": str(config), "ours": cr.compile_job(ours), "plain": cr.compile_job(plain)}))
"""


@needs_triton
def test_forward_loop_is_no_longer_than_a_plain_flash_attention_loop():
    """Instructions per 64 x 64 (query, key) pairs of the forward's interior loop at its D = 128 default config,
    against tests/bench/fa2_yardstick.py (no mask, no bounds) compiled at the same config."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", YARDSTICK], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    ours, plain = report["ours"], report["plain"]
    assert ours["status"] == plain["status"] == "ok" and ours["mma_redundancy"] == plain["mma_redundancy"] == 1.0
    assert ours["instr_per_64x64"] <= plain["instr_per_64x64"], report


@pytest.mark.skipif(os.environ.get("COMPILE_REPORT_SWEEP") != "1", reason="the full sweep: COMPILE_REPORT_SWEEP=1")
def test_full_sweep_compiles():
    rows = cr.run(cr.cases(), archs=(90,), jobs=os.cpu_count() or 2, cache=True, log=lambda line: None)
    assert rows and all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert cr.gate_failures(rows) == []
    attention = [r for r in rows if r["op"] == "attention"]
    assert all(r["shared_bytes"] <= SHARED_LIMIT_SM90 for r in attention)


def test_a_kernel_that_does_not_compile_is_an_error_row():
    job = cr.Job(cr.Case("attention", "bf16", 64), "gone", "tfkernels.attention", "_no_such_kernel", (), {}, 90)
    assert cr._compile_or_error(job, None)["status"].startswith("error: AdapterError: tfkernels.attention._no_such_kernel")
