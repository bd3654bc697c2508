"""transfusion_core: a slim Transfusion model on top of tfkernels (DESIGN §4).

- ``TransfusionConfig`` / ``Transfusion``: the model; ``model(batch)`` gives the training loss,
  ``model.generate(prompt, ...)`` mixed-modal generation, ``save`` / ``Transfusion.load``
  checkpoints (safetensors + JSON).
- ``Packer`` / ``PackedBatch``: documents (text token ids and image latents) packed into rows.
- ``ByteTokenizer``: the embedded byte-level tokenizer.
- ``ops``: the op seam (``ops.use(attention=...)`` swaps what the model calls).
"""

from . import ops
from .data import ByteTokenizer, PackedBatch, Packer
from .model import IGNORE_INDEX, KVCache, Transfusion, TransfusionConfig, TransfusionLoss, patchify, unpatchify

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "KVCache",
    "PackedBatch",
    "Packer",
    "Transfusion",
    "TransfusionConfig",
    "TransfusionLoss",
    "patchify",
    "ops",
    "unpatchify",
]
