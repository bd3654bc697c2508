"""The op seam: the attention and loss functions the model calls, swappable without patching modules
(docs/design.md#the-op-seam).

The model never calls ``tfkernels`` directly for these four ops; it calls ``ops.current()``, which
is ``ModelOps()`` (the tfkernels functions) unless a ``use(...)`` block is active. Benchmarks and
experiments swap implementations this way::

    with transfusion_core.ops.use(attention=my_attention, linear_cross_entropy=eager_ce):
        loss = model(batch).loss
        loss.backward()

A replacement takes the same arguments as the tfkernels function it replaces:

- ``attention(q, k, v, mask)``: q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]``, ``mask`` a
  ``tk.IntervalMask``; returns ``[B, Sq, Hq, D]``;
- ``add_noise`` / ``diffusion_loss``: as ``tk.add_noise`` / ``tk.diffusion_loss``;
- ``linear_cross_entropy(hidden, weight, target)``: as ``tk.linear_cross_entropy``.

The active set is process-wide (a module global, which ``torch.compile`` guards on like any global),
not per thread: a ``use`` block is for one training loop at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import tfkernels as tk

__all__ = ["ModelOps", "current", "use"]


@dataclasses.dataclass(frozen=True)
class ModelOps:
    """The four functions the model calls; each defaults to its tfkernels op."""

    attention: Callable = tk.attention
    add_noise: Callable = tk.add_noise
    diffusion_loss: Callable = tk.diffusion_loss
    linear_cross_entropy: Callable = tk.linear_cross_entropy


_active = ModelOps()


def current() -> ModelOps:
    """The ops the model calls now."""
    return _active


@contextlib.contextmanager
def use(ops: ModelOps | None = None, /, **overrides: Callable) -> Iterator[ModelOps]:
    """Within the block the model calls ``ops`` (default: the active set) with ``overrides`` replaced.

    Raises ``TypeError`` for a name that is not one of ``ModelOps``' fields or a value that is not
    callable, before anything is swapped. The previous set is restored on exit, also on error.
    """
    global _active
    base = _active if ops is None else ops
    if not isinstance(base, ModelOps):
        raise TypeError(f"ops: expected a transfusion_core.ops.ModelOps, got {type(base).__name__}")
    fields = {f.name for f in dataclasses.fields(ModelOps)}
    for name, fn in overrides.items():
        if name not in fields:
            raise TypeError(f"{name}: not a model op; expected one of {sorted(fields)}")
        if not callable(fn):
            raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")
    previous, _active = _active, dataclasses.replace(base, **overrides)
    try:
        yield _active
    finally:
        _active = previous
