"""tfkernels: Triton kernels for Transfusion-style multimodal models.

``import tfkernels as tk`` gives

- ``tk.IntervalMask``: the attention mask as one key interval per query (causal, full, prefix-LM,
  sliding window, packed documents with bidirectional image spans, KV-cache decoding);
- ``tk.attention``: flash attention under that mask, ``[B, S, H, D]`` layout, GQA.

Every op is a plain PyTorch function with autograd, usable under ``torch.compile``. CUDA tensors
run Triton kernels; CPU tensors run the eager reference (``tfkernels.reference``), or the Triton
kernels in Triton's interpreter when ``TRITON_INTERPRET=1``.
"""

from ._version import __version__
from .attention import attention
from .mask import IntervalMask

__all__ = ["IntervalMask", "__version__", "attention"]
