"""Checkpoint files: model save/load (safetensors + JSON), mismatches named, training checkpoints."""

import json

import pytest
import torch
from safetensors import safe_open

import transfusion_core as tc
from transfusion_core import checkpoint

from .support import packed, tiny_config

pytestmark = pytest.mark.usefixtures("reference_path")


@pytest.mark.parametrize("image_encoder", ["linear", "unet"])
def test_save_load_round_trip_gives_identical_outputs(image_encoder, tmp_path):
    torch.manual_seed(0)
    model = tc.Transfusion(tiny_config(image_encoder=image_encoder, tie_embeddings=True, n_kv_heads=None))
    model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as weights:
        assert set(weights.keys()) == set(model.state_dict())
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["n_kv_heads"] == 4
    loaded = tc.Transfusion.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    batch = packed()
    torch.testing.assert_close(loaded(batch), model(batch), rtol=0, atol=0)
    prompt = [tc.ByteTokenizer().encode("red")]
    kwargs = dict(max_new_tokens=4, force_image=True, image_steps=3, seed=1)
    expected, got = model.generate(prompt, **kwargs), loaded.generate(prompt, **kwargs)
    assert len(got) == len(expected) and isinstance(got[0], torch.Tensor)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mismatched_checkpoint_raises(tmp_path):
    model = tc.Transfusion(tiny_config())
    model.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"ffn_dim": 64}))
    shape_message = r"layers.0.feed_forward.w1.weight: checkpoint shape \(96, 32\), config needs \(64, 32\)"
    with pytest.raises(ValueError, match=shape_message):
        tc.Transfusion.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"image_encoder": "unet"}))
    names_message = r"does not match .*missing image_io.conv_in.weight.*unexpected image_io.patch_in.weight"
    with pytest.raises(ValueError, match=names_message):
        tc.Transfusion.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_experts": 8}))
    with pytest.raises(ValueError, match=r"unknown TransfusionConfig fields \['n_experts'\]"):
        tc.Transfusion.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        tc.Transfusion.load(tmp_path / "missing")


def _optimizer_state(model, value):
    return {"state": {name: {"step": torch.tensor(float(value)), "exp_avg": torch.full_like(p, value)}
                      for name, p in model.named_parameters()},
            "param_groups": [{"lr": 0.1, "params": [name for name, _ in model.named_parameters()]}]}


def test_training_checkpoint_round_trip_and_swap(tmp_path):
    """Weights, optimizer tensors and train_state.json come back as written; a second write
    replaces the first whole and leaves no .partial or .previous directory behind."""
    torch.manual_seed(0)
    model = tc.Transfusion(tiny_config())
    path = tmp_path / "checkpoint"
    for step in (1, 2):
        optimizer_state = _optimizer_state(model, step)
        train_state = {"step": step, "args": {"lr": 0.1}, "param_groups": optimizer_state["param_groups"]}
        checkpoint.write_training_checkpoint(path, model, optimizer_state, train_state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "train_state.json"]
    state = checkpoint.read_train_state(path)
    assert state == json.loads(json.dumps(train_state))
    weights, optimizer = checkpoint.read_training_tensors(path, state["param_groups"])
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[name], t) for name, t in model.state_dict().items())
    assert optimizer["param_groups"] == state["param_groups"]
    assert optimizer["state"].keys() == optimizer_state["state"].keys()
    for name, fields in optimizer_state["state"].items():
        assert optimizer["state"][name].keys() == fields.keys()
        assert all(torch.equal(optimizer["state"][name][key], value) for key, value in fields.items())
    assert tc.Transfusion.load(path).config == model.config


def test_read_train_state_needs_a_training_checkpoint(tmp_path):
    tc.Transfusion(tiny_config()).save(tmp_path)
    with pytest.raises(FileNotFoundError, match="train_state.json not found"):
        checkpoint.read_train_state(tmp_path)
