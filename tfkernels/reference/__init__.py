"""Eager reference implementations: the semantics every kernel must match.

Shared by the tests, the benchmarks and the CPU path of the public ops. One module per op, named as
the op's module in ``tfkernels``: ``adaln``, ``attention``, ``diffusion`` (with ``seeded_noise``; the
schedule is ``tfkernels.schedule.NoiseSchedule``, the same class as ``tk.NoiseSchedule``), ``lm_loss``.
"""

from .adaln import adaln_modulate
from .attention import attention
from .diffusion import NoiseSchedule, add_noise, diffusion_loss, seeded_noise
from .lm_loss import linear_cross_entropy

__all__ = ["NoiseSchedule", "adaln_modulate", "add_noise", "attention", "diffusion_loss", "linear_cross_entropy",
           "seeded_noise"]
