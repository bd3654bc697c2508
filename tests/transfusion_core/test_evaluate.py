"""Evaluation: metrics of a perfect and of an untrained model, perplexity against the cached path, CLI."""

import json
import math

import pytest
import torch

import transfusion_core as tc
from transfusion_core import evaluate, train
from transfusion_core.codec import PixelCodec
from transfusion_core.datasets import Shape, ShapesDataset, detect_shapes, parse_caption, render

pytestmark = pytest.mark.usefixtures("one_thread", "reference_path")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = tc.TransfusionConfig(dim=32, n_layers=2, n_heads=2, patch_size=4, image_size=16,
                                  patch_position_embedding=True)
    return tc.Transfusion(config).eval()


def test_attribute_hits_pair_shapes_in_reading_order():
    truth = [Shape("red", "circle", "top left"), Shape("blue", "square", "bottom right")]
    assert evaluate.attribute_hits(truth, truth) == {"colour": 2, "shape": 2, "position": 2}
    guess = [Shape("red", "square", "top left"), Shape("green", "square", "bottom left")]
    assert evaluate.attribute_hits(truth, guess) == {"colour": 1, "shape": 1, "position": 1}
    assert evaluate.attribute_hits(truth, truth[:1]) == {"colour": 0, "shape": 0, "position": 0}
    assert evaluate.attribute_hits(truth, None) == {"colour": 0, "shape": 0, "position": 0}


def test_a_perfect_model_scores_one_and_chance_is_reported(monkeypatch):
    """The plumbing: a model that draws exactly what the caption says, and captions exactly
    what the detector sees, gets every metric right."""
    model = tiny_model()

    def perfect_generate(prompt, *, force_image=False, **kwargs):
        if force_image:
            return [render(parse_caption(tc.ByteTokenizer().decode(prompt[0])))]
        return [tc.ByteTokenizer().encode(tc.datasets.caption(detect_shapes(prompt[0])))]

    monkeypatch.setattr(model, "generate", perfect_generate)
    results = evaluate.evaluate(model, PixelCodec(), ShapesDataset(6, split="heldout"), log=lambda line: None)
    assert results["text_to_image"] == {"exact": 1.0, "colour": 1.0, "shape": 1.0, "position": 1.0}
    assert results["image_to_text"] == {"exact": 1.0, "colour": 1.0, "shape": 1.0, "position": 1.0}
    assert results["chance"] == {"colour": 1 / 4, "shape": 1 / 3, "position": 1 / 4, "exact": 1 / 48}
    assert results["samples"] == 6


def test_an_untrained_model_scores_low():
    results = evaluate.evaluate(tiny_model(), PixelCodec(), ShapesDataset(3, split="heldout"), image_steps=2,
                                log=lambda line: None)
    assert results["image_to_text"]["exact"] == 0 and results["text_to_image"]["exact"] == 0
    assert results["caption_perplexity"] > 100  # close to uniform over 260 tokens


def test_caption_perplexity_equals_the_cached_generation_path():
    """Perplexity from packed batches = the same captions scored token by token through the KV
    cache (prompt image at t = 0, then teacher-forced caption)."""
    model = tiny_model(1)
    dataset = ShapesDataset(4, seed=2, split="heldout")
    tokenizer = tc.ByteTokenizer()
    documents = [[dataset[i].image, tokenizer.encode(dataset[i].caption)] for i in range(len(dataset))]
    nll, count = 0.0, 0
    config = model.config
    for image, tokens in documents:
        cache = model.new_cache()
        model.extend_text(cache, torch.tensor([[config.bos_id, config.boi_id]]))
        model.extend_image(cache, tc.patchify(image, config.patch_size)[None], torch.zeros(1, dtype=torch.int64),
                           (4, 4), commit=True)
        inputs = torch.tensor([[config.eoi_id] + tokens])
        targets = torch.tensor(tokens + [config.eos_id])
        logits = model.extend_text(cache, inputs)[0]
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += len(targets)
    expected = math.exp(nll / count)
    assert evaluate.caption_perplexity(model, documents, batch_size=3) == pytest.approx(expected, rel=1e-5)


def test_command_line_prints_a_table_and_writes_json(tmp_path, capsys):
    train.main(["--out", str(tmp_path), "--dim", "32", "--n-layers", "2", "--n-heads", "2", "--batch-size", "4",
                "--steps", "1", "--heldout-samples", "2", "--no-plots"])
    results = evaluate.main([str(tmp_path / "checkpoint"), "--image-steps", "2"])
    out = capsys.readouterr().out
    for row in ("text -> image exact", "image -> text position", "caption perplexity"):
        assert row in out
    written = json.loads((tmp_path / "checkpoint" / "eval.json").read_text())
    assert written == json.loads(json.dumps(results)) and written["step"] == 1 and written["samples"] == 2
    assert written["settings"] == {"image_steps": 2, "cfg_scale": 3.0, "sampler": "ddim", "seed": 0}


def test_command_line_needs_a_training_checkpoint(tmp_path):
    tiny_model().save(tmp_path)
    with pytest.raises(FileNotFoundError, match="train_state.json"):
        evaluate.main([str(tmp_path)])
