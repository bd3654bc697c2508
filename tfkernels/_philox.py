"""Philox-4x32-10, the counter-based generator of the seeded diffusion noise: its constants, shared
by the Triton kernels (``tfkernels.diffusion``) and the eager reference
(``tfkernels.reference.seeded_noise``), and its torch implementation.

Element ``e`` of a buffer draws Philox-4x32-10 with counter ``(e mod 2^32, e >> 32, 0, 0)`` and key
``(seed mod 2^32, seed >> 32)``; the top ``UNIFORM_BITS`` bits of words 0 and 1 give two uniforms,
Box-Muller turns them into one normal. Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC'11.
"""

from __future__ import annotations

import torch

__all__ = ["PHILOX_KEY_A", "PHILOX_KEY_B", "PHILOX_ROUNDS", "PHILOX_ROUND_A", "PHILOX_ROUND_B", "UINT32",
           "UNIFORM_BITS", "philox4x32"]

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
UINT32 = 0xFFFFFFFF
# Uniforms keep the top 24 bits of a 32-bit draw: exactly representable in float32.
UNIFORM_BITS = 24


def _mul_hi_lo(constant: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``constant * x`` for uint32 values held in int64, without overflow."""
    c_hi, c_lo = constant >> 16, constant & 0xFFFF
    p_lo = x * c_lo  # < 2^48
    p_hi = x * c_hi  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & UINT32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox-4x32-10 on uint32 counters held in int64 tensors; returns the four output words."""
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mul_hi_lo(PHILOX_ROUND_A, c0)
        hi1, lo1 = _mul_hi_lo(PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_KEY_A) & UINT32
        k1 = (k1 + PHILOX_KEY_B) & UINT32
    return c0, c1, c2, c3
