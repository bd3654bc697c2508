"""Hugging Face transformers: one training step of a small Gemma3 text model per attention backend.

The same model, batch and optimizer with ``attn_implementation`` = ``"tfkernels"``
(``tfkernels.integrations.hf``), ``"sdpa"``, ``"flex_attention"`` and ``"flash_attention_2"``: what
a transformers user changes to switch backends. The batch is W1's composition (the attention suite's
fixed layout, seed 0) as a padding-free packed batch: B = 2 x 8192 positions, documents of
512-2048 tokens (``position_ids`` restarting at 0 in each, as ``DataCollatorWithFlattening`` makes
them), captions of 20-200 tokens, images of 256 positions marked by ``token_type_ids = 1`` (Gemma3's
bidirectional image blocks), about half the positions image tokens.

Each step builds the mask as ``Gemma3Model`` builds its global layers' mask: transformers'
``create_causal_mask`` with the packed ``position_ids`` and the image blocks
(``get_block_sequence_ids_for_mask(token_type_ids)``), dispatched to the backend's own mask builder:
``tfkernels`` one ``IntervalMask`` in O(B * S), ``sdpa`` a dense ``[B, 1, S, S]`` mask,
``flex_attention`` a block mask (``create_block_mask``) every step, ``flash_attention_2`` none: it
takes the documents from ``position_ids`` (``cu_seqlens``) and **drops the image blocks** (causal
inside images), so it computes another, cheaper mask. The model is ``Gemma3ForCausalLM`` given the
embeddings and that mask; ``Gemma3Model`` would also build a sliding-window mask that no layer of
this model uses (and that, packed, reads the block ids at in-document positions), left out for every
backend alike.

Image positions hold an image token's embedding (no vision tower runs): the step is the language
model's, where the attention backends differ. Labels are the text tokens, none at image positions and
none at a document's first token (no target across documents). The model: dim 1024, 8 layers,
8 query heads and 4 KV heads of 128, MLP 4096, vocabulary 32000, every layer global attention
(159M parameters), in bf16 on CUDA (as ``from_pretrained(..., torch_dtype=torch.bfloat16)``: under
autocast Gemma3 hands fp32 queries and keys to the attention function, and FlexAttention would run
in fp32); AdamW. Quick: dim 64, 2 layers, 2 heads and 1 KV head of 32, vocabulary 512, on W1's
quick layout (2 x 256), float32 on the CPU.

Useful FLOPs per step as in the e2e suite: ``6 x tokens x`` the layers' matmul parameters, ``6 x
text targets x V x dim`` for the LM head, ``3.5 x 4 x visible pairs x head dim x heads x layers``
for attention (W1's mask; ``flash_attention_2`` is credited the same work although it computes a
different mask).

transformers is optional: without it every case is skipped with the reason (``pip install
'tfkernels[hf]'``); so are ``flash_attention_2`` without the ``flash_attn`` package or a GPU, and
``flex_attention`` on the CPU (no FlexAttention backward there).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import torch

from ..harness import Implementation, InputSet, Work, Workload
from .attention import AttentionShape, flex_unavailable
from .attention import shapes as attention_shapes
from .common import bench_dtype, dtype_name, tfkernels_backend

SUITE = "hf"
MODE = "train_step"
LAYOUT = "W1_packed_hkv16"  # the attention suite's workload whose packed layout the batch takes
# Gemma3's image token in the model's vocabulary (any id: no vision tower runs); text tokens are drawn above.
IMAGE_TOKEN = 5
FIRST_TEXT_TOKEN = 8
IGNORE_INDEX = -100  # transformers' label for "no target"
MISSING_TRANSFORMERS = "transformers not installed (pip install 'tfkernels[hf]')"


@dataclasses.dataclass(frozen=True)
class HFShape:
    layout: AttentionShape  # batch, sequence length and packed layout (W1's)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def model_config(self):
        """Gemma3's text stack, every layer global, scores scaled by ``1 / sqrt(head_dim)``."""
        import transformers

        return transformers.Gemma3TextConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim, query_pre_attn_scalar=self.head_dim, layer_types=["full_attention"] * self.layers,
            max_position_embeddings=max(self.layout.seq_q, 8192),
        )

    @property
    def matmul_params(self) -> int:
        """The decoder layers' linear weights: q, k, v, o and the gated MLP's three."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    @functools.cached_property
    def counts(self) -> dict:
        """Per step: positions in documents, text targets (after the shift by one), visible pairs."""
        batch = packed_batch(self, torch.device("cpu"), seed=0)
        return {"tokens": batch.input_ids.numel(), "targets": int((batch.labels[:, 1:] != IGNORE_INDEX).sum()),
                "pairs": self.layout.visible_pairs}

    def flops(self) -> float:
        c = self.counts
        attention = 3.5 * 4 * c["pairs"] * self.head_dim * self.heads * self.layers
        return 6 * c["tokens"] * self.matmul_params + 6 * c["targets"] * self.vocab * self.hidden + attention

    def describe(self, dtype: torch.dtype) -> str:
        parameters = self.matmul_params + self.vocab * self.hidden  # and the norms' few thousand
        layout = dict(self.layout.layout)
        return (f"Gemma3 text stack {parameters / 1e6:.3g}M params (dim {self.hidden}, {self.layers} layers, "
                f"{self.heads} heads / {self.kv_heads} KV heads of {self.head_dim}, V={self.vocab}), "
                f"B={self.layout.batch} S={self.layout.seq_q} packed as {LAYOUT} (documents {layout['doc_len'][0]}-"
                f"{layout['doc_len'][1]} with position_ids restarting, captions {layout['caption_len'][0]}-"
                f"{layout['caption_len'][1]}, images of {layout['image_len']} as token_type_ids), "
                f"{dtype_name(dtype)} weights, AdamW")


def shape_for(quick: bool) -> HFShape:
    (layout,) = [s for s in attention_shapes(quick) if s.name == LAYOUT]
    if quick:
        return HFShape(layout, hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, intermediate=128, vocab=512)
    return HFShape(layout, hidden=1024, layers=8, heads=8, kv_heads=4, head_dim=128, intermediate=4096, vocab=32000)


@dataclasses.dataclass
class HFBatch:
    input_ids: torch.Tensor  # [B, S]: text tokens, IMAGE_TOKEN at image positions
    position_ids: torch.Tensor  # [B, S]: position inside the document, from 0
    token_type_ids: torch.Tensor  # [B, S]: 1 at image positions
    labels: torch.Tensor  # [B, S]: input_ids, IGNORE_INDEX at images and at each document's first token


def packed_batch(shape: HFShape, device: torch.device, seed: int) -> HFBatch:
    """W1's layout as a transformers batch, fresh random text for each seed."""
    doc_ids, image_ids = shape.layout.segment_ids(device)
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(FIRST_TEXT_TOKEN, shape.vocab, doc_ids.shape, generator=generator).to(device)
    image = image_ids > 0
    input_ids = torch.where(image, IMAGE_TOKEN, text)
    starts = torch.ones_like(image)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    index = torch.arange(doc_ids.shape[1], device=device).expand_as(doc_ids)
    position_ids = index - torch.where(starts, index, 0).cummax(dim=1).values
    labels = input_ids.masked_fill(image | starts, IGNORE_INDEX)
    return HFBatch(input_ids, position_ids, image.long(), labels)


# ----------------------------------------------------------------------------------------------
# Implementations: one per attn_implementation
# ----------------------------------------------------------------------------------------------
def has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def build_model(shape: HFShape, implementation: str, device: torch.device, dtype: torch.dtype):
    """The seeded model (the same weights for every backend) with ``implementation`` set."""
    import transformers

    if implementation == "tfkernels":
        from tfkernels.integrations import hf

        hf.register()
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds less for 159M parameters on a GPU
        model = transformers.Gemma3ForCausalLM(shape.model_config()).to(dtype)
    model.set_attn_implementation(implementation)
    return model.train()


def forward(model, batch: HFBatch):
    """The model's output on ``batch``, its mask built as ``Gemma3Model`` builds its global layers' mask:
    ``create_causal_mask`` with the packed ``position_ids`` and the image blocks of ``token_type_ids``,
    through the mask builder of the model's ``attn_implementation``. (``Gemma3Model`` would also build a
    sliding-window mask, which no layer of this model uses.)"""
    from transformers.masking_utils import create_causal_mask
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    embeds = model.get_input_embeddings()(batch.input_ids)
    block_sequence_ids = get_block_sequence_ids_for_mask(batch.token_type_ids, device=embeds.device)
    mask = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                              position_ids=batch.position_ids, block_sequence_ids=block_sequence_ids)
    return model(inputs_embeds=embeds, attention_mask={"full_attention": mask}, position_ids=batch.position_ids,
                 labels=batch.labels, use_cache=False)


def training_step(shape: HFShape, implementation: str):
    def prepare(first: InputSet):
        device = first.data.input_ids.device
        model = build_model(shape, implementation, device, bench_dtype(device))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(inputs):
            loss = forward(model, inputs.data).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return step

    return prepare


def needs_transformers(also=None):
    """``unavailable`` for a case that needs transformers, and ``also``'s reasons."""

    def unavailable(device: torch.device, mode: str) -> str | None:
        if not has_transformers():
            return MISSING_TRANSFORMERS
        return also(device, mode) if also is not None else None

    return unavailable


def flash_attention_2_unavailable(device: torch.device, mode: str) -> str | None:
    if device.type != "cuda":
        return "flash_attention_2 needs CUDA"
    from transformers.utils import is_flash_attn_2_available

    return None if is_flash_attn_2_available() else "flash_attention_2 needs the flash_attn package, not installed"


def implementations(shape: HFShape) -> list[Implementation]:
    return [
        Implementation("tfkernels", training_step(shape, "tfkernels"), unavailable=needs_transformers(),
                       backend=lambda device: f"transformers + {tfkernels_backend(device)}"),
        Implementation("sdpa", training_step(shape, "sdpa"), unavailable=needs_transformers(),
                       backend="transformers sdpa, dense mask"),
        Implementation("flex_attention", training_step(shape, "flex_attention"),
                       unavailable=needs_transformers(flex_unavailable),
                       backend="transformers flex_attention, torch.compile, block mask each step"),
        Implementation("flash_attention_2", training_step(shape, "flash_attention_2"),
                       unavailable=needs_transformers(flash_attention_2_unavailable),
                       backend="flash_attn varlen, drops image blocks"),
    ]


def workloads(quick: bool, device: torch.device) -> list[Workload]:
    shape = shape_for(quick)
    dtype = bench_dtype(device)

    def setup(device: torch.device, seed: int) -> InputSet:
        return InputSet(packed_batch(shape, device, seed))

    def work(mode: str) -> Work:
        return Work(flops=shape.flops(), tokens=shape.counts["tokens"])

    return [Workload(suite=SUITE, name="hf_gemma3_train_step", shape=shape.describe(dtype), dtype=dtype, setup=setup,
                     implementations=implementations(shape), modes=(MODE,), work=work)]
