"""tfkernels.integrations.torchtitan: tk.attention as torchtitan's inner attention.

A tiny torchtitan Llama 3 (random weights, float32) on packed documents, against its own FlexAttention
path. FlexAttention runs eagerly here (``flex_attention`` and ``create_block_mask`` uncompiled: the same
function as torchtitan's compiled calls, without a CPU compile per test) and has no backward on a CPU, so
gradients are compared with SDPA on the dense form of torchtitan's own BlockMask, in float64, within
float32 SDPA's error (tfkernels.testing.assert_anchored); both tfkernels paths (the Triton interpreter and
the reference).
"""

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from tests.support import DEVICE
from tfkernels.mask import IntervalMask
from tfkernels.testing import assert_anchored

from .support import (
    assert_grads_anchored,
    import_error_without,
    run_readme_section,
    spy_on_attention,
)

HAS_TORCHTITAN = importlib.util.find_spec("torchtitan") is not None
needs_torchtitan = pytest.mark.skipif(not HAS_TORCHTITAN, reason="needs torchtitan (tested with 0.3.0)")

if HAS_TORCHTITAN:
    from torch.nn.attention.flex_attention import and_masks, create_block_mask, create_mask, flex_attention
    from torchtitan.models import llama3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common import attention as titan_attention
    from torchtitan.models.common import decoder as titan_decoder

    from tfkernels.integrations import torchtitan as tkt


# Two rows of 16 tokens packed from documents of 5, 4 and 7 tokens, and of 12 and 4 tokens.
DOCUMENTS = [[5, 4, 7], [12, 4]]


def packed_positions(documents=DOCUMENTS):
    return torch.tensor([[p for length in row for p in range(length)] for row in documents], device=DEVICE)


@pytest.fixture
def eager_flex(monkeypatch):
    """torchtitan's FlexAttention with the uncompiled flex_attention and create_block_mask."""
    monkeypatch.setattr(titan_attention.FlexAttention, "_compiled_flex_attn", flex_attention)
    monkeypatch.setattr(titan_decoder, "create_attention_mask", create_block_mask)


@pytest.fixture
def tk_calls(monkeypatch):
    return spy_on_attention(monkeypatch, tkt)


class SDPAOnBlockMask(torch.nn.Module):
    """An inner attention that runs SDPA on the dense form of a FlexAttention BlockMask's mask_mod."""

    def forward(self, q, k, v, *, attention_masks, scale=None, enable_gqa=False, **kwargs):
        batch_size, seq_len = q.shape[:2]
        dense = create_mask(attention_masks.mask_mod, batch_size, 1, seq_len, seq_len, device=q.device)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=dense, scale=scale, enable_gqa=enable_gqa)
        return out.transpose(1, 2)


def tiny_llama3(attn_backend="flex"):
    """Two layers, 4 query heads on 2 KV heads (GQA), head dim 16, fused QKV projection."""
    dim, heads = 64, 4
    config = llama3.Llama3Model.Config(
        dim=dim, vocab_size=64,
        tok_embeddings=Embedding.Config(num_embeddings=64, embedding_dim=dim, param_init=llama3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=llama3._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=64, param_init=llama3._output_linear_init(dim)),
        layers=llama3._build_llama3_layers(
            n_layers=2, dim=dim, n_heads=heads, n_kv_heads=2, hidden_dim=128, attn_backend=attn_backend,
            rope=ComplexRoPE.Config(dim=dim // heads, max_seq_len=64, theta=10000, scaling="none"),
        ),
    )
    torch.manual_seed(0)
    model = config.build()
    model.init_states()
    return model.to(DEVICE)


def inner_attentions(model):
    return [layer.attention.inner_attention for layer in model.layers.values()]


def logits_and_grads(model, tokens, positions, masks):
    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions=positions, attention_masks=masks)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (logits.double() * weight.to(DEVICE)).sum().backward()
    return logits.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------
# Packaging
# ----------------------------------------------------------------------------------------------
def test_the_torchtitan_module_without_torchtitan_says_so():
    assert "needs torchtitan" in import_error_without("torchtitan", "tfkernels.integrations.torchtitan")


@needs_torchtitan
def test_the_readme_section_runs():
    example = run_readme_section("Use with torchtitan")
    assert example["logits"].shape == (1, 12, 2048) and torch.isfinite(example["logits"]).all()
    assert all(isinstance(inner, tkt.TfkernelsAttention) for inner in inner_attentions(example["model"]))


# ----------------------------------------------------------------------------------------------
# The mask builder against torchtitan's mask mods
# ----------------------------------------------------------------------------------------------
@needs_torchtitan
@pytest.mark.parametrize("documents", [DOCUMENTS, [[16]], [[1, 1, 14]]], ids=["packed", "one", "one-token"])
def test_interval_mask_equals_torchtitans_document_masks(documents):
    """Causal + packed documents: torchtitan's generic document mask and its efficient packed mask (whose
    batch-1 and batch > 1 forms differ) give the same dense mask as interval_mask(positions)."""
    positions = packed_positions(documents)
    batch_size, seq_len = positions.shape
    ours = tkt.interval_mask(positions).to_dense()
    causal = titan_attention.get_causal_mask_mod()
    for mask_mod in (titan_attention.get_document_mask_mod(positions),
                     titan_attention.get_efficient_causal_mask_mod_for_packed_document(positions)):
        theirs = create_mask(and_masks(causal, mask_mod), batch_size, 1, seq_len, seq_len, device=DEVICE)[:, 0]
        assert torch.equal(ours, theirs)
    for row in range(batch_size):  # the batch-1 form of the efficient mask
        one_row = titan_attention.get_efficient_causal_mask_mod_for_packed_document(positions[row : row + 1])
        theirs = create_mask(and_masks(causal, one_row), 1, 1, seq_len, seq_len, device=DEVICE)[0, 0]
        assert torch.equal(ours[row], theirs)


def transfusion_mask_mod(document_ids, image_ids):
    """Same document, and causal or within the same image."""

    def mask_mod(b, h, q_idx, kv_idx):
        same_document = document_ids[b, q_idx] == document_ids[b, kv_idx]
        same_image = (image_ids[b, q_idx] != 0) & (image_ids[b, q_idx] == image_ids[b, kv_idx])
        return same_document & ((kv_idx <= q_idx) | same_image)

    return mask_mod


def transfusion_batch():
    """DOCUMENTS' rows with images: two in the first document (one of one token), one at the end of a
    document, one filling the second row's last document."""
    positions = packed_positions()
    image_ids = torch.zeros_like(positions)
    for row, start, end, image in ((0, 1, 3, 1), (0, 4, 5, 2), (0, 12, 16, 3), (1, 12, 16, 1)):
        image_ids[row, start:end] = image
    return positions, image_ids


@needs_torchtitan
def test_interval_mask_with_images_is_the_transfusion_mask():
    positions, image_ids = transfusion_batch()
    document_ids = (positions == 0).cumsum(1)
    theirs = create_mask(transfusion_mask_mod(document_ids, image_ids), 2, 1, 16, 16, device=DEVICE)[:, 0]
    assert torch.equal(tkt.interval_mask(positions, image_ids=image_ids).to_dense(), theirs)
    assert torch.equal(tkt.interval_mask(document_ids=document_ids, image_ids=image_ids).to_dense(), theirs)


@needs_torchtitan
def test_interval_mask_arguments():
    positions = packed_positions()
    padded = (positions == 0).cumsum(1)
    padded[1, 12:] = -1  # the second row's last document is padding
    mask = tkt.interval_mask(document_ids=padded)
    assert (mask.kv_start[1, 12:] == mask.kv_end[1, 12:]).all()
    with pytest.raises(TypeError, match="pass positions .* or document_ids, not both"):
        tkt.interval_mask()
    with pytest.raises(TypeError, match="pass positions .* or document_ids, not both"):
        tkt.interval_mask(positions, document_ids=padded)
    with pytest.raises(TypeError, match="positions: expected an integer dtype, got torch.float32"):
        tkt.interval_mask(positions.float())
    with pytest.raises(ValueError, match=r"positions: expected an int tensor \[B, S\]"):
        tkt.interval_mask(positions[0])


# ----------------------------------------------------------------------------------------------
# The inner attention on its own
# ----------------------------------------------------------------------------------------------
@needs_torchtitan
def test_the_inner_attention_equals_flex_attention_with_its_lse(model_path, eager_flex):
    """GQA q/k/v in torchtitan's [B, L, N, H] layout, an out_transform that gets (out, lse [B, L, N])."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 16, heads, 16, generator=gen).to(DEVICE) for heads in (4, 2, 2))
    positions = packed_positions()
    mask_mod = and_masks(titan_attention.get_causal_mask_mod(),
                         titan_attention.get_efficient_causal_mask_mod_for_packed_document(positions))
    block_mask = create_block_mask(mask_mod, 2, None, 16, 16, device=DEVICE)
    flex = titan_attention.FlexAttention(titan_attention.FlexAttention.Config())
    ours = tkt.TfkernelsAttention.Config().build()

    def both(out, lse):
        return out, lse

    results = {}
    for name, dtype in (("ref64", torch.float64), ("lowp", torch.float32)):
        results[name] = flex(q.to(dtype), k.to(dtype), v.to(dtype), attention_masks=block_mask, scale=0.3,
                             enable_gqa=True, out_transform=both)
    mask = tkt.interval_mask(positions)
    out, lse = ours(q, k, v, attention_masks=mask, scale=0.3, out_transform=both)
    assert_anchored("out", out, results["ref64"][0], results["lowp"][0])
    assert_anchored("lse", lse, results["ref64"][1], results["lowp"][1])
    out = ours(q, k, v, attention_masks=mask, scale=0.3, enable_gqa=True)
    assert_anchored("out without out_transform", out, results["ref64"][0], results["lowp"][0])


@needs_torchtitan
def test_the_inner_attention_refuses_what_it_cannot_run():
    ours = tkt.TfkernelsAttention.Config().build()
    q = torch.randn(1, 4, 2, 16, device=DEVICE)
    block_mask = create_block_mask(titan_attention.get_causal_mask_mod(), 1, None, 4, 4, device=DEVICE)
    with pytest.raises(TypeError, match="attention_masks: expected a tfkernels.IntervalMask .* got BlockMask"):
        ours(q, q, q, attention_masks=block_mask)
    with pytest.raises(TypeError, match="got NoneType"):
        ours(q, q, q, attention_masks=None)
    with pytest.raises(NotImplementedError, match="score_mod"):
        ours(q, q, q, attention_masks=IntervalMask.causal(1, 4, device=DEVICE), score_mod=lambda s, *_: s)


# ----------------------------------------------------------------------------------------------
# A tiny Llama 3
# ----------------------------------------------------------------------------------------------
@needs_torchtitan
@pytest.mark.parametrize("masks", ["documents", "transfusion"])
def test_tiny_llama3_equals_its_flex_attention_path(masks, model_path, eager_flex, tk_calls):
    """Logits equal the model's own FlexAttention path; logits and gradients equal SDPA on the same mask in
    float64 within float32 SDPA's error. "documents": apply(model) and the model's get_attention_masks;
    "transfusion": TfkernelsAttention with interval_mask(positions, image_ids=...) given to forward."""
    model = tiny_llama3()
    positions, image_ids = transfusion_batch()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    if masks == "documents":
        block_mask = model.get_attention_masks(positions)  # torchtitan's own
    else:
        document_ids = (positions == 0).cumsum(1)
        block_mask = create_block_mask(transfusion_mask_mod(document_ids, image_ids), 2, None, 16, 16, device=DEVICE)
    with torch.no_grad():
        flex = model(tokens, positions=positions, attention_masks=block_mask)
    reference = {}
    for name in ("ref64", "lowp"):
        sdpa_model = copy.deepcopy(model)
        if name == "ref64":
            sdpa_model.double()  # floating-point tensors only: RoPE's complex table stays as it is
        for layer in sdpa_model.layers.values():
            layer.attention.inner_attention = SDPAOnBlockMask()
        reference[name] = logits_and_grads(sdpa_model, tokens, positions, block_mask)
    (ref64, grads64), (lowp, grads_lowp) = reference["ref64"], reference["lowp"]
    assert_anchored("flex path", flex, ref64, lowp)

    if masks == "documents":
        assert tkt.apply(model) is model
        mask = model.get_attention_masks(positions=positions)
    else:
        for layer in model.layers.values():
            layer.attention.inner_attention = tkt.TfkernelsAttention.Config().build()
        mask = tkt.interval_mask(positions, image_ids=image_ids)
    assert all(isinstance(inner, tkt.TfkernelsAttention) for inner in inner_attentions(model))
    logits, grads = logits_and_grads(model, tokens, positions, mask)
    assert len(tk_calls) == 2 and all(m is mask for m in tk_calls)
    assert_anchored("logits", logits, ref64, lowp)
    assert_grads_anchored(grads, grads64, grads_lowp)


@needs_torchtitan
def test_apply_replaces_causal_varlen_and_refuses_other_models():
    model = tiny_llama3(attn_backend="varlen")
    assert all(isinstance(inner, titan_attention.VarlenAttention) for inner in inner_attentions(model))
    tkt.apply(model)
    assert all(isinstance(inner, tkt.TfkernelsAttention) for inner in inner_attentions(model))
    model = tiny_llama3(attn_backend="varlen")
    model.layers["1"].attention.inner_attention.window_size = (8, 0)
    with pytest.raises(NotImplementedError, match=r"layers.1.attention.inner_attention: VarlenAttention with "
                                                  r"window_size=\(8, 0\) is not replaced"):
        tkt.apply(model)

    class OwnMasks(llama3.Llama3Model):
        def get_attention_masks(self, positions):
            return None

    model.__class__ = OwnMasks
    with pytest.raises(NotImplementedError, match="OwnMasks builds its own attention masks"):
        tkt.apply(model)
    with pytest.raises(TypeError, match="expected a built torchtitan Decoder"):
        tkt.apply(torch.nn.Linear(2, 2))
