"""The training script under torchrun (2 processes, gloo): DDP and FSDP2 equal one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from transfusion_core import train

ARGV = ["--dim", "32", "--n-layers", "2", "--n-heads", "2", "--batch-size", "8", "--micro-batches", "2",
        "--seq-len", "160", "--steps", "3", "--warmup", "1", "--lr", "3e-3", "--no-plots", "--threads", "1"]


def records(out):
    return [json.loads(line) for line in (out / train.METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: one process running both micro-batches of each step."""
    out = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        train.main(["--out", str(out), *ARGV])
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_same_global_batch(mode, single_process, tmp_path):
    out = tmp_path / mode
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "transfusion_core.train", "--out", str(out), *ARGV] + (["--fsdp"] if mode == "fsdp" else [])
    env = os.environ | {"TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("FSDP2" if mode == "fsdp" else "DDP") in result.stdout
    lines = result.stdout.splitlines()
    assert sum(line.startswith("training ") for line in lines) == 1  # only rank 0 prints and writes
    assert sum(line.startswith("step 3/3") for line in lines) == 1
    # Same documents, packing and noise per micro-batch; only the order of the gradient sums
    # differs (all-reduce vs accumulation), so the steps agree to float32 rounding.
    for one, two in zip(records(single_process), records(out), strict=True):
        for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), (one["step"], key)
    for name in ("model.safetensors", "optimizer.safetensors"):
        expected = load_file(str(single_process / train.CHECKPOINT_DIR / name))
        got = load_file(str(out / train.CHECKPOINT_DIR / name))
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
