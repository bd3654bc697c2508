"""tfkernels.integrations.diffusers: tk.attention as diffusers' attention processors.

Tiny random-initialised diffusers transformers (no download, no network), float32, in eval mode (DiT's
label dropout is random in training mode; gradients flow either way). Their outputs and parameter
gradients with the tfkernels processors are compared with the default processors' in float64, within
the default processors' own float32 error (tfkernels.testing.assert_anchored), on the kernel path
(Triton's interpreter on a CPU) and on the reference path.
"""

import copy
import importlib.util

import pytest
import torch

from tests.support import DEVICE
from tfkernels.mask import IntervalMask, NotAnIntervalError
from tfkernels.testing import assert_anchored

from .support import (
    assert_grads_anchored,
    import_error_without,
    imports_of_tfkernels,
    run_readme_section,
    spy_on_attention,
)

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="needs diffusers: pip install -e '.[diffusers]'")

if HAS_DIFFUSERS:
    import diffusers
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttention

    from tfkernels.integrations import diffusers as tkd



@pytest.fixture
def tk_calls(monkeypatch):
    return spy_on_attention(monkeypatch, tkd)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# ----------------------------------------------------------------------------------------------
# Tiny models: (model, inputs)
# ----------------------------------------------------------------------------------------------
# PixArt-alpha's captions, padded to 10 tokens: 3 tokens, 10 tokens, and an empty caption (its padding bias
# is the same on every key, so it sees every key, as under the default processor).
CAPTION_LENGTHS = [3, 10, 0]


def caption_mask(lengths, seq_len):
    return (torch.arange(seq_len) < torch.tensor(lengths)[:, None]).long().to(DEVICE)


def tiny_pixart():
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=12, num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", use_additional_conditions=False,
    )
    batch = len(CAPTION_LENGTHS)
    # The padding holds large values: a processor that attended to it would be far off.
    captions = randn(batch, 10, 12, seed=2) * (1 + 9 * (1 - caption_mask(CAPTION_LENGTHS, 10)[..., None]))
    inputs = {"hidden_states": randn(batch, 4, 8, 8, seed=1), "encoder_hidden_states": captions,
              "encoder_attention_mask": caption_mask(CAPTION_LENGTHS, 10),
              "timestep": torch.tensor([10, 500, 999], device=DEVICE)}
    return model.to(DEVICE).eval(), inputs


def tiny_sd3():
    """Two joint blocks, the first with SD3.5's second (image-only) attention, the last context-pre-only."""
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=32, pooled_projection_dim=10, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    inputs = {"hidden_states": randn(2, 4, 8, 8, seed=1), "encoder_hidden_states": randn(2, 7, 12, seed=2),
              "pooled_projections": randn(2, 10, seed=3), "timestep": torch.tensor([10.0, 500.0], device=DEVICE)}
    return model.to(DEVICE).eval(), inputs


def tiny_flux():
    """One joint block and one single block, RoPE over (text, row, column) ids."""
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(4, 6, 6),
    )
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    image_ids = torch.stack([torch.zeros(16), rows.flatten(), cols.flatten()], -1).to(DEVICE)
    inputs = {"hidden_states": randn(2, 16, 8, seed=1), "encoder_hidden_states": randn(2, 5, 12, seed=2),
              "pooled_projections": randn(2, 10, seed=3), "timestep": torch.tensor([0.1, 0.7], device=DEVICE),
              "img_ids": image_ids, "txt_ids": torch.zeros(5, 3, device=DEVICE)}
    return model.to(DEVICE).eval(), inputs


def tiny_dit():
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10,
    )
    inputs = {"hidden_states": randn(2, 4, 8, 8, seed=1), "timestep": torch.tensor([10, 500], device=DEVICE),
              "class_labels": torch.tensor([1, 3], device=DEVICE)}
    return model.to(DEVICE).eval(), inputs


TINY_MODELS = {"pixart": tiny_pixart, "sd3": tiny_sd3, "flux": tiny_flux, "dit": tiny_dit}
# Attention modules per forward: PixArt 2 blocks x (self, cross); SD3 2 joint + 1 dual; Flux 1 joint + 1 single.
ATTENTION_CALLS = {"pixart": 4, "sd3": 3, "flux": 2, "dit": 2}


def sample_and_grads(model, inputs):
    """The model's output and every parameter's gradient of ``sum(output * weight)``, ``weight`` a fixed
    random tensor."""
    model.zero_grad(set_to_none=True)
    sample = model(**inputs).sample
    (sample.double() * randn(*sample.shape, seed=4).double()).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return sample.detach(), grads


def assert_matches_default(model, inputs):
    """tfkernels' output and parameter gradients against the default processors in float64, within their own
    float32 error. Applies the tfkernels processors to ``model``; returns its output."""
    model64 = copy.deepcopy(model).double()
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    ref64, grads64 = sample_and_grads(model64, inputs64)
    lowp, grads_lowp = sample_and_grads(model, inputs)
    tkd.apply(model)
    ours, grads = sample_and_grads(model, inputs)
    assert_anchored("sample", ours, ref64, lowp)
    assert_grads_anchored(grads, grads64, grads_lowp)
    return ours


# ----------------------------------------------------------------------------------------------
# Packaging
# ----------------------------------------------------------------------------------------------
def test_importing_tfkernels_does_not_import_diffusers():
    assert not imports_of_tfkernels("diffusers")


def test_the_diffusers_module_without_diffusers_names_the_extra():
    assert "pip install 'tfkernels[diffusers]'" in import_error_without("diffusers", "tfkernels.integrations.diffusers")


@needs_diffusers
def test_the_readme_section_runs():
    example = run_readme_section("Use with diffusers")
    assert example["latents"].shape == (2, 4, 8, 8) and torch.isfinite(example["latents"]).all()
    assert all(isinstance(p, tkd.TfkernelsAttnProcessor) for p in example["transformer"].attn_processors.values())


# ----------------------------------------------------------------------------------------------
# Whole models against the default processors
# ----------------------------------------------------------------------------------------------
@needs_diffusers
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_models_equal_the_default_processors_forward_and_backward(name, model_path, tk_calls):
    model, inputs = TINY_MODELS[name]()
    default = {type(m.processor) for m in model.modules() if hasattr(m, "processor")}
    assert default & set(tkd.PROCESSORS), default
    assert_matches_default(model, inputs)
    assert all(type(m.processor) in tkd.PROCESSORS.values() for m in model.modules() if hasattr(m, "processor"))
    assert len(tk_calls) == ATTENTION_CALLS[name]  # one forward; every attention module ran tk.attention


@needs_diffusers
def test_pixart_caption_padding_reaches_tk_attention_as_key_lengths(tk_calls, monkeypatch):
    """The cross-attention sees each caption's tokens (an empty caption: all of them, as the default
    processor's uniform bias does), its mask is converted once per forward, and the padding matters."""
    model, inputs = tiny_pixart()
    tkd.apply(model)
    conversions = []
    from_key_lengths = IntervalMask.from_key_lengths
    monkeypatch.setattr(IntervalMask, "from_key_lengths",
                        lambda *args, **kwargs: conversions.append(1) or from_key_lengths(*args, **kwargs))
    with torch.no_grad():
        padded = model(**inputs).sample
        unmasked = model(**{**inputs, "encoder_attention_mask": None}).sample
    self_masks, cross_masks = tk_calls[0:4:2], tk_calls[1:4:2]
    assert self_masks == [None, None]
    assert cross_masks[0] is cross_masks[1] and len(conversions) == 1
    assert cross_masks[0].kv_start.eq(0).all() and cross_masks[0].kv_end[:, 0].tolist() == [3, 10, 10]
    assert (padded[0] - unmasked[0]).abs().max() > 1e-2  # the first caption's padding is hidden
    assert torch.equal(padded[1:], unmasked[1:])  # a full caption, and an empty one that sees every key


@needs_diffusers
def test_a_pixart_pipeline_with_guidance_gives_the_default_latents(model_path, tk_calls):
    """PixArtAlphaPipeline's denoising loop (DDIM, classifier-free guidance: the batch holds the captions and
    the negative captions, each padded to its own length) around the swapped transformer."""
    model, _ = tiny_pixart()
    prompt = randn(2, 10, 12, seed=5)
    negative = randn(2, 10, 12, seed=6)
    latents = randn(2, 4, 8, 8, seed=7).double()
    results = {}
    for name, dtype in (("ref64", torch.float64), ("lowp", torch.float32), ("ours", torch.float32)):
        transformer = copy.deepcopy(model).to(dtype)
        if name == "ours":
            tkd.apply(transformer)
        pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                             scheduler=diffusers.DDIMScheduler())
        pipe.set_progress_bar_config(disable=True)
        results[name] = pipe(
            prompt_embeds=prompt.to(dtype), prompt_attention_mask=caption_mask([4, 10], 10),
            negative_prompt=None, negative_prompt_embeds=negative.to(dtype),
            negative_prompt_attention_mask=caption_mask([1, 7], 10), latents=latents.to(dtype),
            num_inference_steps=2, guidance_scale=4.5, height=64, width=64, use_resolution_binning=False,
            output_type="latent",
        ).images
    assert_anchored("latents", results["ours"], results["ref64"], results["lowp"])
    assert len(tk_calls) == 2 * 4  # two steps, four attention modules
    assert tk_calls[1].kv_end[:, 0].tolist() == [1, 7, 4, 10]  # negative captions first


# ----------------------------------------------------------------------------------------------
# Masks, one attention module at a time
# ----------------------------------------------------------------------------------------------
def cross_attention():
    torch.manual_seed(0)
    return Attention(query_dim=32, heads=2, dim_head=16, cross_attention_dim=24).to(DEVICE).eval()


def both_processors(module, *args, **kwargs):
    """The default processor's output in float64 and float32, and the tfkernels processor's in float32."""
    module64 = copy.deepcopy(module).double()
    args64 = [a.double() if a.is_floating_point() else a for a in args]
    kwargs64 = {k: v.double() if v is not None and v.is_floating_point() else v for k, v in kwargs.items()}
    ref64 = module64(*args64, **kwargs64)
    lowp = module(*args, **kwargs)
    tkd.apply(module)
    return module(*args, **kwargs), ref64, lowp


@needs_diffusers
@pytest.mark.parametrize("form", ["bool right padding", "bool left padding", "additive 3D", "per query"])
def test_attention_masks_read_as_sdpa_reads_them(form, tk_calls):
    module = cross_attention()
    x, context = randn(2, 6, 32, seed=1), randn(2, 9, 24, seed=2)
    keys = torch.arange(9, device=DEVICE)
    if form == "bool right padding":
        mask = keys < torch.tensor([[5], [9]], device=DEVICE)  # [B, Sk]
    elif form == "bool left padding":
        mask = keys >= torch.tensor([[3], [0]], device=DEVICE)
    elif form == "additive 3D":
        mask = torch.where(keys < torch.tensor([[4], [7]], device=DEVICE), 0.0, -10000.0)[:, None]  # [B, 1, Sk]
    else:  # [B, Sq, Sk]: query i sees keys [i, i + 4)
        rows = torch.arange(6, device=DEVICE)[:, None]
        mask = ((keys >= rows) & (keys < rows + 4)).expand(2, 6, 9)
    ours, ref64, lowp = both_processors(module, x, encoder_hidden_states=context, attention_mask=mask)
    assert_anchored(form, ours, ref64, lowp)
    dense = (mask if mask.dtype == torch.bool else mask == 0)
    dense = dense.expand(2, 6, 9) if dense.ndim == 3 else dense[:, None].expand(2, 6, 9)
    assert torch.equal(tk_calls[0].to_dense(), dense)


@needs_diffusers
def test_a_bfloat16_padding_bias_hides_its_keys(tk_calls):
    """PixArt's bias in a bfloat16 model: -10000 rounds to -9984, still a hidden key."""
    module = tkd.apply(cross_attention())
    bias = (1 - caption_mask([4, 9], 9).to(torch.bfloat16)) * -10000.0
    assert bias.min().item() == -9984.0
    module(randn(2, 6, 32, seed=1), encoder_hidden_states=randn(2, 9, 24, seed=2), attention_mask=bias[:, None])
    assert tk_calls[0].kv_end[:, 0].tolist() == [4, 9]


@needs_diffusers
def test_unet_style_attention_over_feature_maps():
    """[B, C, H, W] input with a group norm, a residual connection and an output rescale (a VAE's or a
    UNet's mid-block attention)."""
    torch.manual_seed(0)
    module = Attention(query_dim=32, heads=2, dim_head=16, norm_num_groups=4, residual_connection=True,
                       rescale_output_factor=2.0, bias=True).to(DEVICE).eval()
    ours, ref64, lowp = both_processors(module, randn(2, 32, 3, 5, seed=1))
    assert ours.shape == (2, 32, 3, 5)
    assert_anchored("feature map", ours, ref64, lowp)


@needs_diffusers
def test_caption_padding_inside_the_keys_runs_as_a_mask_with_holes(tk_calls):
    """A key hidden from every query in the middle of the caption (a padding token between two texts) is a hole
    one query interval per key expresses: tk.attention runs it and equals the default processor."""
    x, context = randn(2, 6, 32, seed=1), randn(2, 9, 24, seed=2)
    hole = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    hole[1, 4] = False
    ours, ref64, lowp = both_processors(cross_attention(), x, encoder_hidden_states=context, attention_mask=hole)
    assert_anchored("out", ours, ref64, lowp)
    assert tk_calls[0].has_holes and tk_calls[0].key_q_end[1, 4] == tk_calls[0].key_q_start[1, 4]


@needs_diffusers
def test_masks_tk_attention_cannot_take_raise_by_name():
    module = tkd.apply(cross_attention())
    x, context = randn(2, 6, 32, seed=1), randn(2, 9, 24, seed=2)
    keys, rows = torch.arange(9, device=DEVICE), torch.arange(6, device=DEVICE)[:, None]
    backwards = ((keys >= rows) & (keys < rows + 4)).expand(2, 6, 9).clone()  # query i sees keys [i, i + 4)
    backwards[1, 2, 0] = True  # query 2 also sees key 0, which query 1 does not: the rows' starts decrease
    with pytest.raises(NotAnIntervalError, match="batch row 1, query 2"):
        module(x, encoder_hidden_states=context, attention_mask=backwards)
    bias = torch.zeros(2, 1, 9, device=DEVICE)
    bias[0, 0, 2] = -1.0
    with pytest.raises(NotImplementedError, match="holds biases"):
        module(x, encoder_hidden_states=context, attention_mask=bias)
    with pytest.raises(NotImplementedError, match="a mask per head"):
        module(x, encoder_hidden_states=context, attention_mask=torch.ones(4, 1, 9, device=DEVICE))
    with pytest.raises(ValueError, match=r"expected 9 keys in its last dimension .* shape \(2, 7\)"):
        module(x, encoder_hidden_states=context, attention_mask=torch.ones(2, 7, device=DEVICE))


@needs_diffusers
def test_flux_attention_masks(tk_calls):
    """The dispatcher's [B, Sk] key mask on a joint block (hidden image keys at the end: one interval), a
    per-head mask, and caption padding in the middle of the joint [text, image] keys (a mask with holes)."""
    torch.manual_seed(0)
    module = FluxAttention(query_dim=32, heads=2, dim_head=16, added_kv_proj_dim=32, context_pre_only=False,
                           bias=True).to(DEVICE).eval()
    x, context = randn(2, 8, 32, seed=1), randn(2, 5, 32, seed=2)
    keys = torch.arange(13, device=DEVICE)
    mask = keys < torch.tensor([[10], [13]], device=DEVICE)
    (ours, ours_context), (ref64, ref64_context), (lowp, lowp_context) = both_processors(
        module, x, encoder_hidden_states=context, attention_mask=mask)
    assert_anchored("image tokens", ours, ref64, lowp)
    assert_anchored("text tokens", ours_context, ref64_context, lowp_context)
    assert tk_calls[0].kv_end[:, 0].tolist() == [10, 13]
    with pytest.raises(NotImplementedError, match="a mask per head"):
        module(x, encoder_hidden_states=context, attention_mask=mask[:, None, None].expand(2, 2, 1, 13))
    caption_padding = torch.ones(2, 13, dtype=torch.bool, device=DEVICE)
    caption_padding[0, 3:5] = False  # hidden from every query: a mask with holes
    tk_calls.clear()
    module = FluxAttention(query_dim=32, heads=2, dim_head=16, added_kv_proj_dim=32, context_pre_only=False,
                           bias=True).to(DEVICE).eval()
    (ours, ours_context), (ref64, ref64_context), (lowp, lowp_context) = both_processors(
        module, x, encoder_hidden_states=context, attention_mask=caption_padding)
    assert_anchored("image tokens", ours, ref64, lowp)
    assert_anchored("text tokens", ours_context, ref64_context, lowp_context)
    assert tk_calls[0].has_holes


# ----------------------------------------------------------------------------------------------
# apply
# ----------------------------------------------------------------------------------------------
@needs_diffusers
def test_an_unknown_processor_raises_naming_the_supported_ones_or_stays_with_fallback():
    model, _ = tiny_pixart()
    model.transformer_blocks[1].attn2.set_processor(AttnProcessor())  # the eager processor
    with pytest.raises(tkd.UnsupportedProcessorError,
                       match=r"transformer_blocks.1.attn2: processor AttnProcessor has no tfkernels replacement "
                             r"\(supported: AttnProcessor2_0, JointAttnProcessor2_0, FluxAttnProcessor\); "
                             r"apply\(model, fallback=True\)"):
        tkd.apply(model)
    processors = {name: type(p) for name, p in model.attn_processors.items()}
    assert processors["transformer_blocks.0.attn1.processor"] is AttnProcessor2_0  # nothing was replaced
    assert tkd.apply(model, fallback=True) is model
    processors = {name: type(p) for name, p in model.attn_processors.items()}
    assert processors.pop("transformer_blocks.1.attn2.processor") is AttnProcessor
    assert set(processors.values()) == {tkd.TfkernelsAttnProcessor}
    ours = model.transformer_blocks[0].attn1.processor
    tkd.apply(model, fallback=True)
    assert model.transformer_blocks[0].attn1.processor is ours  # applying twice changes nothing


@needs_diffusers
def test_apply_arguments():
    with pytest.raises(TypeError, match=r"a pipeline: pass its pipe.transformer"):
        tkd.apply(diffusers.DDIMPipeline(unet=None, scheduler=diffusers.DDIMScheduler()))
    with pytest.raises(ValueError, match="Linear holds no diffusers attention module"):
        tkd.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="fallback: expected a bool"):
        tkd.apply(cross_attention(), fallback="sdpa")


@needs_diffusers
def test_context_parallelism_is_refused():
    model, inputs = tiny_flux()
    model.single_transformer_blocks[0].attn.processor._parallel_config = object()
    with pytest.raises(NotImplementedError, match="single_transformer_blocks.0.attn: context parallelism"):
        tkd.apply(model)
    model, inputs = tiny_flux()
    tkd.apply(model)
    assert isinstance(model.transformer_blocks[0].attn.processor, tkd.TfkernelsFluxAttnProcessor)
    model.transformer_blocks[0].attn.processor._parallel_config = object()  # what enable_parallelism sets
    with pytest.raises(NotImplementedError, match="context parallelism"), torch.no_grad():
        model(**inputs)
