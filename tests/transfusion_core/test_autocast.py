"""The GPU training path on a CPU: a full training step under autocast - model forward,
the LM and diffusion losses, backward, optimizer step - on the reference path under bfloat16 and on
the kernel path (Triton's interpreter) under float16 (the interpreter mishandles bfloat16).

Each step is compared with the same step in float64 (the reference ops; exact up to the model's
float32 RoPE and timestep features), anchored to the error of the same step done by plain eager
PyTorch under the same autocast (``tfkernels.testing.assert_anchored``): ours may be at most twice
as far from float64 as eager low-precision code is, plus a few float32 ulps. Compared: the final
hidden states and image predictions, the per-row LM losses, and the gradients of all parameters.
A scalar mean has too few degrees of freedom to anchor (eager's error on it may cancel by chance),
so the loss scalars are checked to be the means of per-row values (the LM rows anchored, the
per-image diffusion losses exact functions of the anchored predictions), and the gradients are
anchored together, each relative to its own scale.
"""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import transfusion_core as tc
from tests.support import requires_triton
from tfkernels import reference
from tfkernels.testing import assert_anchored
from transfusion_core import ops
from transfusion_core.config import IGNORE_INDEX

from .support import packed, tiny_config


def _eager_ops(upcast: bool) -> ops.ModelOps:
    """The model's four ops as eager PyTorch: the reference functions, attention in the inputs' dtype
    unless ``upcast``, the LM loss as full logits and ``F.cross_entropy`` (autocast applies inside)."""
    return ops.ModelOps(
        attention=lambda q, k, v, mask: reference.attention(q, k, v, mask, upcast=upcast)[0],
        add_noise=reference.add_noise,
        diffusion_loss=reference.diffusion_loss,
        linear_cross_entropy=lambda hidden, weight, target, reduction="mean": F.cross_entropy(
            hidden @ weight.T, target, reduction=reduction),
    )


def _model(image_encoder: str) -> tc.Transfusion:
    torch.manual_seed(0)
    model = tc.Transfusion(tiny_config(image_encoder=image_encoder))
    with torch.no_grad():  # unit-gain weights: attention far from uniform, errors show downstream
        for parameter in model.parameters():
            parameter.normal_(0.0, 1.0 / max(parameter.shape[-1], 1) ** 0.5 if parameter.ndim > 1 else 0.5)
    return model


def _training_step(model, batch, noise, autocast_dtype=None, model_ops=None) -> dict:
    """One step as train.py runs it (forward and backward inside the autocast block, the optimizer
    step after it). Returns what the step computed, the gradients and whether the step applied them."""
    model_ops = model_ops or ops.current()
    captured = {}
    predict = model.predict

    def recording_predict(batch, x_t):
        captured["hidden"], captured["pred"] = predict(batch, x_t)
        return captured["hidden"], captured["pred"]

    model.predict = recording_predict  # an instance attribute: forward's self.predict finds it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with ops.use(model_ops), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                                            enabled=autocast_dtype is not None):
        out = model(batch, noise=noise)
        out.loss.backward()
        with torch.no_grad():  # the per-row values behind the two means, by the same ops
            hidden, pred = captured["hidden"], captured["pred"]
            is_target = batch.targets != IGNORE_INDEX
            text_hidden = hidden[is_target]
            lm_rows = model_ops.linear_cross_entropy(text_hidden, model.output_weight.to(text_hidden.dtype),
                                                     batch.targets[is_target], reduction="none")
            diffusion_images = model_ops.diffusion_loss(
                pred, batch.patches, batch.timesteps, model.schedule, target=model.config.diffusion_target,
                noise=noise, offsets=batch.patch_offsets, reduction="none")
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    stepped = all(torch.allclose(p, b - 0.1 * p.grad, rtol=1e-6, atol=1e-7) and not torch.equal(p, b)
                  for p, b in zip(model.parameters(), before))
    return dict(out=out, hidden=hidden.detach(), pred=pred.detach(), lm_rows=lm_rows,
                diffusion_images=diffusion_images, grads=grads, stepped=stepped)


def _normalized_grads(step: dict, ref64: dict) -> torch.Tensor:
    """All gradients as one float64 vector, each divided by its float64 reference's largest value."""
    return torch.cat([(g.double() / ref64["grads"][name].abs().max().clamp(min=1e-30)).flatten()
                      for name, g in step["grads"].items()])


def _assert_step_matches_float64(image_encoder, autocast_dtype):
    model = _model(image_encoder)
    batch = packed(seq_len=40)
    noise = torch.randn(batch.patches.shape, generator=torch.Generator().manual_seed(1))
    batch64 = dataclasses.replace(batch, patches=batch.patches.double())
    ref64 = _training_step(copy.deepcopy(model).double(), batch64, noise.double(), model_ops=_eager_ops(True))
    lowp = _training_step(copy.deepcopy(model), batch, noise, autocast_dtype, model_ops=_eager_ops(False))
    ours = _training_step(model, batch, noise, autocast_dtype)

    out = ours["out"]
    for name in ("loss", "lm_loss", "diffusion_loss"):
        assert getattr(out, name).dtype == torch.float32, f"{name}: the losses are float32 under autocast"
    torch.testing.assert_close(out.lm_loss, ours["lm_rows"].mean())
    torch.testing.assert_close(out.diffusion_loss, ours["diffusion_images"].mean())
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.diffusion_loss_weight * out.diffusion_loss)
    for name in ("hidden", "pred", "lm_rows"):
        assert_anchored(name, ours[name].float(), ref64[name], lowp[name])
    # The per-image losses are float32 means of (pred - target)^2 on every path: a function of the
    # anchored pred, exact to float32 rounding (too few to anchor: eager's error cancels by chance).
    exact = reference.diffusion_loss(ours["pred"].double(), batch.patches.double(), batch.timesteps, model.schedule,
                                     target=model.config.diffusion_target, noise=noise.double(),
                                     offsets=batch.patch_offsets, reduction="none")
    torch.testing.assert_close(ours["diffusion_images"], exact.float())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in ours["grads"].values())
    assert_anchored("gradients / their scale", _normalized_grads(ours, ref64).float(), _normalized_grads(ref64, ref64),
                    _normalized_grads(lowp, ref64).float())
    assert ours["stepped"], "the optimizer applied the gradients"


@pytest.mark.parametrize("image_encoder", ["linear", "unet"])
def test_bf16_autocast_step_on_the_reference_path(image_encoder, reference_path):
    _assert_step_matches_float64(image_encoder, torch.bfloat16)


@requires_triton
@pytest.mark.parametrize("image_encoder", ["linear", "unet"])
def test_fp16_autocast_step_on_the_kernel_path(image_encoder, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _assert_step_matches_float64(image_encoder, torch.float16)
