"""A PixArt-alpha-style DiT on tfkernels: self-attention, cross-attention to caption embeddings and an
MLP per block, conditioned on the timestep through adaLN-single, trained as a denoiser on the embedded
captioned shapes (``transfusion_core.datasets.ShapesDataset``). Runs on a CPU (reference path) or a
CUDA GPU (Triton kernels).

What comes from tfkernels:

- ``tk.attention``: the image tokens' full self-attention (``IntervalMask.full``) and their
  cross-attention to the captions, padded to the longest one: row ``b``'s queries see keys
  ``[0, len_b)`` (``IntervalMask.from_key_lengths``), so no padding key is ever computed;
- ``tk.adaln_modulate``: every norm of the network (LayerNorm without affine, then
  ``* (1 + scale) + shift``). A norm is always preceded by a residual add: the previous branch's
  output, gated (MLP) or not (cross-attention), is added to the stream in the same pass
  (``residual=``, ``gate=``), which returns the new stream and the next branch's input;
- ``tk.NoiseSchedule``, ``tk.add_noise`` and ``tk.diffusion_loss``: the objective (cosine schedule,
  v-prediction), the evaluation noise regenerated from a seed.

adaLN-single (PixArt-alpha, section 2.3): one MLP maps the timestep embedding to six ``[B, C]``
vectors (shift, scale and gate for attention and MLP), shared by every block; each block adds its
own learned ``[6, C]`` table. Following PixArt-alpha, the cross-attention reads the stream without a
norm and joins it ungated. Unlike PixArt-alpha (eps-prediction), the model predicts v: on a budget of
a few hundred steps the eps loss hardly weighs the noisiest steps, where only the caption says what
to draw, and the model learns to ignore it.

``python examples/dit.py [--steps 800]`` trains (about 30 s on one CPU core) and prints the held-out
loss at fixed timesteps and noise before and after training, and with every image given another
image's caption: the model must use the captions to do better than that.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn

import tfkernels as tk
from transfusion_core.data import patchify, unpatchify
from transfusion_core.datasets import COLOURS, POSITIONS, SHAPES, ShapesDataset
from transfusion_core.image_path import TimestepEmbedding

EPS = 1e-6  # PixArt-alpha's LayerNorm(elementwise_affine=False, eps=1e-6)
# The captions' words ("a red circle at the top left and ..."), as token ids from 1; 0 is padding.
WORDS = ("a", "and", "at", "the", *COLOURS, *SHAPES, *sorted({w for p in POSITIONS for w in p.split()}))
CAPTION_LEN = 16  # two shapes: 15 words
TARGET = "v"  # see above: v-prediction, not eps


def add_and_modulate(stream, pending, shift, scale):
    """``(norm(h) * (1 + scale) + shift, h)`` with ``h = stream + gate * branch`` for a pending
    ``(branch, gate)`` (gate None: ungated), or ``h = stream`` when nothing is pending."""
    if pending is None:
        return tk.adaln_modulate(stream, shift, scale, eps=EPS), stream
    branch, gate = pending
    return tk.adaln_modulate(branch, shift, scale, gate=gate, residual=stream, eps=EPS)


class Attention(nn.Module):
    """Multi-head attention through ``tk.attention``: self-attention (``context`` None) or
    cross-attention to ``context [B, L, C]``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, mask: tk.IntervalMask, context=None):
        batch, tokens, dim = x.shape
        source = x if context is None else context
        q = self.q(x).view(batch, tokens, self.heads, -1)  # [B, T, H, D]
        k, v = self.kv(source).view(batch, source.shape[1], 2, self.heads, -1).unbind(2)  # [B, L, H, D]
        return self.out(tk.attention(q, k, v, mask).reshape(batch, tokens, dim))


class DiTBlock(nn.Module):
    """PixArt-alpha's block: self-attention, cross-attention, MLP; adaLN-single modulation."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.self_attention = Attention(dim, heads)
        self.cross_attention = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, stream, pending, time6, text, self_mask, cross_mask):
        """``stream [B, T, C]`` and the previous block's ``pending`` (MLP output, gate) not yet added;
        ``time6 [B, 6, C]`` the shared adaLN-single output. Returns the stream and this block's pending."""
        # [B, C] views of one [B, 6, C] tensor: read in place by the op.
        shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table + time6).unbind(1)
        y, stream = add_and_modulate(stream, pending, shift_sa, scale_sa)
        stream = stream + gate_sa[:, None] * self.self_attention(y, self_mask)
        # The cross-attention reads the stream as it is; its output joins it in the MLP norm's pass.
        y, stream = add_and_modulate(stream, (self.cross_attention(stream, cross_mask, text), None),
                                     shift_mlp, scale_mlp)
        return stream, (self.mlp(y), gate_mlp)


class DiT(nn.Module):
    """Predicts ``v`` (``TARGET``) for ``x_t [B, 3, S, S]`` at steps ``t [B]`` given caption word ids ``[B, L]``."""

    def __init__(self, image_size: int = 16, patch_size: int = 4, dim: int = 64, depth: int = 2, heads: int = 4,
                 caption_len: int = CAPTION_LEN):
        super().__init__()
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        patch_dim = 3 * patch_size**2
        self.patch_in = nn.Linear(patch_dim, dim)
        self.position = nn.Parameter(torch.randn(self.grid**2, dim) * 0.02)
        # Caption embeddings: word embeddings and positions stand in for PixArt's frozen T5; then
        # its caption projection (two layers, GELU).
        self.caption_words = nn.Embedding(len(WORDS) + 1, dim)
        self.caption_position = nn.Parameter(torch.randn(caption_len, dim) * 0.02)
        self.caption_projection = nn.Sequential(nn.Linear(dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = TimestepEmbedding(dim)
        self.time_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # adaLN-single, shared
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.final_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.patch_out = nn.Linear(dim, patch_dim)
        # Zero-initialised output and adaLN projections (DiT): training starts from an identity-like net.
        for layer in (self.patch_out, self.time_block[1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t, t, caption, caption_lengths):
        batch = x_t.shape[0]
        stream = self.patch_in(patchify(x_t, self.patch_size)) + self.position  # [B, T, C]
        text = self.caption_projection(self.caption_words(caption) + self.caption_position[: caption.shape[1]])
        time = self.time_embedding(t)  # [B, C]
        time6 = self.time_block(time).view(batch, 6, -1)
        tokens = stream.shape[1]
        self_mask = tk.IntervalMask.full(batch, tokens, device=x_t.device)
        cross_mask = tk.IntervalMask.from_key_lengths(caption_lengths, tokens, caption.shape[1], device=x_t.device)
        pending = None
        for block in self.blocks:
            stream, pending = block(stream, pending, time6, text, self_mask, cross_mask)
        shift, scale = (self.final_table + time[:, None]).unbind(1)
        y, _ = add_and_modulate(stream, pending, shift, scale)
        return unpatchify(self.patch_out(y), (self.grid, self.grid), self.patch_size)  # [B, 3, S, S]


def caption_batch(captions: list[str], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Word ids padded with 0 to ``CAPTION_LEN``: ``([B, L] int64, lengths [B] int64)``."""
    ids = [[WORDS.index(word) + 1 for word in caption.split()] for caption in captions]
    tokens = torch.zeros(len(captions), CAPTION_LEN, dtype=torch.int64)
    for row, words in enumerate(ids):
        tokens[row, : len(words)] = torch.tensor(words)
    return tokens.to(device), torch.tensor([len(words) for words in ids]).to(device)


def load_split(split: str, samples: int, image_size: int, max_shapes: int, device="cpu"):
    """Images ``[N, 3, S, S]``, caption word ids and lengths of the embedded data set."""
    data = ShapesDataset(samples, split=split, image_size=image_size, max_shapes=max_shapes)
    items = [data[i] for i in range(samples)]
    images = torch.stack([item.image for item in items]).to(device)
    return (images, *caption_batch([item.caption for item in items], device))


@torch.no_grad()
def heldout_loss(model, schedule, heldout, seed: int = 1234, shuffle_captions: bool = False) -> float:
    """v-MSE on the held-out images at fixed timesteps (spread over ``[0, T)``) and fixed noise."""
    images, captions, lengths = heldout
    if shuffle_captions:  # every image gets its neighbour's caption
        captions, lengths = captions.roll(1, 0), lengths.roll(1, 0)
    n = images.shape[0]
    t = torch.linspace(0, schedule.num_timesteps - 1, n, device=images.device).long()
    x_t = tk.add_noise(images, t, schedule, seed=seed)
    return tk.diffusion_loss(model(x_t, t, captions, lengths), images, t, schedule, target=TARGET, seed=seed).item()


def train(steps: int = 800, batch_size: int = 32, train_samples: int = 2048, heldout_samples: int = 128,
          max_shapes: int = 2, lr: float = 4e-3, seed: int = 0, device="cpu", log_every: int = 50, log=print) -> dict:
    """Train a DiT on the captioned shapes; the held-out loss before and after, and the step losses."""
    torch.manual_seed(seed)
    image_size = 16
    model = DiT(image_size=image_size).to(device)
    schedule = tk.NoiseSchedule.cosine(1000).to(device)
    train_set = load_split("train", train_samples, image_size, max_shapes, device)
    heldout = load_split("heldout", heldout_samples, image_size, max_shapes, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    generator = torch.Generator().manual_seed(seed)
    before = heldout_loss(model, schedule, heldout)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, train_samples, (batch_size,), generator=generator).to(device)
        images, captions, lengths = (x[index] for x in train_set)
        t = schedule.sample_timesteps(batch_size, generator=generator).to(device)
        noise = torch.randn(images.shape, generator=generator).to(device)
        x_t = tk.add_noise(images, t, schedule, noise=noise)
        loss = tk.diffusion_loss(model(x_t, t, captions, lengths), images, t, schedule, target=TARGET, noise=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            window = losses[-log_every:]
            log(f"step {step + 1:4d}  train loss {sum(window) / len(window):.4f}  "
                f"({time.perf_counter() - start:.0f} s)")
    model.eval()
    return dict(model=model, losses=losses, heldout_before=before, heldout_after=heldout_loss(model, schedule, heldout),
                heldout_shuffled=heldout_loss(model, schedule, heldout, shuffle_captions=True),
                seconds=time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # a model this small gains nothing from a second thread, and loses a lot on a busy CPU
    print(f"device={device} backend={tk.backend(device)} steps={args.steps} batch={args.batch_size}")
    result = train(args.steps, args.batch_size, seed=args.seed, device=device)
    print(f"held-out v-MSE at fixed noise: {result['heldout_before']:.4f} before training, "
          f"{result['heldout_after']:.4f} after ({result['seconds']:.0f} s); "
          f"{result['heldout_shuffled']:.4f} with shuffled captions")
    return result


if __name__ == "__main__":
    result = main()
