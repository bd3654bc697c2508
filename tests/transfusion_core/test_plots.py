"""Figures: the loss curve and the samples grid are PNGs of the documented size, whatever their input."""

import json

import pytest
import torch

from transfusion_core import plots

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")


def png_size(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        return image.size


@pytest.mark.parametrize("steps", [1, 3, 120])  # fewer steps than the moving-average window, and more
def test_loss_curve_from_metrics(tmp_path, steps):
    records = [{"step": s, "loss": 10.0 / s, "lm_loss": 5.0 / s, "diffusion_loss": 1.0 / s} for s in range(1, steps + 1)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    plots.write_loss_curve(metrics, tmp_path / "loss_curve.png")
    assert png_size(tmp_path / "loss_curve.png") == (770, 440)  # 7 x 4 inches at 110 dpi


def test_samples_grid_has_a_column_per_sample(tmp_path):
    image = torch.rand(3, 16, 16) * 2 - 1
    text_to_image = [("a red circle at the top left", image, True), ("a blue square", image, False)]
    image_to_text = [("a green triangle at the bottom right", image, None)] * 3  # the longer row sets the columns
    plots.write_samples_grid(tmp_path / "samples.png", text_to_image, image_to_text)
    width, height = png_size(tmp_path / "samples.png")
    assert (width, height) == (round(1.9 * 3 * 120), round(5.2 * 120))
