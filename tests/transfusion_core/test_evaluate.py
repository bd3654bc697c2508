"""Evaluation: metrics of a perfect and of an untrained model, perplexity against the cached path, CLI."""

import json
import math
import re
import shutil

import pytest
import torch

import transfusion_core as tc
from transfusion_core import evaluate, train
from transfusion_core.codec import PixelCodec
from transfusion_core.datasets import Shape, ShapesDataset, detect_shapes, parse_caption, render

pytestmark = pytest.mark.usefixtures("one_thread", "reference_path")


def tiny_model(seed=0, **fields):
    torch.manual_seed(seed)
    config = tc.TransfusionConfig(dim=32, n_layers=2, n_heads=2, patch_size=4, image_size=16,
                                  patch_position_embedding=True, **fields)
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


@pytest.mark.parametrize("fields, sampler", [({}, "ddim"), (dict(noise_schedule="flow", diffusion_target="flow"), "euler")])
def test_an_untrained_model_scores_low(fields, sampler):
    results = evaluate.evaluate(tiny_model(**fields), PixelCodec(), ShapesDataset(3, split="heldout"), image_steps=2,
                                log=lambda line: None)
    assert results["image_to_text"]["exact"] == 0 and results["text_to_image"]["exact"] == 0
    assert results["caption_perplexity"] > 100  # close to uniform over 260 tokens
    assert results["settings"]["sampler"] == sampler  # one model call per step either way


@pytest.mark.parametrize("fields", [{}, dict(noise_schedule="flow", diffusion_target="flow")])
def test_caption_perplexity_equals_the_cached_generation_path(fields):
    """Perplexity from packed batches = the same captions scored token by token through the KV
    cache (prompt image at t = 0, the float time 0 for a flow model, then teacher-forced caption)."""
    model = tiny_model(1, **fields)
    clean = torch.zeros(1, dtype=torch.float32 if model.config.continuous_time else torch.int64)
    dataset = ShapesDataset(4, seed=2, split="heldout")
    tokenizer = tc.ByteTokenizer()
    documents = [[dataset[i].image, tokenizer.encode(dataset[i].caption)] for i in range(len(dataset))]
    nll, count = 0.0, 0
    config = model.config
    for image, tokens in documents:
        cache = model.new_cache()
        model.extend_text(cache, torch.tensor([[config.bos_id, config.boi_id]]))
        model.extend_image(cache, tc.patchify(image, config.patch_size)[None], clean, (4, 4), commit=True)
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


def cli_error(argv, capsys, status=1) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == status
    lines = capsys.readouterr().err.splitlines()
    return lines[-1]


def test_command_line_needs_a_training_checkpoint(tmp_path, capsys):
    tiny_model().save(tmp_path)
    assert re.fullmatch(r"error: .*train_state.json: not found; expected a checkpoint written by .*",
                        cli_error([str(tmp_path)], capsys))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        train.main(["--out", str(out), "--dim", "32", "--n-layers", "2", "--n-heads", "2", "--batch-size", "4",
                    "--steps", "1", "--heldout-samples", "2", "--no-plots", "--threads", "1"])
    return out / "checkpoint"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(step=0), r"train_state.json: step: expected an int >= 1, got 0"),
    (lambda s: s.update(args=[]), r"train_state.json: args: expected an object of the run's options, got \[\]"),
    (lambda s: s["args"].pop("image_size"), r"train_state.json: args: missing option 'image_size'"),
    (lambda s: s["args"].update(image_size="16"), r"train_state.json: args: image_size: expected an int"),
    (lambda s: s["args"].update(seed=None), r"train_state.json: args: seed: expected an int"),
    (lambda s: s["args"].update(max_shapes=3), r"train_state.json: args: max_shapes: expected an int in \[1, 2\]"),
    (lambda s: s.update(codec={"kind": "magic"}), r"train_state.json: codec: ValueError: codec: unknown"),
    (lambda s: s.update(codec="pixels"), r"train_state.json: codec: AttributeError"),
])
def test_damaged_train_state_is_one_line_naming_the_field(trained, tmp_path, capsys, edit, message):
    shutil.copytree(trained, tmp_path / "checkpoint")
    state_file = tmp_path / "checkpoint" / "train_state.json"
    state = json.loads(state_file.read_text())
    edit(state)
    state_file.write_text(json.dumps(state))
    assert re.search(message, cli_error([str(tmp_path / "checkpoint")], capsys))


def test_damaged_weights_and_bad_options_are_named(trained, tmp_path, capsys):
    shutil.copytree(trained, tmp_path / "checkpoint")
    (tmp_path / "checkpoint" / "model.safetensors").write_bytes(b"\x00" * 9)
    assert "model.safetensors: not a readable safetensors file" in cli_error([str(tmp_path / "checkpoint")], capsys)
    for argv, message in ((["--samples", "0"], "--samples: expected an int >= 1, got 0"),
                          (["--cfg-scale", "nan"], "--cfg-scale: expected a finite float, got nan"),
                          (["--image-steps", "1001"], "--image-steps: expected at most the model's 1000 timesteps"),
                          (["--device", "banana"], "invalid choice: 'banana'")):
        assert message in cli_error([str(trained), *argv], capsys, status=2)


def test_evaluate_arguments_follow_the_type_value_rule():
    model, data = tiny_model(), ShapesDataset(2, split="heldout")
    for kwargs, error, message in ((dict(samples=0), ValueError, "samples: expected an int >= 1"),
                                   (dict(samples=1.5), TypeError, "samples: expected an int >= 1"),
                                   (dict(image_steps=0), ValueError, r"image_steps: expected an int in \[1, 1000\]"),
                                   (dict(cfg_scale="3"), TypeError, "cfg_scale: expected a finite float"),
                                   (dict(seed=None), TypeError, "seed: expected an int >= 0")):
        with pytest.raises(error, match=message):
            evaluate.evaluate(model, PixelCodec(), data, log=lambda line: None, **kwargs)
    with pytest.raises(TypeError, match="model: expected a Transfusion"):
        evaluate.evaluate(None, PixelCodec(), data)
    with pytest.raises(ValueError, match="documents: expected a non-empty list"):
        evaluate.caption_perplexity(model, [])
    with pytest.raises(ValueError, match="samples: expected an int >= 1, got 0"):
        evaluate.write_samples("x.png", model, PixelCodec(), data, samples=0, steps=2, cfg_scale=None)
