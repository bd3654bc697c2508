"""Transfusion model: loss, gradients, kernel path vs reference path, training, checkpoints."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

import transfusion_core as tc

pytestmark = pytest.mark.usefixtures("reference_path")


def tiny_config(**overrides):
    fields = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, image_size=4, unet_channels=(8, 16))
    return tc.TransfusionConfig(**(fields | overrides))


def documents(seed=0):
    """Captions before and after images of two sizes, text alone, two images in one document."""
    g = torch.Generator().manual_seed(seed)
    tok = tc.ByteTokenizer()
    return [
        [tok.encode("red dot"), torch.randn(3, 4, 4, generator=g)],
        [torch.randn(3, 4, 8, generator=g), tok.encode("wide")],
        [tok.encode("just some text")],
        [torch.randn(3, 4, 4, generator=g), tok.encode("and"), torch.randn(3, 2, 2, generator=g)],
    ]


def packed(seed=0, seq_len=48):
    return tc.Packer(tiny_config(), seq_len, seed=seed)(documents(seed))


@pytest.mark.parametrize("image_encoder", ["linear", "unet"])
@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_loss_is_finite_and_gradients_reach_every_parameter(image_encoder, tie_embeddings):
    torch.manual_seed(0)
    model = tc.Transfusion(tiny_config(image_encoder=image_encoder, tie_embeddings=tie_embeddings))
    batch = packed()
    assert batch.tokens.shape[0] >= 2 and len(set(map(tuple, batch.image_grids.tolist()))) == 3
    out = model(batch)
    assert torch.isfinite(out.loss) and out.lm_loss > 0 and out.diffusion_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 5.0 * out.diffusion_loss)
    out.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_text_only_batch_has_zero_diffusion_loss():
    model = tc.Transfusion(tiny_config())
    batch = tc.Packer(model.config, 32)([[[1, 2, 3]], [[4, 5]]])
    out = model(batch)
    assert out.diffusion_loss == 0 and torch.isfinite(out.lm_loss) and out.lm_loss > 0


def test_the_loss_reads_only_text_targets():
    """The token ids at image and padding positions are never read."""
    torch.manual_seed(0)
    model = tc.Transfusion(tiny_config())
    batch = packed()
    noise = torch.randn_like(batch.patches)
    before = model(batch, noise=noise)
    not_text = (batch.image_ids != 0) | (batch.doc_ids < 0)
    scrambled = dataclasses.replace(batch, tokens=torch.where(not_text, 7, batch.tokens))
    torch.testing.assert_close(model(scrambled, noise=noise), before, rtol=0, atol=0)


@pytest.mark.parametrize("image_encoder", ["linear", "unet"])
def test_kernel_path_matches_reference_path(image_encoder, monkeypatch):
    """Triton kernels (in the interpreter on CPU) and the eager reference: same loss, same grads."""
    torch.manual_seed(0)
    model = tc.Transfusion(tiny_config(image_encoder=image_encoder))
    with torch.no_grad():  # unit-gain weights: attention far from uniform, errors show downstream
        for parameter in model.parameters():
            parameter.normal_(0.0, 1.0 / max(parameter.shape[-1], 1) ** 0.5 if parameter.ndim > 1 else 0.5)
    batch = packed(seq_len=40)
    results = {}
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        model.zero_grad()
        out = model(batch)  # seeded noise: generated in-kernel on one path, eagerly on the other
        out.loss.backward()
        results[interpret] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (ref_out, ref_grads), (kernel_out, kernel_grads) = results["0"], results["1"]
    torch.testing.assert_close(kernel_out, ref_out, rtol=1e-4, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(kernel_grads[name], grad, rtol=1e-3, atol=1e-5, msg=f"gradient of {name}")


@pytest.mark.parametrize("image_encoder", ["linear", "unet"])
def test_training_steps_reduce_the_loss(image_encoder):
    torch.manual_seed(0)
    model = tc.Transfusion(tiny_config(image_encoder=image_encoder))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = packed()
    losses = []
    for _ in range(12):
        out = model(batch)  # the same batch, timesteps and noise seed: the loss must fall
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append((out.loss.item(), out.lm_loss.item(), out.diffusion_loss.item()))
    first, last = losses[0], losses[-1]
    assert last[0] < 0.7 * first[0], losses
    assert last[1] < first[1] and last[2] < first[2], losses


def test_predict_rejects_a_patch_buffer_of_the_wrong_size():
    model = tc.Transfusion(tiny_config())
    batch = packed()
    with pytest.raises(ValueError, match=r"x_t: expected \d+ patches"):
        model.predict(batch, batch.patches[:-1])


UNET_PATCH_3 = dict(image_encoder="unet", patch_size=3, image_size=6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dim=30), r"TransfusionConfig.n_heads: expected a divisor of dim=30"),
        (dict(n_kv_heads=3), r"TransfusionConfig.n_kv_heads: expected a divisor of n_heads=4"),
        (dict(image_encoder="vae"), r"TransfusionConfig.image_encoder: expected one of"),
        (UNET_PATCH_3, r"TransfusionConfig.patch_size: expected a power of 2,"),
        (dict(image_encoder="unet", patch_size=4), r"TransfusionConfig.unet_channels: expected 3 positive ints"),
        (dict(eoi_id=256), r"TransfusionConfig.boi_id: expected bos_id, eos_id, boi_id and eoi_id all different"),
        (dict(vocab_size=100), r"TransfusionConfig.bos_id: expected a token id in \[0, vocab_size=100\)"),
        (dict(diffusion_target="noise"), r"TransfusionConfig.diffusion_target: expected one of"),
        (dict(image_size=5), r"TransfusionConfig.image_size: expected a multiple of patch_size=2"),
    ],
)
def test_bad_config_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


# ------------------------------------------------------------------ checkpoints
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
