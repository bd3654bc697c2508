"""diffusers attention processors that run ``tk.attention``: ``apply(model)``.

diffusers' attention modules (``Attention``, ``FluxAttention``...) hand their work to a processor,
``module.set_processor(processor)``; ``apply(model)`` gives every attention module of a model a
processor that computes what its default one does, with ``tk.attention`` in place of SDPA:

=========================  =====================================  =========================================
replaced                   used by                                tfkernels processor
=========================  =====================================  =========================================
``AttnProcessor2_0``       PixArt-alpha/sigma, DiT, UNets          ``TfkernelsAttnProcessor``: self- and
                                                                  cross-attention, ``attention_mask``
``JointAttnProcessor2_0``  SD3, SD3.5 (joint and dual blocks)     ``TfkernelsJointAttnProcessor``
``FluxAttnProcessor``      Flux (joint and single blocks)         ``TfkernelsFluxAttnProcessor``: RoPE,
                                                                  ``attention_mask``
=========================  =====================================  =========================================

Tested with diffusers 0.42.1. The processors take q/k/v as views in ``tk.attention``'s
``[B, S, H, D]`` layout (the projections' own layout: no transpose, no copy) and use the default
scale ``1 / sqrt(D)``, as the processors they replace do.

Masks
-----
PixArt-alpha pads captions to the longest and passes ``encoder_attention_mask`` ([B, Sk], 1 for a
caption token), which the model turns into an additive bias ``(1 - mask) * -10000`` for the
cross-attention. The processors read a mask as SDPA does: a bool mask hides ``False`` keys; an
additive mask hides keys whose value is ``-10000`` or lower (their softmax weight is ``exp(-10000)``
relative to a visible key's: zero in every float dtype; bfloat16 rounds it to -9984) and keeps keys
at 0; any other value is a bias that one key interval per query cannot carry
(``NotImplementedError``). A mask with one row of keys per batch row (``[B, Sk]``, ``[B, 1, Sk]``,
``[B, 1, 1, Sk]``) whose visible keys are a prefix becomes ``IntervalMask.from_key_lengths``; any
other mask goes through ``IntervalMask.from_dense``: keys hidden inside a row's interval (Flux's text
padding in the middle of its joint [text, image] sequence) give a mask with holes, and a mask that is
not an interval mask raises ``NotAnIntervalError`` naming the first (batch row, query) that breaks
it. A row whose keys all carry the same finite bias (an empty caption under PixArt's bias) sees
every key, as under SDPA, where the bias cancels in the softmax; a row of a bool or ``-inf`` mask
that sees no key outputs zeros (SDPA: NaN). Each mask
tensor is converted once per forward (every block gets the same tensor), with one host sync.

``JointAttnProcessor2_0`` ignores ``attention_mask``, and so does its replacement.

Not supported
-------------
Other processors (xFormers, fused QKV, IP-adapter, LoRA-era and NPU/XLA processors, a model's own):
``apply`` raises ``UnsupportedProcessorError`` naming the module and the supported processors, or
leaves them as they are with ``fallback=True``. Per-head masks (``[B * heads, ...]``), a mask whose
key count differs from the keys' (``AttnProcessor2_0`` pads it with visible keys) and context
parallelism (``enable_parallelism``) raise ``NotImplementedError`` / ``ValueError``.
"""

from __future__ import annotations

import torch

try:
    from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections
except ImportError as error:
    raise ImportError(
        "tfkernels.integrations.diffusers needs diffusers >= 0.35: pip install 'tfkernels[diffusers]'"
    ) from error

from ..attention import attention
from ..mask import IntervalMask
from ._converted import ConvertedMasks

__all__ = ["TfkernelsAttnProcessor", "TfkernelsFluxAttnProcessor", "TfkernelsJointAttnProcessor",
           "UnsupportedProcessorError", "apply"]

# An additive mask value at or below this hides its key (diffusers' padding bias is -10000).
HIDDEN_BIAS = -10000.0


class UnsupportedProcessorError(TypeError):
    """``apply`` met an attention processor it has no tfkernels replacement for."""


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
# Every block of a forward gets the same mask tensor: each is converted once.
_converted = ConvertedMasks()


@torch.compiler.disable
def _interval_mask(mask: torch.Tensor, batch_size: int, seq_len_q: int, seq_len_k: int) -> IntervalMask:
    """The IntervalMask of ``mask`` ``[1 or B, 1 or Sq, Sk]`` (bool, or additive with 0 visible), as SDPA
    reads it, for ``batch_size`` rows of ``seq_len_q`` queries."""
    key = (batch_size, seq_len_q)
    known, converted = _converted.lookup(mask, key)
    if known:
        return converted
    if mask.dtype == torch.bool:
        visible = mask
    else:
        visible = mask == 0
        # -10000 as the mask's dtype holds it (bfloat16: -9984).
        hidden_bias = torch.tensor(HIDDEN_BIAS, dtype=mask.dtype).item()
        if not bool((visible | (mask <= hidden_bias)).all()):
            raise NotImplementedError(
                f"attention_mask: an additive mask holds biases (values other than 0 and {hidden_bias:g} or "
                f"lower); tk.attention takes only which keys each query sees")
        # One finite bias on every key of a row cancels in SDPA's softmax: the row sees every key.
        uniform = (mask == mask[..., :1]).all(-1, keepdim=True) & mask[..., :1].isfinite()
        visible = visible | uniform
    visible = visible.expand(batch_size, -1, seq_len_k)
    converted = None
    if visible.shape[1] == 1:  # one row of keys per batch row: padding
        lengths = visible[:, 0].sum(-1)
        if bool((visible[:, 0] == (torch.arange(seq_len_k, device=mask.device) < lengths[:, None])).all()):
            converted = IntervalMask.from_key_lengths(lengths, seq_len_q, seq_len_k)
    if converted is None:
        converted = IntervalMask.from_dense(visible.expand(batch_size, seq_len_q, seq_len_k))
    _converted.remember(mask, converted, key)
    return converted


def _check_keys(mask: torch.Tensor, seq_len_k: int) -> None:
    if mask.shape[-1] != seq_len_k:
        raise ValueError(f"attention_mask: expected {seq_len_k} keys in its last dimension (the keys' count), got "
                         f"shape {tuple(mask.shape)}")


def _processor_mask(mask, attn, batch_size: int, seq_len_q: int, seq_len_k: int) -> IntervalMask | None:
    """``AttnProcessor2_0``'s reading of ``attention_mask`` (``Attention.prepare_attention_mask``):
    ``[B, Sk]`` or ``[B, 1 or Sq, Sk]``, the same for every head."""
    if mask is None:
        return None
    _check_keys(mask, seq_len_k)
    queries_ok = mask.ndim == 2 or (mask.ndim == 3 and mask.shape[1] in (1, seq_len_q))
    if mask.shape[0] != batch_size or not queries_ok:
        if mask.shape[0] == batch_size * attn.heads and attn.heads > 1:
            raise NotImplementedError(f"attention_mask: a mask per head (shape {tuple(mask.shape)}, batch * heads "
                                      f"rows) is not supported; tk.attention takes one mask for all heads")
        raise ValueError(f"attention_mask: expected [B, Sk] or [B, 1 or Sq, Sk] with B={batch_size}, Sq={seq_len_q}, "
                         f"Sk={seq_len_k}, got shape {tuple(mask.shape)}")
    return _interval_mask(mask if mask.ndim == 3 else mask[:, None], batch_size, seq_len_q, seq_len_k)


def _sdpa_mask(mask, batch_size: int, seq_len_q: int, seq_len_k: int) -> IntervalMask | None:
    """diffusers' attention dispatcher's reading of ``attn_mask``: ``[B, Sk]`` (the keys of each row), or
    SDPA's ``[1 or B, 1, 1 or Sq, Sk]``, the same for every head."""
    if mask is None:
        return None
    _check_keys(mask, seq_len_k)
    if mask.ndim == 2 and mask.shape[0] == batch_size:
        return _interval_mask(mask[:, None], batch_size, seq_len_q, seq_len_k)
    if mask.ndim == 4 and mask.shape[0] in (1, batch_size) and mask.shape[2] in (1, seq_len_q):
        if mask.shape[1] != 1:
            raise NotImplementedError(f"attention_mask: a mask per head (shape {tuple(mask.shape)}) is not "
                                      f"supported; tk.attention takes one mask for all heads")
        return _interval_mask(mask[:, 0], batch_size, seq_len_q, seq_len_k)
    raise ValueError(f"attention_mask: expected [B, Sk] or [1 or B, 1, 1 or Sq, Sk] with B={batch_size}, "
                     f"Sq={seq_len_q}, Sk={seq_len_k}, got shape {tuple(mask.shape)}")


# ----------------------------------------------------------------------------------------------
# Processors
# ----------------------------------------------------------------------------------------------
def _heads(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch_size: int):
    """Projected ``[B, S, H * D]`` q, k, v as ``[B, S, H, D]`` (tk.attention's layout), q and k through the
    module's norms (they act on the head dim, the last one in either layout); and D."""
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch_size, -1, attn.heads, head_dim) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim


class TfkernelsAttnProcessor:
    """``AttnProcessor2_0`` on ``tk.attention``: self-attention, and cross-attention to
    ``encoder_hidden_states`` with an optional ``attention_mask`` (PixArt-alpha's caption padding)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        batch_size = encoder_hidden_states.shape[0]
        query, key, value, head_dim = _heads(attn, query, key, value, batch_size)
        mask = _processor_mask(attention_mask, attn, batch_size, query.shape[1], key.shape[1])

        hidden_states = attention(query, key, value, mask)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class TfkernelsJointAttnProcessor:
    """``JointAttnProcessor2_0`` on ``tk.attention``: SD3's joint attention over the image tokens followed
    by the context tokens (its dual-attention blocks' second attention: the image tokens alone).
    ``attention_mask`` is ignored, as the processor it replaces ignores it."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None):
        batch_size, image_tokens = hidden_states.shape[:2]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        query, key, value, head_dim = _heads(attn, query, key, value, batch_size)

        if encoder_hidden_states is not None:
            context = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                       attn.add_v_proj(encoder_hidden_states))
            context_query, context_key, context_value = (t.view(batch_size, -1, attn.heads, head_dim) for t in context)
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            query = torch.cat([query, context_query], dim=1)
            key = torch.cat([key, context_key], dim=1)
            value = torch.cat([value, context_value], dim=1)

        hidden_states = attention(query, key, value)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_tokens], hidden_states[:, image_tokens:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class TfkernelsFluxAttnProcessor:
    """``FluxAttnProcessor`` on ``tk.attention``: Flux's joint blocks (context tokens, then image tokens)
    and single blocks, with RoPE on q and k and an optional ``attention_mask``."""

    # diffusers' enable_parallelism sets this on the processors that have it: context parallelism is refused
    # here rather than computed on one rank's keys.
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        if self._parallel_config is not None:
            raise NotImplementedError(_PARALLELISM)
        query, key, value, context_query, context_key, context_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        # By head_dim, not heads: a tensor-parallel rank holds a slice of the heads.
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            context_query, context_key, context_value = (
                t.unflatten(-1, (-1, attn.head_dim)) for t in (context_query, context_key, context_value))
            context_query = attn.norm_added_q(context_query)
            context_key = attn.norm_added_k(context_key)
            query = torch.cat([context_query, query], dim=1)
            key = torch.cat([context_key, key], dim=1)
            value = torch.cat([context_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        mask = _sdpa_mask(attention_mask, query.shape[0], query.shape[1], key.shape[1])
        hidden_states = attention(query, key, value, mask).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        context_tokens = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [context_tokens, hidden_states.shape[1] - context_tokens], dim=1)
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


_PARALLELISM = ("context parallelism (enable_parallelism) is not supported: tk.attention would see only this "
                "rank's keys")

# diffusers' default processor -> its tfkernels replacement. Exact types: a subclass may compute something else.
PROCESSORS = {
    AttnProcessor2_0: TfkernelsAttnProcessor,
    JointAttnProcessor2_0: TfkernelsJointAttnProcessor,
    FluxAttnProcessor: TfkernelsFluxAttnProcessor,
}


# ----------------------------------------------------------------------------------------------
# apply
# ----------------------------------------------------------------------------------------------
def apply(model: torch.nn.Module, *, fallback: bool = False) -> torch.nn.Module:
    """Give every attention module of a diffusers ``model`` (a transformer, a UNet...) the tfkernels
    processor that replaces its processor (``PROCESSORS``), in place.

    Args:
        model: a ``torch.nn.Module`` holding diffusers attention modules (``pipe.transformer``, not the
            pipeline). A module that already has a tfkernels processor is left as it is.
        fallback: ``False``: a processor with no tfkernels replacement raises
            ``UnsupportedProcessorError`` before any processor is replaced. ``True``: it is left as it is.

    Returns:
        ``model``.
    """
    if not isinstance(model, torch.nn.Module):
        hint = " (a pipeline: pass its pipe.transformer or pipe.unet)" if hasattr(model, "components") else ""
        raise TypeError(f"model: expected a torch.nn.Module{hint}, got {type(model).__name__}")
    if not isinstance(fallback, bool):
        raise TypeError(f"fallback: expected a bool, got {fallback!r}")
    ours = tuple(PROCESSORS.values())
    replacements, found = [], False
    for name, module in model.named_modules():
        if not hasattr(module, "processor") or not callable(getattr(module, "set_processor", None)):
            continue
        found = True
        processor = module.processor
        if isinstance(processor, ours):
            continue
        replacement = PROCESSORS.get(type(processor))
        if replacement is None:
            if fallback:
                continue
            supported = ", ".join(cls.__name__ for cls in PROCESSORS)
            raise UnsupportedProcessorError(
                f"{name or type(model).__name__}: processor {type(processor).__name__} has no tfkernels replacement "
                f"(supported: {supported}); apply(model, fallback=True) leaves such processors as they are")
        if getattr(processor, "_parallel_config", None) is not None:
            raise NotImplementedError(f"{name}: {_PARALLELISM}")
        replacements.append((module, replacement))
    if not found:
        raise ValueError(f"model: {type(model).__name__} holds no diffusers attention module (a module with a "
                         f"processor and set_processor)")
    for module, replacement in replacements:
        module.set_processor(replacement())
    return model
