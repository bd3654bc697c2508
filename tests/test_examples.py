"""The README's first example (examples/quickstart.py) keeps running and keeps matching the reference."""

import runpy
from pathlib import Path

import torch

import tfkernels as tk

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs_and_matches_the_reference():
    # The example's module globals: what it computed, not what it printed.
    example = runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    q, k, v, mask, out = (example[name] for name in ("q", "k", "v", "mask", "out"))
    expected, _ = tk.reference.attention(q.double(), k.double(), v.double(), mask)
    error = (out.double() - expected).abs().max().item()
    assert example["error"] == error
    # O(1) outputs: float32 accumulation error over <= 64 keys, or two ulps of a bf16 output.
    assert error < max(16 * torch.finfo(torch.float32).eps, 2 * torch.finfo(out.dtype).eps)
    padding = ~mask.to_dense().any(dim=-1)  # [B, S]: rows that see no key
    assert padding[0, 60:].all() and padding.sum() == 4
    assert (out[padding] == 0).all()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
