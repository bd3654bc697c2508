"""tfkernels: Triton kernels for Transfusion-style multimodal models.

``import tfkernels as tk`` gives

- ``tk.IntervalMask``: the attention mask as one key interval per query (causal, full, prefix-LM,
  sliding window, packed documents with bidirectional image spans, KV-cache decoding);
- ``tk.attention``: flash attention under that mask, ``[B, S, H, D]`` layout, GQA;
- ``tk.NoiseSchedule`` (cosine, linear, rectified flow), ``tk.add_noise`` and ``tk.diffusion_loss``
  (targets eps / v / x0 / flow): per-image timesteps, images of different sizes in one launch,
  float32 coefficients, optional seeded noise regenerated in-kernel instead of stored;
- ``tk.linear_cross_entropy``: output projection + cross-entropy without ``[N, V]`` logits;
- ``tk.adaln_modulate``: DiT / PixArt-alpha adaLN, ``norm(x) * (1 + scale) + shift`` (LayerNorm or
  RMSNorm), optionally fused with the gated residual add before it.

Every op is a plain PyTorch function with autograd, usable under ``torch.compile``. CUDA tensors
run Triton kernels; CPU tensors run the eager reference (``tfkernels.reference``), or the Triton
kernels in Triton's interpreter when ``TRITON_INTERPRET=1``; ``tk.backend(device)`` says which.
The design, and the rules every op keeps: docs/design.md.

Modules: ``mask`` (``IntervalMask``, segment ids), ``schedule`` (``NoiseSchedule``, the diffusion
targets), one per op (``adaln``, ``attention``, ``diffusion``, ``lm_loss``: kernels, launchers, autograd
and registration, the public function), ``reference`` (the eager semantics of each op), ``testing``
(assertions and random layouts for tests of code that uses tfkernels).
"""

from ._dispatch import backend
from ._version import __version__
from .adaln import adaln_modulate
from .attention import attention
from .diffusion import add_noise, diffusion_loss
from .lm_loss import linear_cross_entropy
from .mask import IntervalMask, NotAnIntervalError
from .schedule import NoiseSchedule

__all__ = ["IntervalMask", "NoiseSchedule", "NotAnIntervalError", "__version__", "adaln_modulate", "add_noise",
           "attention", "backend", "diffusion_loss", "linear_cross_entropy"]
