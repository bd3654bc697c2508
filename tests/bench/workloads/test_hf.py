"""bench/workloads/hf.py: the batch is W1's layout as transformers takes it, transformers hands tfkernels
W1's mask, the sdpa peer computes what tfkernels computes (loss and gradients, anchored in float64) while
a mask without the image blocks (what flash_attention_2 runs) does not, the quick run's rows and skips,
and the suite without transformers: every case skipped with the reason, nothing imported, no crash.

On the CPU tfkernels runs its reference path here (the bench times it); the kernels under the
interpreter are checked with the same models in tests/tfkernels/integrations/test_hf.py."""


import pytest
import torch

from bench import harness
from bench.workloads import hf
from tfkernels.testing import assert_anchored, max_error

from ..support import CPU, skips_without, work

needs_transformers = pytest.mark.skipif(not hf.has_transformers(), reason="needs transformers: pip install -e '.[hf]'")
CUDA = torch.device("cuda")  # labels only: nothing here touches a GPU


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as the bench runs on the CPU


def test_the_batch_is_w1_packed_as_transformers_takes_it():
    shape = hf.shape_for(quick=True)
    batch = hf.packed_batch(shape, CPU, seed=3)
    doc_ids, image_ids = shape.layout.segment_ids(CPU)
    images, documents = shape.layout.spans
    for row in range(shape.layout.batch):
        expected = torch.cat([torch.arange(length) for length in documents[row]])
        assert torch.equal(batch.position_ids[row], expected)
        types = torch.zeros(shape.layout.seq_q, dtype=torch.long)
        for start, end in images[row]:
            types[start:end] = 1
        assert torch.equal(batch.token_type_ids[row], types)
    image = batch.token_type_ids.bool()
    assert (batch.input_ids[image] == hf.IMAGE_TOKEN).all() and (batch.input_ids[~image] >= hf.FIRST_TEXT_TOKEN).all()
    first = batch.position_ids == 0
    assert (batch.labels[image | first] == hf.IGNORE_INDEX).all()
    assert torch.equal(batch.labels[~(image | first)], batch.input_ids[~(image | first)])
    assert not torch.equal(batch.input_ids, hf.packed_batch(shape, CPU, seed=4).input_ids)  # fresh text per seed
    assert shape.counts["tokens"] == int((doc_ids >= 0).sum()) == 2 * 256
    assert shape.counts["pairs"] == shape.layout.build_mask(CPU, (doc_ids, image_ids)).visible_pairs()


@needs_transformers
@pytest.mark.parametrize("quick", [True, False])
def test_the_flop_count_has_the_models_matmul_weights(quick):
    import transformers

    shape = hf.shape_for(quick)
    with torch.device("meta"):
        model = transformers.Gemma3ForCausalLM(shape.model_config())
    layers = model.model.layers
    assert shape.matmul_params == sum(
        m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    assert len(layers) == shape.layers and model.config.layer_types == ["full_attention"] * shape.layers
    if not quick:
        assert "159M params" in shape.describe(torch.bfloat16)


@needs_transformers
def test_transformers_hands_tfkernels_w1s_mask_by_the_structural_path(monkeypatch):
    """Every layer gets W1's IntervalMask (documents from position_ids, image blocks from token_type_ids),
    built in O(B * S) without evaluating the mask closure."""
    from tfkernels.integrations import hf as integration

    def evaluated(*args, **kwargs):
        raise AssertionError("the mask builder evaluated the closure")

    masks = []
    attention = integration.attention
    monkeypatch.setattr(integration, "_evaluated", evaluated)
    monkeypatch.setattr(integration, "attention", lambda q, k, v, mask, **kw: masks.append(mask) or attention(
        q, k, v, mask, **kw))
    shape = hf.shape_for(quick=True)
    (workload,) = hf.workloads(True, CPU)
    inputs = workload.setup(CPU, 0)
    (tfkernels,) = [i for i in workload.implementations if i.name == "tfkernels"]
    loss = tfkernels.prepare(inputs)(inputs)
    assert torch.isfinite(loss)
    expected = shape.layout.build_mask(CPU, shape.layout.segment_ids(CPU))
    assert len(masks) == shape.layers
    for mask in masks:
        assert torch.equal(mask.kv_start, expected.kv_start) and torch.equal(mask.kv_end, expected.kv_end)


def loss_logits_grads(shape, implementation, batch, dtype):
    model = hf.build_model(shape, implementation, CPU, dtype)
    output = hf.forward(model, batch)
    output.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return output.loss.detach(), output.logits.detach(), grads


@needs_transformers
def test_sdpa_computes_what_tfkernels_computes_and_flash_attentions_mask_does_not():
    """The sdpa peer honours the image blocks: tfkernels' loss and every gradient equal its float64 run within
    its own float32 error. Without the image blocks (flash_attention_2's mask: causal inside each document)
    the logits move a thousand times further than that: its row is another computation, as its label says."""
    shape = hf.shape_for(quick=True)
    batch = hf.packed_batch(shape, CPU, seed=0)
    loss64, logits64, grads64 = loss_logits_grads(shape, "sdpa", batch, torch.float64)
    loss_lowp, logits_lowp, grads_lowp = loss_logits_grads(shape, "sdpa", batch, torch.float32)
    loss, logits, grads = loss_logits_grads(shape, "tfkernels", batch, torch.float32)
    assert_anchored("loss", loss, loss64, loss_lowp)
    assert_anchored("logits", logits, logits64, logits_lowp)
    assert grads.keys() == grads64.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert_anchored(name, grad, grads64[name], grads_lowp[name])
    no_blocks = hf.HFBatch(batch.input_ids, batch.position_ids, torch.zeros_like(batch.token_type_ids), batch.labels)
    _, causal, _ = loss_logits_grads(shape, "tfkernels", no_blocks, torch.float32)
    anchor = 2 * max_error(logits_lowp, logits64) + 4 * torch.finfo(torch.float32).eps * logits64.abs().max().item()
    assert max_error(causal, logits) > 1000 * anchor


@needs_transformers
def test_quick_run_rows_and_skips():
    lines = []
    settings = harness.Settings(CPU, quick=True, input_sets=2, cpu_reps=2)
    env = harness.Environment("cpu", torch.__version__, "none", "test", "2030-01-01T00:00:00Z")
    rows = harness.run_workloads(hf.workloads(True, CPU), settings, env, log=lines.append)
    assert {r["implementation"] for r in rows} == {"tfkernels", "sdpa"}
    for row in rows:
        assert row["mode"] == "train_step" and row["backend"].startswith("transformers")
        assert work(row, "tokens_per_s", 1) == pytest.approx(2 * 256, rel=1e-4)
        assert work(row, "tflops", 1e12) == pytest.approx(hf.shape_for(True).flops(), rel=1e-4)
    assert {r["implementation"]: r["time_vs_tfkernels"] is not None for r in rows} == {"tfkernels": True, "sdpa": True}
    log = "\n".join(lines)
    assert "hf_gemma3_train_step flex_attention train_step: skipped, FlexAttention has no backward on the CPU" in log
    assert "hf_gemma3_train_step flash_attention_2 train_step: skipped, flash_attention_2 needs CUDA" in log


@needs_transformers
def test_flash_attention_2_needs_cuda_and_its_package(monkeypatch):
    import transformers.utils

    (workload,) = hf.workloads(False, CUDA)
    flash = {i.name: i for i in workload.implementations}["flash_attention_2"]
    assert flash.backend_on(CUDA) == "flash_attn varlen, drops image blocks"
    assert flash.unavailable(CPU, "train_step") == "flash_attention_2 needs CUDA"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert "flash_attn package, not installed" in flash.unavailable(CUDA, "train_step")
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert flash.unavailable(CUDA, "train_step") is None


def test_without_transformers_every_case_is_skipped_with_the_reason():
    """transformers blocked from importing: the suite still builds at both sizes (counts, shapes), and the
    harness logs a skip with the reason for each case instead of crashing."""
    skips = skips_without("transformers", "hf")
    assert len(skips) == 4 and all(line.endswith(f"skipped, {hf.MISSING_TRANSFORMERS}") for line in skips), skips
