"""Eager reference implementations: the semantics every kernel must match.

Shared by the tests, the benchmarks and the CPU path of the public ops.
"""

from .masked_attention import attention

__all__ = ["attention"]
