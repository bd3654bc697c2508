"""The README's runnable example keeps running and keeps matching the reference."""

import re
import runpy
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs_and_matches_the_reference(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    printed = capsys.readouterr().out
    dtype = getattr(torch, re.search(r"dtype=torch\.(\w+)", printed).group(1))  # float32 on a CPU, bf16 on a GPU
    error = float(re.search(r"max \|out - reference\(float64\)\| = (\S+);", printed).group(1))
    # O(1) outputs: float32 accumulation error over <= 64 keys, or two ulps of a bf16 output.
    assert error < max(16 * torch.finfo(torch.float32).eps, 2 * torch.finfo(dtype).eps)
    assert "padding rows are zero: True" in printed
