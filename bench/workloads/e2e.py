"""End to end: one training step of a ~350M-parameter ``transfusion_core`` model.

The step is what a training loop does: build the mask from the batch's segment ids, forward
(bf16 autocast on CUDA), backward, AdamW step. Rows are the W1 composition: B = 2 x 8192 packed
positions, documents of 512-2048 tokens, captions of 20-200 tokens, images of 4x32x32 latents
(256 patches of 2x2), about half the positions image patches. Model: dim 1024, 24 layers, 8 heads
of 128, vocabulary 32000 (370M parameters). The quick mode runs a 2-layer model on 2 x 256
positions on the CPU.

Peers: the same model and batch with the attention swapped for compiled FlexAttention (block mask
built each step) or SDPA with the dense mask, and the losses for eager code
(``tfkernels.reference`` noise and diffusion loss, ``F.cross_entropy`` over materialised logits).
The peers swap the model's ops for the duration of each step through its op seam
(``transfusion_core.ops.use``); nothing in the model module is patched.

Useful FLOPs per step: ``6 x tokens x`` the transformer's matmul parameters, ``6 x text targets x
V x dim`` for the LM head, and ``3.5 x 4 x visible pairs x head dim x heads x layers`` for
attention; MFU divides by the device's dense bf16 peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random

import torch
import torch.nn as nn

import tfkernels as tk
import tfkernels.reference
import transfusion_core as tc
from tfkernels.testing import packed_transfusion_layout

from ..harness import MODE_WORK, Implementation, InputSet, Work, Workload
from .attention import flex_bshd, flex_unavailable, sdpa_dense_bshd
from .common import bench_dtype, tfkernels_backend
from .lm_loss import eager_linear_cross_entropy

SUITE = "e2e"
MODE = "train_step"
TEXT_TOKENS = 256  # text token ids are drawn below the special tokens of TransfusionConfig


@dataclasses.dataclass(frozen=True)
class E2EShape:
    config: tc.TransfusionConfig
    batch: int
    seq_len: int
    doc_len: tuple[int, int]
    caption_len: tuple[int, int]

    @property
    def image_side(self) -> int:
        return self.config.image_size

    @property
    def image_len(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    @functools.cached_property
    def spans(self):
        return packed_transfusion_layout(random.Random(0), self.batch, self.seq_len, doc_len=self.doc_len,
                                         caption_len=self.caption_len, image_len=self.image_len)

    @functools.cached_property
    def counts(self) -> dict:
        """Per step: positions in documents, text targets, visible attention pairs, and the
        model's parameters (all and the transformer's matmul weights), counted on the meta device."""
        batch = packed_batch(self, seed=0)
        with torch.device("meta"):
            model = tc.Transfusion(self.config)
        return {
            "tokens": int((batch.doc_ids >= 0).sum()),
            "targets": int((batch.targets != tc.IGNORE_INDEX).sum()),
            "pairs": batch.mask.visible_pairs(),
            "params": sum(p.numel() for p in model.parameters()),
            "matmul_params": sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, nn.Linear)),
        }

    def flops(self) -> float:
        c, config = self.counts, self.config
        attention = 4 * c["pairs"] * config.head_dim * config.n_heads * config.n_layers * MODE_WORK["forward_backward"]
        return 6 * c["tokens"] * c["matmul_params"] + 6 * c["targets"] * config.vocab_size * config.dim + attention

    def describe(self) -> str:
        config = self.config
        return (f"{self.counts['params'] / 1e6:.3g}M params (dim {config.dim}, {config.n_layers} layers, "
                f"{config.n_heads} heads of {config.head_dim}, V={config.vocab_size}), B={self.batch} S={self.seq_len} "
                f"packed (documents {self.doc_len[0]}-{self.doc_len[1]}, captions {self.caption_len[0]}-"
                f"{self.caption_len[1]}, images [{config.image_channels}, {self.image_side}, {self.image_side}]), "
                "AdamW")


def shape_for(quick: bool) -> E2EShape:
    if quick:
        config = tc.TransfusionConfig(vocab_size=512, dim=64, n_layers=2, n_heads=2, image_channels=4,
                                      image_size=8, patch_size=2)
        return E2EShape(config, batch=2, seq_len=256, doc_len=(64, 128), caption_len=(8, 24))
    config = tc.TransfusionConfig(vocab_size=32000, dim=1024, n_layers=24, n_heads=8, image_channels=4,
                                  image_size=32, patch_size=2)
    return E2EShape(config, batch=2, seq_len=8192, doc_len=(512, 2048), caption_len=(20, 200))


def packed_batch(shape: E2EShape, seed: int) -> tc.PackedBatch:
    """The fixed layout filled with fresh random text and latents, packed by ``tc.Packer``.

    Each text run of the layout holds its document's special tokens: the packer adds BOS or EOI
    before a run and BOI or EOS after it, so a run of ``n`` positions carries ``n - 2`` tokens
    and the packed rows reproduce the layout exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    config = shape.config
    images, documents = shape.spans
    docs = []
    for row_images, row_documents in zip(images, documents):
        doc_start = 0
        for length in row_documents:
            doc_end = doc_start + length
            spans = [(s, e) for s, e in row_images if doc_start <= s < doc_end]
            bounds = [doc_start, *[p for span in spans for p in span], doc_end]
            runs = [b - a for a, b in zip(bounds[::2], bounds[1::2])]  # text between the images
            items = []
            for run in runs:
                items.append(torch.randint(TEXT_TOKENS, (run - 2,), generator=generator).tolist())
                image_shape = (config.image_channels, shape.image_side, shape.image_side)
                items.append(torch.randn(image_shape, generator=generator))
            docs.append(items[:-1])  # a document ends with its last text run
            doc_start = doc_end
    packer = tc.Packer(config, shape.seq_len, num_rows=shape.batch, image_first_t_max=None, seed=seed)
    return packer(docs)


# ----------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------
EAGER_LOSSES = {
    "add_noise": tfkernels.reference.add_noise,
    "diffusion_loss": tfkernels.reference.diffusion_loss,
    "linear_cross_entropy": eager_linear_cross_entropy,
}


def training_step(shape: E2EShape, peer: str | None):
    """``prepare`` for one implementation: a fresh model (same seed for all) and its optimizer."""
    gqa = shape.config.n_heads != shape.config.n_kv_heads

    def prepare(first: InputSet):
        device = first.data.tokens.device
        torch.manual_seed(0)
        model = tc.Transfusion(shape.config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

        def ops_for(mask: tk.IntervalMask):
            if peer == "flex":
                block_mask = mask.to_flex_block_mask()
                return tc.ops.use(attention=lambda q, k, v, _mask: flex_bshd(q, k, v, block_mask, gqa), **EAGER_LOSSES)
            if peer == "sdpa_dense":
                dense = mask.to_dense()[:, None]
                return tc.ops.use(attention=lambda q, k, v, _mask: sdpa_dense_bshd(q, k, v, dense, gqa), **EAGER_LOSSES)
            return contextlib.nullcontext()

        def step(inputs):
            batch = inputs.data
            batch = dataclasses.replace(batch, mask=tk.IntervalMask.from_segment_ids(batch.doc_ids, batch.image_ids))
            with ops_for(batch.mask):
                with autocast:
                    loss = model(batch).loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return step

    return prepare


def workloads(quick: bool, device: torch.device) -> list[Workload]:
    shape = shape_for(quick)
    dtype = bench_dtype(device)

    def setup(device: torch.device, seed: int) -> InputSet:
        return InputSet(packed_batch(shape, seed).to(device))

    def work(mode: str) -> Work:
        return Work(flops=shape.flops(), tokens=shape.counts["tokens"])

    mixed = "float32" if device.type == "cpu" else "bf16 autocast"
    return [Workload(
        suite=SUITE, name="e2e_train_step", shape=f"{shape.describe()}, {mixed}", dtype=dtype, setup=setup,
        implementations=[
            Implementation("tfkernels", training_step(shape, None), backend=tfkernels_backend),
            Implementation("flex_eager_losses", training_step(shape, "flex"),
                           backend="torch.compile flex, eager losses", unavailable=flex_unavailable),
            Implementation("sdpa_dense_eager_losses", training_step(shape, "sdpa_dense"), backend="sdpa, eager losses"),
        ],
        modes=(MODE,), work=work,
    )]
