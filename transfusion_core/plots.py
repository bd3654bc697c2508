"""Figures: the training loss curve and the grid of generated samples (PNG, matplotlib's Agg backend).

Leaves: they draw what they are given (a ``metrics.jsonl`` file, images and captions) and import
nothing from the rest of ``transfusion_core``; matplotlib (the ``train`` extra) is imported when a
figure is drawn.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files, no display), imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_loss_curve(metrics_path: Path, out_path: Path) -> None:
    """A PNG of the loss and its LM and diffusion parts per step, from ``metrics.jsonl``."""
    plt = _pyplot()
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steps = [r["step"] for r in records]
    figure, axis = plt.subplots(figsize=(7, 4))
    window = max(1, len(records) // 50)  # a moving average keeps the trend readable
    for key, label in (("loss", "total"), ("lm_loss", "LM (per text token)"), ("diffusion_loss", "diffusion (MSE)")):
        values = torch.tensor([r[key] for r in records])
        smooth = values.unfold(0, window, 1).mean(dim=1) if len(values) >= window else values
        axis.plot(steps[window - 1:] if len(values) >= window else steps, smooth.tolist(), label=label)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(f"training loss (moving average over {window} steps)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)


def write_samples_grid(path, text_to_image_rows, image_to_text_rows) -> None:
    """A PNG of generated samples: images from held-out captions (top) and captions of held-out
    images (bottom). Rows are ``(caption, image [3, H, W] in [-1, 1], right: bool | None)``."""
    plt = _pyplot()
    columns = max(len(text_to_image_rows), len(image_to_text_rows))
    figure, axes = plt.subplots(2, columns, figsize=(1.9 * columns, 5.2), squeeze=False)
    for row, (title, samples) in enumerate((("caption -> generated image", text_to_image_rows),
                                            ("held-out image -> generated caption", image_to_text_rows))):
        axes[row][0].set_ylabel(title, fontsize=8)
        for column in range(columns):
            axis = axes[row][column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column >= len(samples):
                axis.axis("off")
                continue
            caption, image, right = samples[column]
            axis.imshow(((image.float().cpu() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy(),
                        interpolation="nearest")
            mark = "" if right is None else (" [right]" if right else " [wrong]")
            label = "\n".join(textwrap.wrap(f'"{caption}"{mark}', 22))
            if row == 0:
                axis.set_title(label, fontsize=6.5)
            else:
                axis.set_xlabel(label, fontsize=6.5)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
