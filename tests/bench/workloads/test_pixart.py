"""bench/workloads/pixart.py: the FLOP count has the model's weights, the tfkernels step computes what the
default processors' step computes (loss and gradients, anchored in float64) with the captions' lengths as
its cross-attention mask, the quick run's rows, and the workload without diffusers: both cases skipped with
the reason, no crash.

On the CPU tfkernels runs its reference path here (the bench times it); the kernels under the interpreter
are checked with the same model in tests/tfkernels/integrations/test_diffusers.py."""


import pytest
import torch

from bench import harness
from bench.workloads import pixart
from tfkernels.testing import assert_anchored

from ..support import CPU, skips_without, work

needs_diffusers = pytest.mark.skipif(not pixart.has_diffusers(), reason="needs diffusers: pip install -e '.[diffusers]'")


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as the bench runs on the CPU


@needs_diffusers
@pytest.mark.parametrize("quick", [True, False])
def test_the_flop_count_has_the_models_matmul_weights(quick):
    import diffusers

    shape = pixart.shape_for(quick)
    with torch.device("meta"):
        model = diffusers.PixArtTransformer2DModel(**shape.model_config())

    def linear_weights(modules):
        return sum(m.weight.numel() for module in modules for m in module.modules() if isinstance(m, torch.nn.Linear))

    blocks = model.transformer_blocks
    image_side = [m for b in blocks for m in (b.attn1, b.attn2.to_q, b.attn2.to_out, b.ff)]
    caption_side = [m for b in blocks for m in (b.attn2.to_k, b.attn2.to_v)] + [model.caption_projection]
    assert len(blocks) == shape.layers
    assert linear_weights(image_side) == shape.layers * shape.image_side_params
    assert linear_weights(caption_side) == shape.caption_side_params
    assert model.pos_embed.height * model.pos_embed.width == shape.image_tokens
    if not quick:
        assert "601M matmul params" in shape.describe(torch.bfloat16)


def loss_and_grads(shape, processors, data, dtype):
    model = pixart.build_model(shape, processors, CPU, dtype)
    loss = pixart.loss(model, data)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@needs_diffusers
def test_the_default_processors_compute_what_tfkernels_computes(monkeypatch):
    """Loss and every gradient of the tfkernels step equal the default processors' float64 run within their
    float32 error, and the cross-attention runs tk.attention with the captions' lengths."""
    from tfkernels.integrations import diffusers as integration

    masks = []
    attention = integration.attention
    monkeypatch.setattr(integration, "attention",
                        lambda q, k, v, mask=None: masks.append(mask) or attention(q, k, v, mask))
    shape = pixart.shape_for(quick=True)
    data = pixart.batch(shape, CPU, seed=0, dtype=torch.float32)
    data64 = pixart.PixArtBatch(data.noisy.double(), data.noise.double(), data.timesteps, data.captions.double(),
                                data.caption_mask)
    loss64, grads64 = loss_and_grads(shape, "default", data64, torch.float64)
    loss_lowp, grads_lowp = loss_and_grads(shape, "default", data, torch.float32)
    assert not masks
    loss, grads = loss_and_grads(shape, "tfkernels", data, torch.float32)
    assert_anchored("loss", loss, loss64, loss_lowp)
    assert grads.keys() == grads64.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert_anchored(name, grad, grads64[name], grads_lowp[name])
    assert len(masks) == 2 * shape.layers and masks[0::2] == [None] * shape.layers
    for cross in masks[1::2]:
        assert cross.kv_end[:, 0].tolist() == shape.caption_lengths


@needs_diffusers
def test_quick_run_rows():
    settings = harness.Settings(CPU, quick=True, input_sets=2, cpu_reps=2)
    env = harness.Environment("cpu", torch.__version__, "none", "test", "2030-01-01T00:00:00Z")
    rows = harness.run_workloads(pixart.workloads(True, CPU), settings, env)
    assert {r["implementation"] for r in rows} == {"tfkernels", "default"}
    shape = pixart.shape_for(True)
    for row in rows:
        assert row["suite"] == "hf" and row["mode"] == "train_step" and row["backend"].startswith("diffusers")
        assert work(row, "tokens_per_s", 1) == pytest.approx(shape.batch * shape.image_tokens, rel=1e-4)
        assert work(row, "tflops", 1e12) == pytest.approx(shape.flops(), rel=1e-4)


def test_without_diffusers_both_cases_are_skipped_with_the_reason():
    skips = skips_without("diffusers", "pixart")
    assert len(skips) == 2 and all(line.endswith(f"skipped, {pixart.MISSING_DIFFUSERS}") for line in skips), skips
