"""Attention workloads W1-W5: ``tk.attention`` against FlexAttention and SDPA on the same inputs.

W1  packed Transfusion rows: B = 2 x 8192, Hq = 16 with Hkv = 16 and Hkv = 4, D = 128; documents
    of 512-2048 tokens, captions of 20-200 tokens, images of 256 patches, half the tokens patches.
W2  long, high resolution: B = 1, S = 32768, images of 1024 patches (documents of 4096-16384).
W3  text only, causal, B = 2, S = 8192; ceiling: SDPA's flash and cuDNN causal kernels.
W4  full bidirectional (DiT / PixArt), B = 4, S = 4096; ceiling: SDPA non-causal.
W5  sampling: 256 image patches against 8192 cached keys, and one decoded token against 8192
    (forward only, no autograd).
W6  packed rows with clean copies (BAGEL-style): as W1, each image twice, a noisy copy (a hidden
    span: no query outside it sees it) then its clean copy; B = 2 x 8192, Hkv = 4.
All: bf16 on CUDA; the quick mode shrinks every shape and runs float32 on the CPU.

Useful FLOPs count the visible (query, key) pairs only: forward ``4 * pairs * D * Hq``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import random
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

import tfkernels as tk
from tfkernels.attention import LaunchConfig, launch_configs, use_launch_configs
from tfkernels.testing import packed_transfusion_layout, segment_ids_from_layout

from ..harness import DIFFERENTIABLE_MODES, MODE_WORK, Implementation, InputSet, Work, Workload
from ..tile_waste import tile_waste
from .common import BACKWARD_MODES, bench_dtype, compiled, dtype_name, tfkernels_backend

SUITE = "attention"


@dataclass(frozen=True)
class AttentionShape:
    name: str
    batch: int
    seq_q: int
    seq_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    mask_kind: str  # "packed", "causal" or "full"
    layout: tuple = ()  # packed: packed_transfusion_layout's keyword arguments, as (name, value) pairs
    training: bool = True

    @property
    def gqa(self) -> bool:
        return self.heads_q != self.heads_kv

    @functools.cached_property
    def spans(self):
        """Packed rows: (images, documents) per row, and with clean copies the hidden spans, fixed by seed 0."""
        return packed_transfusion_layout(random.Random(0), self.batch, self.seq_q, **dict(self.layout))

    def segment_ids(self, device):
        """Packed rows: (doc_ids, image_ids), and with clean copies hidden_ids, as a training loop holds them."""
        if self.mask_kind != "packed":
            return None
        images, documents, *hidden = self.spans
        return segment_ids_from_layout(self.seq_q, images, documents, device=device,
                                       hidden=hidden[0] if hidden else None)

    def build_mask(self, device, segment_ids) -> tk.IntervalMask:
        if self.mask_kind == "packed":
            return tk.IntervalMask.from_segment_ids(*segment_ids)
        constructor = tk.IntervalMask.causal if self.mask_kind == "causal" else tk.IntervalMask.full
        return constructor(self.batch, self.seq_q, self.seq_k, device=device)

    @functools.cached_property
    def visible_pairs(self) -> int:
        return self.build_mask("cpu", self.segment_ids("cpu")).visible_pairs()

    def describe(self, dtype: torch.dtype) -> str:
        text = (f"B={self.batch} Sq={self.seq_q} Sk={self.seq_k} Hq={self.heads_q} Hkv={self.heads_kv} "
                f"D={self.head_dim} {self.mask_kind}")
        if self.mask_kind == "packed":
            layout = dict(self.layout)
            images, documents, *hidden = self.spans
            patches = sum(end - start for rows in (images, *hidden) for row in rows for start, end in row)
            copies = ", each a noisy (hidden) and a clean copy" if hidden else ""
            text += (f" (documents {layout['doc_len'][0]}-{layout['doc_len'][1]}, captions "
                     f"{layout['caption_len'][0]}-{layout['caption_len'][1]}, images of {layout['image_len']}"
                     f"{copies}; {sum(map(len, documents))} documents, {patches / (self.batch * self.seq_q):.0%} "
                     f"patches)")
        return text + f" {dtype_name(dtype)}"


def shapes(quick: bool) -> list[AttentionShape]:
    if quick:
        small = (("doc_len", (64, 128)), ("caption_len", (8, 24)), ("image_len", 16))
        long = (("doc_len", (128, 256)), ("caption_len", (8, 24)), ("image_len", 64))
        return [
            AttentionShape("W1_packed_hkv16", 2, 256, 256, 4, 4, 32, "packed", small),
            AttentionShape("W1_packed_hkv4", 2, 256, 256, 4, 2, 32, "packed", small),
            AttentionShape("W2_long_packed", 1, 512, 512, 4, 4, 32, "packed", long),
            AttentionShape("W3_causal", 1, 256, 256, 4, 4, 32, "causal"),
            AttentionShape("W4_full", 1, 128, 128, 4, 4, 32, "full"),
            AttentionShape("W5_image_vs_cache", 1, 16, 256, 4, 4, 32, "full", training=False),
            AttentionShape("W5_decode", 1, 1, 256, 4, 4, 32, "causal", training=False),
            AttentionShape("W6_clean_copies", 2, 256, 256, 4, 2, 32, "packed", small + (("clean_copies", True),)),
        ]
    w1 = (("doc_len", (512, 2048)), ("caption_len", (20, 200)), ("image_len", 256))
    w2 = (("doc_len", (4096, 16384)), ("caption_len", (20, 200)), ("image_len", 1024))
    return [
        AttentionShape("W1_packed_hkv16", 2, 8192, 8192, 16, 16, 128, "packed", w1),
        AttentionShape("W1_packed_hkv4", 2, 8192, 8192, 16, 4, 128, "packed", w1),
        AttentionShape("W2_long_packed", 1, 32768, 32768, 16, 16, 128, "packed", w2),
        AttentionShape("W3_causal", 2, 8192, 8192, 16, 16, 128, "causal"),
        AttentionShape("W4_full", 4, 4096, 4096, 16, 16, 128, "full"),
        AttentionShape("W5_image_vs_cache", 1, 256, 8192, 16, 16, 128, "full", training=False),
        AttentionShape("W5_decode", 1, 1, 8192, 16, 16, 128, "causal", training=False),
        AttentionShape("W6_clean_copies", 2, 8192, 8192, 16, 4, 128, "packed", w1 + (("clean_copies", True),)),
    ]


@dataclass
class AttentionData:
    q: torch.Tensor  # [B, Sq, Hq, D]
    k: torch.Tensor  # [B, Sk, Hkv, D]
    v: torch.Tensor
    mask: tk.IntervalMask
    segment_ids: tuple | None  # packed: (doc_ids, image_ids[, hidden_ids]) [B, S], what a training loop has


def setup_for(shape: AttentionShape, dtype: torch.dtype):
    def setup(device: torch.device, seed: int) -> InputSet:
        generator = torch.Generator(device).manual_seed(seed)

        def randn(*size):
            return torch.randn(*size, generator=generator, device=device, dtype=dtype)

        q = randn(shape.batch, shape.seq_q, shape.heads_q, shape.head_dim)
        k = randn(shape.batch, shape.seq_k, shape.heads_kv, shape.head_dim)
        v = randn(shape.batch, shape.seq_k, shape.heads_kv, shape.head_dim)
        for t in (q, k, v):
            t.requires_grad_(shape.training)
        segment_ids = shape.segment_ids(device)
        data = AttentionData(q, k, v, shape.build_mask(device, segment_ids), segment_ids)
        return InputSet(data, leaves=(q, k, v), grad_output=randn(*q.shape) if shape.training else None)

    return setup


# ----------------------------------------------------------------------------------------------
# Implementations. Peers take the [B, S, H, D] inputs as [B, H, S, D] views, as a user would.
# ----------------------------------------------------------------------------------------------
def heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def tfkernels_attention() -> Implementation:
    def prepare(first: InputSet):
        return lambda inputs: tk.attention(inputs.data.q, inputs.data.k, inputs.data.v, inputs.data.mask)

    return Implementation("tfkernels", prepare, backend=tfkernels_backend)


# Candidate launch configs timed beside the defaults on the W1 and W3 training shapes (head dim 128), so that a
# GPU run says which to keep (the static report cannot time them): the backward tiles that put 64 rows on two
# warpgroups (their score GEMMs and exp2 duplicated, fewer registers), and the 4-warp tiles without duplication.
CANDIDATE_SHAPES = ("W1_packed_hkv16", "W3_causal")
CANDIDATES_NEED_A_GPU = "launch configs compare only on a GPU"


def candidate_configs(head_dim: int) -> dict:
    default = launch_configs(head_dim, torch.bfloat16, "sm_90")
    return {
        "tfkernels_cfg_shared_rows": dataclasses.replace(default, dkdv=LaunchConfig(32, 64, 8, 3),
                                                         dq=LaunchConfig(64, 64, 8, 3), dkdv_rerun=None),
        "tfkernels_cfg_4warps": dataclasses.replace(default, dkdv=LaunchConfig(32, 64, 4, 3),
                                                    dq=LaunchConfig(64, 64, 4, 3),
                                                    dkdv_rerun=LaunchConfig(32, 64, 8, 3)),
    }


def tfkernels_candidate(name: str, configs) -> Implementation:
    def prepare(first: InputSet):
        def call(inputs):
            with use_launch_configs(configs):
                return tk.attention(inputs.data.q, inputs.data.k, inputs.data.v, inputs.data.mask)

        return call

    def unavailable(device: torch.device, mode: str) -> str | None:
        if device.type != "cuda":
            return CANDIDATES_NEED_A_GPU

    return Implementation(name, prepare, backend=tfkernels_backend, unavailable=unavailable)


def tfkernels_mask_build(shape: AttentionShape) -> Implementation:
    """What a training step does before attention: the mask from segment ids, and the per-key
    query intervals the backward pass walks."""

    def prepare(first: InputSet):
        def build(inputs):
            mask = shape.build_mask(inputs.data.q.device, inputs.data.segment_ids)
            return mask, mask.key_intervals()

        return build

    return Implementation("tfkernels", prepare, backend="torch ops", modes=("mask_build",))


def flex_unavailable(device: torch.device, mode: str) -> str | None:
    if device.type == "cpu" and mode in BACKWARD_MODES:
        return "FlexAttention has no backward on the CPU"
    return None


def flex_bshd(q, k, v, block_mask, gqa: bool, flex=None, kernel_options=None) -> torch.Tensor:
    """FlexAttention on ``[B, S, H, D]`` tensors (as ``[B, H, S, D]`` views); ``flex`` defaults to
    the compiled one."""
    flex = flex or compiled(flex_attention)
    options = {} if kernel_options is None else {"kernel_options": kernel_options}
    return heads_first(flex(heads_first(q), heads_first(k), heads_first(v), block_mask=block_mask, enable_gqa=gqa,
                            **options))


def sdpa_dense_bshd(q, k, v, dense, gqa: bool) -> torch.Tensor:
    """SDPA on ``[B, S, H, D]`` tensors with a dense boolean mask; SDPA picks the kernel."""
    q, k, v = (heads_first(t) for t in (q, k, v))
    return heads_first(F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=gqa))


def flex_attention_peer(shape: AttentionShape) -> Implementation:
    """torch FlexAttention with ``mask.to_flex_block_mask()``, compiled on CUDA. On the CPU it
    runs uncompiled (compiling takes ~30 s per shape) on detached inputs (no CPU backward)."""

    def prepare(first: InputSet):
        block_mask = first.data.mask.to_flex_block_mask()
        on_cpu = first.data.q.device.type == "cpu"
        flex = flex_attention if on_cpu else compiled(flex_attention)

        def call(inputs):
            q, k, v = (t.detach() if on_cpu else t for t in (inputs.data.q, inputs.data.k, inputs.data.v))
            with warnings.catch_warnings():
                # Uncompiled on the CPU on purpose (see above): not the mistake torch warns about.
                warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
                return flex_bshd(q, k, v, block_mask, shape.gqa, flex)

        return call

    return Implementation(
        "flex", prepare, unavailable=flex_unavailable,
        backend=lambda device: "eager, no autograd (CPU)" if device.type == "cpu" else "torch.compile",
    )


def flash_cute_missing() -> str | None:
    """Why FlexAttention's ``BACKEND="FLASH"`` path cannot run here (it needs FlashAttention's CuTe
    DSL kernels, the ``flash_attn.cute`` package), or None."""
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):  # no flash_attn package at all
        found = False
    return None if found else "FlexAttention BACKEND=FLASH needs flash_attn.cute, not installed"


def flex_flash_peer(shape: AttentionShape) -> Implementation:
    """Optional peer: compiled FlexAttention with ``kernel_options={"BACKEND": "FLASH"}`` (the
    CuTe-DSL FlashAttention kernels), skipped where ``flash_attn.cute`` is not installed."""

    def prepare(first: InputSet):
        block_mask = first.data.mask.to_flex_block_mask()
        options = {"BACKEND": "FLASH"}
        return lambda inputs: flex_bshd(inputs.data.q, inputs.data.k, inputs.data.v, block_mask, shape.gqa,
                                        kernel_options=options)

    def unavailable(device, mode):
        if device.type != "cuda":
            return "FlexAttention BACKEND=FLASH needs CUDA"
        return flash_cute_missing()

    return Implementation("flex_flash", prepare, backend="torch.compile flex, BACKEND=FLASH", unavailable=unavailable)


def flex_block_mask_build() -> Implementation:
    def prepare(first: InputSet):
        return lambda inputs: inputs.data.mask.to_flex_block_mask()

    return Implementation("flex", prepare, backend="create_block_mask", modes=("mask_build",))


def sdpa_dense_mask_peer(shape: AttentionShape) -> Implementation:
    """SDPA with the mask as a dense boolean tensor, broadcast over heads; SDPA picks the kernel."""

    def prepare(first: InputSet):
        dense = first.data.mask.to_dense()[:, None]  # [B, 1, Sq, Sk]

        return lambda inputs: sdpa_dense_bshd(inputs.data.q, inputs.data.k, inputs.data.v, dense, shape.gqa)

    return Implementation("sdpa_dense_mask", prepare, backend="sdpa (auto)")


def sdpa_ceiling_peer(shape: AttentionShape, name: str, backend: SDPBackend) -> Implementation:
    """SDPA restricted to one backend with no mask tensor: the causal or full kernel, the ceiling
    for masks that need nothing else (bottom-right alignment only matters when Sq != Sk, where
    these workloads are full)."""
    is_causal = shape.mask_kind == "causal" and shape.seq_q > 1

    def prepare(first: InputSet):
        def call(inputs):
            q, k, v = (heads_first(t) for t in (inputs.data.q, inputs.data.k, inputs.data.v))
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=shape.gqa)
            return heads_first(out)

        return call

    def unavailable(device, mode):
        return "cuDNN attention needs CUDA" if backend == SDPBackend.CUDNN_ATTENTION and device.type != "cuda" else None

    return Implementation(name, prepare, backend=str(backend.name).lower(), unavailable=unavailable)


def implementations(shape: AttentionShape) -> list[Implementation]:
    impls = [tfkernels_attention(), flex_attention_peer(shape), sdpa_dense_mask_peer(shape), flex_flash_peer(shape)]
    if shape.mask_kind in ("causal", "full"):
        impls += [sdpa_ceiling_peer(shape, "sdpa_flash", SDPBackend.FLASH_ATTENTION),
                  sdpa_ceiling_peer(shape, "sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]
    if shape.training:
        impls += [tfkernels_mask_build(shape), flex_block_mask_build()]
    if shape.name in CANDIDATE_SHAPES:
        impls += [tfkernels_candidate(name, configs) for name, configs in candidate_configs(shape.head_dim).items()]
    return impls


def tile_waste_summary(shape: AttentionShape) -> tuple[dict, str]:
    """The tile-waste columns and line (``bench.tile_waste``): visible pairs, and the pairs computed
    by tfkernels' tile walk at its default CUDA tiles for bf16 at the shape's head dim (also in the
    quick mode: the figure is about the GPU kernels) and by a FlexAttention 128x128 block mask."""
    waste = tile_waste(shape.build_mask("cpu", shape.segment_ids("cpu")), shape.head_dim)
    return waste.columns(backward=shape.training), "tile waste: " + waste.describe(backward=shape.training)


def workloads(quick: bool, device: torch.device) -> list[Workload]:
    dtype = bench_dtype(device)
    result = []
    for shape in shapes(quick):

        def work(mode: str, shape=shape) -> Work:
            if mode not in MODE_WORK:
                return Work()
            return Work(flops=4 * shape.visible_pairs * shape.head_dim * shape.heads_q * MODE_WORK[mode])

        result.append(Workload(
            suite=SUITE, name=shape.name, shape=shape.describe(dtype), dtype=dtype,
            setup=setup_for(shape, dtype), implementations=implementations(shape),
            modes=DIFFERENTIABLE_MODES if shape.training else ("forward",), work=work, training=shape.training,
            summary=functools.partial(tile_waste_summary, shape),
        ))
    return result
