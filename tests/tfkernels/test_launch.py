"""The attention launch configurations as public data, and recording launches instead of running them."""

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tfkernels as tk
from tests.support import requires_triton
from tfkernels import launch as launch_module
from tfkernels.attention import LAUNCH_RULES, LaunchConfig, PassConfigs, launch_configs, use_launch_configs
from tfkernels.testing import assert_anchored

attention_module = importlib.import_module("tfkernels.attention")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("field, value, expected", [
    ("block_m", 48, "block_m: expected a power of two >= 16"),
    ("block_n", 8, "block_n: expected a power of two >= 16"),
    ("num_warps", 3, "num_warps: expected 1, 2, 4, 8 or 16"),
    ("num_stages", 0, "num_stages: expected an int >= 1"),
])
def test_launch_config_refuses_bad_values(field, value, expected):
    values = dict(block_m=64, block_n=64, num_warps=4, num_stages=2) | {field: value}
    with pytest.raises(ValueError, match=expected):
        LaunchConfig(**values)


def test_launch_configs_take_the_first_matching_rule():
    """A mask without holes never gets a holes-only row; a mask with holes gets the first row for it."""
    for head_dim in (32, 64, 80, 96, 128, 192, 256):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for holes in (False, True):
                gpu = launch_configs(head_dim, dtype, "sm_90", holes)
                rule = next(r for r in LAUNCH_RULES if r.arch == "gpu" and dtype in r.dtypes
                            and head_dim <= r.max_head_dim and (holes or not r.holes_only))
                assert gpu is rule.configs and launch_configs(head_dim, dtype, "sm_80", holes) is gpu
                interpreter = launch_configs(head_dim, dtype, "interpreter", holes)
                assert interpreter is LAUNCH_RULES[0].configs and LAUNCH_RULES[0].arch == "interpreter"
            assert launch_configs(head_dim, dtype, "sm_90") is launch_configs(head_dim, dtype, "sm_90", False)
    with pytest.raises(ValueError, match="no launch config for head dim 512"):
        launch_configs(512, torch.bfloat16, "sm_90")


def test_holes_only_rows_serve_the_16bit_head_dims_above_128():
    """The forward and dQ of a mask with holes have their own GPU configs at head dims 129-256 (16-bit), one
    warpgroup per 64 query rows as every 16-bit default walk; below, and in fp32, a mask with holes takes the
    configs of the other masks."""
    holes_only = [r for r in LAUNCH_RULES if r.holes_only]
    assert [(r.arch, r.dtypes, r.max_head_dim) for r in holes_only] == [
        ("gpu", (torch.float16, torch.bfloat16), 256)]
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (160, 256):
            configs = launch_configs(head_dim, dtype, "sm_90", holes=True)
            assert configs is holes_only[0].configs and configs != launch_configs(head_dim, dtype, "sm_90")
            assert configs.dkdv == launch_configs(head_dim, dtype, "sm_90").dkdv
            assert all(c.block_m == 16 * c.num_warps for c in (configs.forward, configs.dq))
        assert launch_configs(128, dtype, "sm_90", holes=True) is launch_configs(128, dtype, "sm_90")
    assert launch_configs(256, torch.float32, "sm_90", holes=True) is launch_configs(256, torch.float32, "sm_90")


@requires_triton
def test_the_kernels_use_the_configs_they_are_given():
    """A different tile shape, run in the interpreter, gives the same results (float64 reference), and
    the launchers read the override (a config the defaults never use would otherwise go untested)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 100, 2, 24, generator=gen, requires_grad=True) for _ in range(3))
    mask = tk.IntervalMask.causal(1, 100)
    odd = PassConfigs(forward=LaunchConfig(16, 64, 4, 1), dkdv=LaunchConfig(64, 16, 4, 1),
                      dq=LaunchConfig(32, 16, 2, 1))
    with use_launch_configs(odd) as active:
        assert attention_module._configs_for(q, holes=False) is attention_module._configs_for(q, holes=True) is active
        out = tk.attention(q, k, v, mask)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert attention_module._configs_for(q, holes=False) == launch_configs(24, torch.float32, "interpreter")
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = tk.reference.attention(*leaves, mask)[0]
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    lowp = tk.reference.attention(q, k, v, mask)[0]
    lowp_grads = torch.autograd.grad(lowp.square().sum(), (q, k, v))
    for name, ours, theirs, low in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads),
                                       (lowp, *lowp_grads)):
        assert_anchored(name, ours, theirs, low)


def test_rerun_configs_are_explicit_or_the_walks_with_a_narrow_inner_tile():
    walk = PassConfigs(forward=LaunchConfig(128, 64, 8, 3), dkdv=LaunchConfig(64, 128, 8, 3),
                       dq=LaunchConfig(128, 16, 8, 3), dkdv_rerun=LaunchConfig(32, 64, 4, 2))
    assert walk.rerun_config("forward") == LaunchConfig(128, 32, 8, 3)  # forward and dQ step through keys
    assert walk.rerun_config("dq") == LaunchConfig(128, 16, 8, 3)
    assert walk.rerun_config("dkdv") == LaunchConfig(32, 64, 4, 2)  # explicit
    assert PassConfigs(walk.forward, LaunchConfig(64, 128, 8, 3), walk.dq).rerun_config("dkdv") == \
        LaunchConfig(32, 128, 8, 3)  # dK/dV steps through queries


def test_use_launch_configs_refuses_other_types():
    with pytest.raises(TypeError, match="configs: expected a PassConfigs"), use_launch_configs(LaunchConfig(64, 64, 4, 1)):
        pass


def test_record_launches_validates_its_arch():
    with pytest.raises(ValueError, match="arch: expected a GPU architecture like 'sm_90'"), launch_module.record_launches("hopper"):
        pass


@requires_triton
def test_record_launches_refuses_interpreted_kernels():
    if not launch_module._INTERPRETED_KERNELS:
        pytest.skip("tfkernels was imported without TRITON_INTERPRET=1 here")
    with pytest.raises(launch_module.RecordingUnavailableError, match="imported under TRITON_INTERPRET=1"), \
            launch_module.record_launches("sm_90"):
        pass


@requires_triton
def test_recorded_launches_are_the_gpu_ones():
    """In a process without the interpreter: the ops take their Triton path on CPU tensors, choose the
    sm_90 configs, and nothing runs (the outputs are never written)."""
    script = textwrap.dedent("""
        import dataclasses
        import torch
        import tfkernels as tk
        from tfkernels.attention import launch_configs
        from tfkernels.launch import arch_of, record_launches

        q = torch.randn(1, 300, 4, 128, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, 300, 2, 128, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        with record_launches("sm_90") as launches:
            assert arch_of(q.device) == "sm_90"
            out = tk.attention(q, k, v, tk.IntervalMask.causal(1, 300))
            out.backward(torch.ones_like(out))
        assert arch_of(q.device) == "interpreter"
        configs = launch_configs(128, torch.bfloat16, "sm_90")
        walks = [(l.args[0].fn.__name__, l.kwargs["BLOCK_M"], l.kwargs["BLOCK_N"], l.kwargs["num_warps"])
                 for l in launches if l.kwargs.get("RERUN") is False]
        assert walks == [(name, c.block_m, c.block_n, c.num_warps) for name, c in (
            ("_attn_fwd_program", configs.forward), ("_attn_bwd_dkdv_program", configs.dkdv),
            ("_attn_bwd_dq_program", configs.dq))], walks
        assert len(launches) == 7  # 3 walks, 3 reruns, the delta pre-pass

        # A mask with holes at head dim 256: the holes configs, walks and reruns.
        q = torch.randn(1, 300, 4, 256, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, 300, 2, 256, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        mask = tk.IntervalMask.from_spans(300, images=[[(164, 228)]], hidden=[[(100, 164)]])  # a noisy, a clean copy
        with record_launches("sm_90") as launches:
            out = tk.attention(q, k, v, mask)
            out.backward(torch.ones_like(out))
        configs = launch_configs(256, torch.bfloat16, "sm_90", holes=True)
        programs = {"_attn_fwd_program": "forward", "_attn_bwd_dkdv_program": "dkdv", "_attn_bwd_dq_program": "dq"}
        seen = [(programs[l.args[0].fn.__name__], l.kwargs["RERUN"], l.kwargs["META"].HOLES,
                 (l.kwargs["BLOCK_M"], l.kwargs["BLOCK_N"], l.kwargs["num_warps"], l.kwargs["num_stages"]))
                for l in launches if "RERUN" in l.kwargs]
        expected = [(name, rerun, True, dataclasses.astuple(configs.rerun_config(name) if rerun else
                                                            getattr(configs, name)))
                    for name in ("forward", "dkdv", "dq") for rerun in (False, True)]
        assert seen == expected, seen
        print("ok")
    """)
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
