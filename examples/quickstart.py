"""The README example: a packed Transfusion row, attention through tk.attention, checked against
the eager reference. Runs on a CPU (reference path) or a CUDA GPU (Triton kernels)."""

import torch

import tfkernels as tk

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32

# Two rows of 64 tokens. Row 0: a 40-token document with an image at [8, 24), then a 20-token
# document with an image at [44, 52), then 4 padding tokens. Row 1: one document, two images.
mask = tk.IntervalMask.from_spans(
    64,
    images=[[(8, 24), (44, 52)], [(4, 20), (30, 46)]],
    documents=[[40, 20], [64]],
    device=device,
)
q = torch.randn(2, 64, 8, 64, device=device, dtype=dtype, requires_grad=True)  # [B, S, Hq, D]
k = torch.randn(2, 64, 2, 64, device=device, dtype=dtype, requires_grad=True)  # [B, S, Hkv, D]
v = torch.randn(2, 64, 2, 64, device=device, dtype=dtype, requires_grad=True)

out = tk.attention(q, k, v, mask)  # [B, S, Hq, D]
out.float().square().mean().backward()

expected, _ = tk.reference.attention(q.double(), k.double(), v.double(), mask)
error = (out.double() - expected).abs().max().item()
print(f"device={device} dtype={dtype} out={tuple(out.shape)} visible pairs={mask.visible_pairs()}")
print(f"max |out - reference(float64)| = {error:.2e}; padding rows are zero: {bool((out[0, 60:] == 0).all())}")
