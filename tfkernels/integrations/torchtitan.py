"""torchtitan inner attention on ``tk.attention``: ``TfkernelsAttention`` (its config,
``TfkernelsAttention.Config``), the mask builder ``interval_mask`` and ``apply(model)``.

torchtitan's attention layers (``GQAttention``) project q/k/v, apply RoPE and call an
``inner_attention`` module built from a config (``FlexAttention.Config``, ``VarlenAttention.Config``)
with ``attention_masks``, which the model builds once per batch from the tokens' ``positions``
(``Decoder.get_attention_masks``: a FlexAttention ``BlockMask`` or varlen offsets for causal
attention within packed documents, a document starting at each position 0). Here:

* ``TfkernelsAttention`` is an inner attention that takes an ``IntervalMask`` as ``attention_masks``
  and runs ``tk.attention`` on torchtitan's ``[B, L, N, H]`` tensors as they are (the layout
  ``tk.attention`` takes: no transpose, no copy), with the layer's ``scale``; GQA needs no flag. An
  ``out_transform`` (``out, lse -> out``) gets the lse as ``[B, L, N]``, as FlexAttention gives it.
* ``interval_mask(positions, image_ids=None)`` is the mask: causal within the packed documents of
  ``positions`` (torchtitan's convention) or of ``document_ids``, with Transfusion's bidirectional
  image spans where ``image_ids`` is non-zero. Vectorised, no host sync.
* ``apply(model)`` turns a built torchtitan ``Decoder`` (Llama 3, Qwen 3...) that uses the stock
  masks into one that runs ``tk.attention``: every FlexAttention / causal VarlenAttention inner
  attention becomes a ``TfkernelsAttention`` and ``model.get_attention_masks`` returns
  ``interval_mask(positions)``. Call it on the built model before ``parallelize``; the trainer keeps
  building masks through ``model.get_attention_masks`` since the model's config still names a masked
  backend. A model that builds its own masks (sliding windows, a hybrid model) is refused by name:
  give its layers ``TfkernelsAttention.Config()`` as ``inner_attention`` and its
  ``get_attention_masks`` the ``IntervalMask`` it needs.

Tested with torchtitan 0.3.0 on torch 2.13 (CPU): a tiny Llama 3 model runs its FlexAttention path
on a CPU forward only (FlexAttention has no CPU backward), so the tests compare the model's
outputs with that path and its gradients with SDPA on the dense form of torchtitan's own
``BlockMask``. Not supported: context parallelism (the ``BlockMask`` sharding in
``prepare_context_parallel_input``), FlexAttention ``score_mod``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    from torchtitan.models.common.attention import FlexAttention, VarlenAttention
    from torchtitan.models.common.decoder import Decoder
    from torchtitan.protocols.module import Module
except ImportError as error:
    raise ImportError(
        "tfkernels.integrations.torchtitan needs torchtitan (tested with 0.3.0): install it as its README says"
    ) from error

from .._checks import is_int_dtype
from ..attention import attention
from ..mask import IntervalMask, _describe

__all__ = ["TfkernelsAttention", "apply", "interval_mask"]


class TfkernelsAttention(Module):
    """torchtitan inner attention running ``tk.attention`` with an ``IntervalMask``."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        pass

    def __init__(self, config: Config):
        super().__init__()

    def forward(self, q_BLNH: torch.Tensor, k_BLNH: torch.Tensor, v_BLNH: torch.Tensor, *,
                attention_masks: IntervalMask, scale: float | None = None, enable_gqa: bool = False,
                score_mod=None, out_transform=None, **kwargs) -> torch.Tensor:
        """``[B, L, N, H]`` q, k, v (K/V with ``Hkv`` heads under GQA, whatever ``enable_gqa`` says) -> the
        output ``[B, L, N, H]``, or ``out_transform(out, lse [B, L, N])``."""
        if not isinstance(attention_masks, IntervalMask):
            raise TypeError(
                f"attention_masks: expected a tfkernels.IntervalMask (interval_mask(positions), or "
                f"model.get_attention_masks(positions) after tfkernels.integrations.torchtitan.apply(model)), "
                f"got {type(attention_masks).__name__}")
        if score_mod is not None:
            raise NotImplementedError("score_mod: FlexAttention score mods are not supported by tk.attention")
        if out_transform is None:
            return attention(q_BLNH, k_BLNH, v_BLNH, attention_masks, scale=scale)
        out, lse = attention(q_BLNH, k_BLNH, v_BLNH, attention_masks, scale=scale, return_lse=True)
        return out_transform(out, lse.transpose(1, 2))


def interval_mask(positions: torch.Tensor | None = None, *, document_ids: torch.Tensor | None = None,
                  image_ids: torch.Tensor | None = None) -> IntervalMask:
    """The ``IntervalMask`` of packed documents, causal within each document, blind across documents.

    Args:
        positions: int ``[B, S]``, torchtitan's per-token positions: a document starts at each 0 (as
            ``get_document_mask_mod`` reads them; tokens before a row's first 0 form one document).
        document_ids: int ``[B, S]`` instead of ``positions``: a run of equal ids is one document, a
            negative id marks padding (it sees nothing and is seen by nothing).
        image_ids: optional int ``[B, S]``: 0 for text, a run of equal non-zero ids inside a document is
            one image, bidirectional within itself (the Transfusion mask).

    Returns:
        ``IntervalMask`` ``[B, S]`` on the ids' device.
    """
    if (positions is None) == (document_ids is None):
        raise TypeError("interval_mask: pass positions (torchtitan's per-token positions) or document_ids, not both")
    if positions is not None:
        if not isinstance(positions, torch.Tensor) or positions.ndim != 2:
            error = ValueError if isinstance(positions, torch.Tensor) else TypeError
            raise error(f"positions: expected an int tensor [B, S], got {_describe(positions)}")
        if not is_int_dtype(positions.dtype):
            raise TypeError(f"positions: expected an integer dtype, got {positions.dtype}")
        document_ids = (positions == 0).cumsum(dim=1)
    return IntervalMask.from_segment_ids(document_ids, image_ids)


def apply(model: torch.nn.Module) -> torch.nn.Module:
    """Run a built torchtitan ``Decoder`` on ``tk.attention``, in place: its FlexAttention and causal
    VarlenAttention inner attentions become ``TfkernelsAttention``, and ``model.get_attention_masks(positions)``
    returns ``interval_mask(positions)`` (the same causal packed-document mask).

    Returns:
        ``model``.
    """
    if not isinstance(model, Decoder):
        raise TypeError(f"model: expected a built torchtitan Decoder (e.g. Llama3Model), got {type(model).__name__}")
    if type(model).get_attention_masks is not Decoder.get_attention_masks:
        raise NotImplementedError(
            f"model: {type(model).__name__} builds its own attention masks (get_attention_masks); give its layers "
            f"TfkernelsAttention.Config() as inner_attention and build its masks as IntervalMasks (interval_mask, "
            f"or an IntervalMask constructor)")
    swaps = []
    for name, module in model.named_modules():
        inner = getattr(module, "inner_attention", None)
        if inner is None or isinstance(inner, TfkernelsAttention):
            continue
        causal_varlen = isinstance(inner, VarlenAttention) and tuple(inner.window_size) == (-1, 0)
        if not (isinstance(inner, FlexAttention) or causal_varlen):
            detail = f" with window_size={inner.window_size}" if isinstance(inner, VarlenAttention) else ""
            raise NotImplementedError(f"{name}.inner_attention: {type(inner).__name__}{detail} is not replaced (only "
                                      f"FlexAttention and causal VarlenAttention, with the stock masks)")
        swaps.append(module)
    for module in swaps:
        module.inner_attention = TfkernelsAttention.Config().build()
    # An instance attribute: the trainer calls model.get_attention_masks(positions=...).
    model.get_attention_masks = interval_mask
    return model
