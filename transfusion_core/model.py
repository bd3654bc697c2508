"""Transfusion: one transformer that predicts the next text token and denoises image patches.

Zhou et al., "Transfusion: Predict the Next Token and Diffuse Images with One Multi-Modal Model"
(arXiv 2408.11039). A sequence interleaves text tokens and images; an image is

    BOI, patch_1 ... patch_n, EOI

where the patches are the (noised) image latent cut into ``patch_size x patch_size`` squares and
embedded by a linear layer or by U-Net down blocks, plus an embedding of the diffusion step ``t``.
One Llama-style transformer (RMSNorm, RoPE, SwiGLU, GQA) runs over the whole sequence with the
Transfusion mask: causal, bidirectional inside each image, blind across packed documents
(``tk.IntervalMask``, ``tk.attention``). Text positions are trained with next-token prediction,
patches with the diffusion loss; ``loss = lm_loss + diffusion_loss_weight * diffusion_loss``.

This module holds the model and its KV cache (``KVCache``, ``extend_text`` / ``extend_image``): its
config is ``config.py``'s, the documents and packed batches it reads are ``data.py``'s; the checkpoint
files (``checkpoint.py``) are reached through thin methods; the image path's layers (timestep
embedding, linear or U-Net patches) are ``image_path.py``'s. The generation loop (``generate.py``)
builds on this module and gives the model its ``generate`` method.

Shapes: ``B`` rows, ``S`` positions, ``D`` model dim, ``N`` images, ``P`` patches of all images,
``C*p*p`` values per patch (``p`` = patch size), ``V`` vocabulary, ``H`` heads, ``Dh`` head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import tfkernels as tk
from tfkernels._checks import check_int, is_int, is_int_dtype

from . import checkpoint, ops
from .config import IGNORE_INDEX, TransfusionConfig, continuous_times, noise_schedule
from .data import PackedBatch
from .image_path import ImageLayout, LinearPatches, TimestepEmbedding, UNetPatches, patch_position_embedding


# ----------------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------------
def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """RoPE angles for integer positions ``[B, S]`` -> cos, sin ``[B, S, 1, Dh/2]`` float32."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, S, Dh/2]
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, S, H, Dh]`` by the angles, rotating half-dims pairwise (Llama layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim)  # [B, S, H, Dh]
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)  # [B, S, Hkv, Dh]
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, Sk, Hkv, Dh]: cached keys, then these
        out = ops.current().attention(q, k, v, mask)  # [B, S, H, Dh]
        return self.wo(out.reshape(batch, seq_len, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of every layer for the positions generated so far.

    Rows are right-aligned: every row ends at ``length`` and row ``b``'s keys start at
    ``row_start[b]`` (its mask never shows the slots before), so sequences of different lengths,
    like a prompt and the unconditional prefix of classifier-free guidance, share one batch.
    A step writes its keys at ``[length, length + n)``; ``commit(n)`` keeps them, otherwise the
    next step overwrites them (a denoising step's noisy patches).
    """

    def __init__(self, config: TransfusionConfig, batch_size: int, device, dtype, capacity: int = 256):
        shape = (batch_size, capacity, config.n_kv_heads, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0
        self.row_start = torch.zeros(batch_size, dtype=torch.int64, device=device)

    @property
    def batch_size(self) -> int:
        return self.row_start.shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write ``k, v [B, n, Hkv, Dh]`` after the committed keys; return all ``[B, length+n, ...]``."""
        end = self.length + k.shape[1]
        if end > self.keys[layer].shape[1]:
            grow = max(end, 2 * self.keys[layer].shape[1]) - self.keys[layer].shape[1]
            self.keys[layer] = F.pad(self.keys[layer], (0, 0, 0, 0, 0, grow))
            self.values[layer] = F.pad(self.values[layer], (0, 0, 0, 0, 0, grow))
        self.keys[layer][:, self.length:end] = k
        self.values[layer][:, self.length:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def commit(self, n: int) -> None:
        self.length += n

    def row(self, index: int) -> KVCache:
        """A copy of row ``index`` alone (its committed keys and values, without its left padding)."""
        start = int(self.row_start[index])
        single = KVCache.__new__(KVCache)
        single.length = self.length - start
        single.row_start = self.row_start.new_zeros(1)
        single.keys = [k[index:index + 1, start:self.length].clone() for k in self.keys]
        single.values = [v[index:index + 1, start:self.length].clone() for v in self.values]
        return single

    @staticmethod
    def stack(caches: Sequence[KVCache]) -> KVCache:
        """One cache holding the rows of all ``caches``, right-aligned at the longest length."""
        length = max(c.length for c in caches)
        merged = KVCache.__new__(KVCache)
        merged.length = length
        merged.row_start = torch.cat([c.row_start + (length - c.length) for c in caches])
        merged.keys, merged.values = [], []  # per layer [sum of B, length, Hkv, Dh], left-padded rows
        for layer in range(len(caches[0].keys)):
            for store, source in ((merged.keys, "keys"), (merged.values, "values")):
                rows = [F.pad(getattr(c, source)[layer][:, :c.length], (0, 0, 0, 0, length - c.length, 0))
                        for c in caches]
                store.append(torch.cat(rows))
        return merged


# ----------------------------------------------------------------------------------------------
# Argument checks of the model's methods (one rule: wrong type TypeError, wrong value ValueError,
# the message names the argument); shapes and types only, except for generation's token ids and
# timesteps, whose values index tables (one host sync per generation step).
# ----------------------------------------------------------------------------------------------
def _check_batch(batch) -> None:
    if not isinstance(batch, PackedBatch):
        raise TypeError(f"batch: expected a transfusion_core.PackedBatch, got {type(batch).__name__}")


def _check_float(name: str, x, shape: tuple, what: str, device: torch.device) -> None:
    """``x`` is a real floating-point tensor of ``shape`` (None: any size there) on ``device``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a float tensor {what}, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a float tensor {what}, got {x.dtype}")
    if x.ndim != len(shape) or any(want is not None and got != want for got, want in zip(x.shape, shape)):
        raise ValueError(f"{name}: expected shape {what}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: expected device {device} (the model's), got {x.device}")


def _check_index(name: str, x, shape: tuple, what: str, device: torch.device, high: int) -> None:
    """``x`` is an integer tensor of ``shape`` on ``device`` with values in ``[0, high)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected an int tensor {what}, got {type(x).__name__}")
    if not is_int_dtype(x.dtype):
        raise TypeError(f"{name}: expected an int tensor {what}, got {x.dtype}")
    if x.ndim != len(shape) or any(want is not None and got != want for got, want in zip(x.shape, shape)):
        raise ValueError(f"{name}: expected shape {what}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: expected device {device} (the model's), got {x.device}")
    bad = (x < 0) | (x >= high)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: expected values in [0, {high - 1}], got {name}{list(index)} = {int(x[index])}")


def _check_times(name: str, t, shape: tuple, what: str, config: TransfusionConfig, device: torch.device,
                 values: bool = True) -> None:
    """Diffusion times of the model's kind: int steps in ``[0, T)``, or float32 times in ``[0, 1]`` for a
    continuous-time (``noise_schedule="flow"``) model. ``values=False``: kind, shape and device only
    (no host sync)."""
    if not config.continuous_time:
        if values:
            _check_index(name, t, shape, what, device, config.num_timesteps)
        elif not isinstance(t, torch.Tensor) or not is_int_dtype(t.dtype):
            raise TypeError(f"{name}: expected an int tensor {what}, got {getattr(t, 'dtype', type(t).__name__)}")
        return
    kind = "float32 times in [0, 1] (noise_schedule='flow')"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected {kind} {what}, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: expected {kind} {what}, got {t.dtype}")
    if t.ndim != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        raise ValueError(f"{name}: expected shape {what}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (the model's), got {t.device}")
    bad = ~((t >= 0) & (t <= 1))  # NaN fails both comparisons
    if values and bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: expected values in [0, 1], got {name}{list(index)} = {t[index].item()}")


def _check_cache(cache, model: Transfusion) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a transfusion_core.KVCache (model.new_cache()), "
                        f"got {type(cache).__name__}")
    if len(cache.keys) != model.config.n_layers or cache.row_start.device != model.device:
        raise ValueError(f"cache: expected a cache of this model ({model.config.n_layers} layers on {model.device}), "
                         f"got {len(cache.keys)} layers on {cache.row_start.device}")


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class TransfusionLoss(NamedTuple):
    loss: torch.Tensor  # lm_loss + diffusion_loss_weight * diffusion_loss
    lm_loss: torch.Tensor  # mean cross-entropy over text targets
    diffusion_loss: torch.Tensor  # per-image MSE, mean over images


class Transfusion(nn.Module):
    """``model(batch)``: the training loss of a ``PackedBatch``; ``predict``: hidden states and image
    predictions; ``extend_text`` / ``extend_image``: the next positions after a KV cache;
    ``generate(prompt, ...)``: mixed-modal generation, ``transfusion_core.generate.generate`` itself
    as a method (generate.py sets it: the loop builds on this module)."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        # A continuous time t in [0, 1] is embedded as t * T, the range of the integer steps.
        self.time_embedding = TimestepEmbedding(config.dim,
                                                time_scale=config.num_timesteps if config.continuous_time else 1.0)
        self.image_io = LinearPatches(config) if config.image_encoder == "linear" else UNetPatches(config)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.schedule = noise_schedule(config)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # GPT-2's init: with PyTorch's defaults, unit-variance embeddings give huge tied logits.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def output_weight(self) -> torch.Tensor:
        """LM head ``[V, D]`` (the token embedding when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> ``[..., V]`` float32 (training uses the fused loss instead)."""
        if not isinstance(hidden, torch.Tensor) or not hidden.dtype.is_floating_point:
            raise TypeError(f"hidden: expected a float tensor [..., D], got {getattr(hidden, 'dtype', type(hidden))}")
        if hidden.ndim < 1 or hidden.shape[-1] != self.config.dim:
            raise ValueError(f"hidden: expected shape [..., {self.config.dim}], got {tuple(hidden.shape)}")
        return hidden.float() @ self.output_weight.float().T

    # ------------------------------------------------------------------ shared trunk
    def _embed_images(self, x_t, t, layout):
        """Noised patches ``[P, C*p*p]`` at steps ``t [N]`` -> tokens ``[P, D]``, time_emb, skips."""
        time_emb = self.time_embedding(t)  # [N, D]
        tokens, skips = self.image_io.encode(x_t.to(time_emb.dtype), time_emb, layout)
        tokens = tokens + time_emb[layout.patch_image_index()]
        if self.config.patch_position_embedding:
            tokens = tokens + patch_position_embedding(layout, self.config.dim).to(tokens.dtype)
        return tokens, time_emb, skips

    def _transformer(self, h, positions, mask, cache=None):
        """``h [B, S, D]`` at RoPE positions ``[B, S]`` -> final-normed hidden ``[B, S, D]``."""
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        for layer, block in enumerate(self.layers):
            h = block(h, cos, sin, mask, cache, layer)
        return self.norm(h)

    def predict(self, batch, x_t: torch.Tensor):
        """Run a packed batch whose patches are already noised (``x_t [P, C*p*p]``) at ``batch.timesteps``
        (int steps; float32 times in ``[0, 1]`` for a continuous-time model, ``noise_schedule="flow"``).

        Returns the final hidden states ``[B, S, D]`` (``logits(hidden)`` for next-token
        logits) and the image predictions ``[P, C*p*p]`` (of ``config.diffusion_target``).
        """
        _check_batch(batch)
        # The kind of time, not the values (no host sync in the training step): they only feed the
        # timestep embedding here; the training loss's ops check them.
        _check_times("batch.timesteps", batch.timesteps, (batch.num_images,), f"[N = {batch.num_images}]",
                     self.config, self.device, values=False)
        _check_float("x_t", x_t, (None, self.config.patch_dim), f"[P, {self.config.patch_dim}]", self.device)
        layout = ImageLayout(batch.patch_offsets, batch.image_grids)
        h = self.tok_embeddings(batch.tokens)  # [B, S, D]
        if layout.num_images == 0:
            return self._transformer(h, batch.positions, batch.mask), x_t.new_zeros(0, self.config.patch_dim)
        is_image = batch.image_ids != 0  # [B, S]
        if x_t.shape[0] != int(is_image.sum()):
            raise ValueError(
                f"x_t: expected {int(is_image.sum())} patches (the batch's image positions), got {x_t.shape[0]}"
            )
        patch_tokens, time_emb, skips = self._embed_images(x_t, batch.timesteps, layout)
        # Patches fill the image positions in row-major order, the order of the patch buffer. Under
        # autocast the patch tokens come out of autocast's linears in its dtype while the token
        # embeddings stay in the parameters' dtype: the residual stream keeps the embeddings' dtype.
        h = h.masked_scatter(is_image[..., None], patch_tokens.to(h.dtype))
        hidden = self._transformer(h, batch.positions, batch.mask)
        return hidden, self.image_io.decode(hidden[is_image], time_emb, layout, skips)

    def forward(self, batch, noise: torch.Tensor | None = None) -> TransfusionLoss:
        """Training loss of a packed batch (``transfusion_core.PackedBatch``).

        The patches are noised at ``batch.timesteps`` with ``noise`` ``[P, C*p*p]`` if given,
        else with noise generated from ``batch.noise_seed`` (regenerated in the loss, not stored).
        A continuous-time model (``noise_schedule="flow"``) takes float32 times in ``[0, 1]``, or reads
        the packer's integer draws as times of its distribution (``config.continuous_times``).
        """
        _check_batch(batch)
        x0 = batch.patches  # [P, C*p*p] clean latents
        noise_args = {"noise": noise} if noise is not None else {"seed": batch.noise_seed}
        # Clean copies (Packer(clean_image_copies=True)) are read at t = 0 without noise and have no loss;
        # their count is a shape, so a batch without them takes the plain path with no host sync.
        clean_copies = batch.clean_images.numel() > 0
        if self.config.continuous_time and not batch.timesteps.dtype.is_floating_point:
            times = continuous_times(batch.timesteps, batch.noise_seed, self.config)
            if clean_copies:
                times = times.index_fill(0, batch.clean_images.to(times.device), 0.0)
            batch = replace(batch, timesteps=times)
        t = batch.timesteps  # its values are checked by the diffusion ops (in an op of their own)
        schedule = self.schedule_on(x0.device)
        model_ops = ops.current()
        x_t = model_ops.add_noise(x0, t, schedule, offsets=batch.patch_offsets, **noise_args)
        if clean_copies:
            is_clean = torch.zeros(batch.num_images, dtype=torch.bool, device=x0.device)
            is_clean = is_clean.index_fill(0, batch.clean_images.to(x0.device), True)
            clean_patch = is_clean[ImageLayout(batch.patch_offsets, batch.image_grids).patch_image_index()]
            x_t = torch.where(clean_patch[:, None], x0.to(x_t.dtype), x_t)
        hidden, pred = self.predict(batch, x_t)
        is_target = batch.targets != IGNORE_INDEX  # [B, S]
        text_hidden = hidden[is_target]  # [T, D]: only text positions pay for the LM head
        # Under autocast the head runs in the activations' dtype, as an nn.Linear would.
        lm_head = self.output_weight.to(text_hidden.dtype)
        lm_loss = model_ops.linear_cross_entropy(text_hidden, lm_head, batch.targets[is_target])
        diffusion_loss = lm_loss.new_zeros(())  # a text-only batch
        if batch.num_images and clean_copies:  # the mean over the noisy copies
            per_image = model_ops.diffusion_loss(
                pred, x0, t, schedule, target=self.config.diffusion_target,
                offsets=batch.patch_offsets, reduction="none", **noise_args,
            )
            noisy_images = batch.num_images - batch.clean_images.numel()
            diffusion_loss = torch.where(is_clean, 0.0, per_image).sum() / max(noisy_images, 1)
        elif batch.num_images:
            diffusion_loss = model_ops.diffusion_loss(
                pred, x0, t, schedule, target=self.config.diffusion_target,
                offsets=batch.patch_offsets, **noise_args,
            )
        return TransfusionLoss(lm_loss + self.config.diffusion_loss_weight * diffusion_loss, lm_loss, diffusion_loss)

    def schedule_on(self, device) -> tk.NoiseSchedule:
        """The noise schedule with its tables on ``device`` (moved once, not at every step)."""
        if self.schedule.device != torch.device(device):
            self.schedule = self.schedule.to(device)
        return self.schedule

    # ------------------------------------------------------------------ cached steps
    def _cached_step(self, cache: KVCache, h: torch.Tensor, bidirectional: bool):
        """Run ``h [B, n, D]`` as the next ``n`` positions of every cache row."""
        batch, n, _ = h.shape
        offsets = torch.arange(n, device=h.device)
        kv_start = cache.row_start[:, None].expand(batch, n)
        if bidirectional:  # an image: every patch sees the whole image
            kv_end = torch.full((batch, n), cache.length + n, device=h.device)
        else:  # text: causal
            kv_end = (cache.length + 1 + offsets).expand(batch, n)
        mask = tk.IntervalMask(
            kv_start.to(torch.int32).contiguous(), kv_end.to(torch.int32).contiguous(), cache.length + n
        )
        positions = cache.length + offsets - cache.row_start[:, None]  # [B, n] position in the document
        return self._transformer(h, positions, mask, cache)

    @torch.no_grad()
    def extend_text(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens ``[B, n]`` (``n >= 1``, ids in ``[0, V)``) to the cache; return their next-token
        logits ``[B, n, V]``."""
        _check_cache(cache, self)
        _check_index("tokens", tokens, (cache.batch_size, None), f"[B = {cache.batch_size}, n]", self.device,
                     self.config.vocab_size)
        if tokens.shape[1] == 0:
            raise ValueError("tokens: expected at least one token (n >= 1), got shape "
                             f"{tuple(tokens.shape)}")
        hidden = self._cached_step(cache, self.tok_embeddings(tokens), bidirectional=False)
        cache.commit(tokens.shape[1])
        return self.logits(hidden)

    @torch.no_grad()
    def extend_image(self, cache: KVCache, x_t: torch.Tensor, t: torch.Tensor, grid: tuple[int, int], commit: bool):
        """Run one image per row, ``x_t [B, h*w, C*p*p]`` at steps ``t [B]``, after the cache.

        Returns the predictions ``[B, h*w, C*p*p]``. ``commit=True`` keeps the patches' keys
        and values (a clean image that later tokens attend to); a denoising step does not.
        ``grid``: the patch grid ``(h, w)``, positive ints; ``t``: int, in ``[0, T)``, or float32 times in
        ``[0, 1]`` for a continuous-time model (``noise_schedule="flow"``).
        """
        _check_cache(cache, self)
        if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(is_int(g) for g in grid)):
            raise TypeError(f"grid: expected a pair of ints (h, w), got {grid!r:.60}")
        for g in grid:
            check_int("grid", g, 1)
        n = grid[0] * grid[1]
        dim = self.config.patch_dim
        _check_float("x_t", x_t, (cache.batch_size, n, dim), f"[B = {cache.batch_size}, h*w = {n}, {dim}]",
                     self.device)
        _check_times("t", t, (cache.batch_size,), f"[B = {cache.batch_size}]", self.config, self.device)
        if not isinstance(commit, bool):
            raise TypeError(f"commit: expected a bool, got {commit!r:.60}")
        batch, n, _ = x_t.shape
        layout = ImageLayout(torch.arange(batch + 1, device=x_t.device) * n,
                             torch.tensor([grid] * batch, device=x_t.device))
        tokens, time_emb, skips = self._embed_images(x_t.flatten(0, 1), t, layout)
        hidden = self._cached_step(cache, tokens.view(batch, n, -1), bidirectional=True)
        if commit:
            cache.commit(n)
        return self.image_io.decode(hidden.flatten(0, 1), time_emb, layout, skips).view(batch, n, -1)

    # ------------------------------------------------------------------ caches and checkpoints
    def new_cache(self, batch_size: int = 1) -> KVCache:
        """An empty ``KVCache`` for this model's layers, device and dtype."""
        check_int("batch_size", batch_size, 1)
        return KVCache(self.config, batch_size, self.device, self.tok_embeddings.weight.dtype)

    def save(self, path) -> None:
        """Write ``path/model.safetensors`` (weights) and ``path/config.json``; nothing pickled."""
        checkpoint.save_model(self, path)

    @classmethod
    def load(cls, path, device=None) -> Transfusion:
        """Build the model of ``path/config.json`` and load ``path/model.safetensors`` into it."""
        return checkpoint.load_model(cls, path, device)
