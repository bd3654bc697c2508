"""transfusion_core: a slim Transfusion model on top of tfkernels (docs/design.md#the-model-core).

- ``TransfusionConfig`` / ``Transfusion``: the model; ``model(batch)`` gives the training loss,
  ``model.generate(prompt, ...)`` mixed-modal generation, ``save`` / ``Transfusion.load``
  checkpoints (safetensors + JSON).
- ``Packer`` / ``PackedBatch``: documents (text token ids and image latents) packed into rows.
- ``ByteTokenizer``: the embedded byte-level tokenizer.
- ``ops``: the op seam (``ops.use(attention=...)`` swaps what the model calls).

Where each lives (README.md in this folder has the table): ``config``, ``data``, ``model``,
``generate``, ``checkpoint``; the training script's ``train``, ``evaluate``, ``datasets``,
``codec`` and ``plots``.
"""

from . import generate, ops  # generate gives Transfusion its generate method
from .config import IGNORE_INDEX, TransfusionConfig
from .data import ByteTokenizer, PackedBatch, Packer, patchify, unpatchify
from .model import KVCache, Transfusion, TransfusionLoss

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "KVCache",
    "PackedBatch",
    "Packer",
    "Transfusion",
    "TransfusionConfig",
    "TransfusionLoss",
    "generate",
    "patchify",
    "ops",
    "unpatchify",
]
