"""Eager reference implementations: the semantics every kernel must match.

Shared by the tests, the benchmarks and the CPU path of the public ops.
"""

from .diffusion import NoiseSchedule, add_noise, diffusion_loss, seeded_noise
from .lm_loss import linear_cross_entropy
from .masked_attention import attention

__all__ = ["NoiseSchedule", "add_noise", "attention", "diffusion_loss", "linear_cross_entropy", "seeded_noise"]
