"""The training script: options, schedule, learning, kernel/reference parity, checkpoints, exact resume,\nuser data, VAE latents (the torchrun tests are in test_train_distributed.py)."""

import json
import math
import struct

import pytest
import torch
from safetensors.torch import load_file

import transfusion_core as tc
from transfusion_core import checkpoint, codec, evaluate, train
from transfusion_core.datasets import detect_shapes, heldout_set

pytestmark = pytest.mark.usefixtures("one_thread", "reference_path")


def tiny_argv(out, *extra):
    """A model and batch small enough for a step in tens of milliseconds."""
    return ["--out", str(out), "--dim", "32", "--n-layers", "2", "--n-heads", "2", "--batch-size", "8",
            "--seq-len", "160", "--warmup", "2", "--lr", "3e-3", "--log-every", "100", "--no-plots", *extra]


def metrics(out):
    return [json.loads(line) for line in (out / train.METRICS_FILE).read_text().splitlines()]


def test_presets_fill_every_option_and_the_command_line_wins():
    args = train.parse_args([])
    assert args.preset == "tiny" and args.out == "runs/tiny" and args.data == "shapes"
    assert args.steps == train.PRESETS["tiny"]["steps"] and args.plots and not args.resume
    small = train.parse_args(["--preset", "small", "--steps", "7"])
    assert small.dim == train.PRESETS["small"]["dim"] and small.steps == 7
    assert small.seq_len == train.PRESETS["small"]["seq_len"] and small.lr == train.PRESETS["small"]["lr"]


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "8", "--micro-batches", "3"], "--micro-batches"),
    (["--lr", "0"], "--lr"),
    (["--steps", "0"], "--steps"),
    (["--steps", "10", "--stop-at", "11"], "--stop-at"),
    (["--drop-caption-prob", "1.5"], "--drop-caption-prob"),
    (["--grad-clip", "-1"], "--grad-clip"),
])
def test_bad_options_raise_naming_the_option(argv, message):
    with pytest.raises(ValueError, match=message):
        train.parse_args(argv)


def test_model_options_the_config_rejects_are_reported():
    args = train.parse_args(["--dim", "30", "--n-heads", "4"])
    with pytest.raises(ValueError, match="model options: TransfusionConfig.n_heads"):
        train.model_config(args, train.PixelCodec())


def test_learning_rate_warms_up_then_decays_to_the_floor():
    args = train.parse_args(["--steps", "100", "--warmup", "10", "--lr", "1e-3", "--min-lr-ratio", "0.1"])
    rates = [train.learning_rate(args, step) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(rates[:9], rates[1:10]))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] == pytest.approx(1e-4, rel=0.01)


def test_micro_batches_are_a_function_of_seed_step_and_index(tmp_path):
    args = train.parse_args(tiny_argv(tmp_path, "--micro-batches", "2"))
    config = train.model_config(args, train.PixelCodec())
    dataset = tc.datasets.ShapesDataset(100, seed=args.seed)

    def packed(step, micro):
        stream = train.DocumentStream(dataset, None, args.seed)
        return train.micro_batch(stream, tc.Packer(config, args.seq_len, caption_first_prob=0.8), args, step, micro)

    a, b, other = packed(3, 1), packed(3, 1), packed(3, 0)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.patches, b.patches)
    assert torch.equal(a.timesteps, b.timesteps) and a.noise_seed == b.noise_seed
    assert not torch.equal(a.patches, other.patches)
    assert a.num_images == 4  # batch_size / micro_batches documents, one image each


def test_loss_decreases_on_a_tiny_run(tmp_path):
    history = train.main(tiny_argv(tmp_path, "--steps", "40"))
    assert [r["step"] for r in history] == list(range(1, 41))
    first = sum(r["loss"] for r in history[:5]) / 5
    last = sum(r["loss"] for r in history[-5:]) / 5
    assert last < 0.8 * first, (first, last)  # 10.3 -> 7.3 (LM 5.6 -> 2.9) when written
    assert sum(r["lm_loss"] for r in history[-5:]) < sum(r["lm_loss"] for r in history[:5])
    assert sum(r["diffusion_loss"] for r in history[-5:]) < sum(r["diffusion_loss"] for r in history[:5])
    assert metrics(tmp_path) == history


def test_kernel_path_matches_reference_path_over_the_first_steps(tmp_path, monkeypatch):
    """Triton kernels (interpreter) vs eager reference, whole training steps: the losses and the
    gradient norm agree to a relative 1e-5 at every step (float32; ~1e-7 observed, the rounding
    of different summation orders, carried through the updates in between)."""
    argv = tiny_argv(tmp_path, "--steps", "3", "--batch-size", "4", "--seq-len", "112")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reference = train.main(argv[:1] + [str(tmp_path / "reference")] + argv[2:])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels = train.main(argv[:1] + [str(tmp_path / "kernels")] + argv[2:])
    for ref, ker in zip(reference, kernels, strict=True):
        for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm"):
            assert ker[key] == pytest.approx(ref[key], rel=1e-5), (ref["step"], key)
    assert reference[-1]["loss"] != reference[0]["loss"]  # the steps did change the model


def test_checkpoint_is_safetensors_and_json_and_loads_as_a_model(tmp_path):
    train.main(tiny_argv(tmp_path, "--steps", "2"))
    checkpoint = tmp_path / train.CHECKPOINT_DIR
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "train_state.json"]
    for name in ("model.safetensors", "optimizer.safetensors"):  # safetensors: 8-byte header size, JSON
        raw = (checkpoint / name).read_bytes()
        header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
        assert all(entry["dtype"] == "F32" for key, entry in header.items() if key != "__metadata__")
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["step"] == 2 and state["args"]["steps"] == 2 and state["codec"] == {"kind": "pixels"}
    model = tc.Transfusion.load(checkpoint)
    assert model.config.patch_position_embedding and model.config.patch_size == 4
    optimizer = load_file(str(checkpoint / "optimizer.safetensors"))
    assert set(optimizer) == {f"{name}/{key}" for name, _ in model.named_parameters()
                              for key in ("step", "exp_avg", "exp_avg_sq")}
    assert float(optimizer["tok_embeddings.weight/step"]) == 2


def test_resume_after_an_interruption_is_bit_identical(tmp_path):
    argv = tiny_argv(tmp_path, "--steps", "6", "--checkpoint-every", "100")
    whole = train.main(argv[:1] + [str(tmp_path / "whole")] + argv[2:])
    parts = tmp_path / "parts"
    first = train.main(argv[:1] + [str(parts)] + argv[2:] + ["--stop-at", "3"])
    assert [r["step"] for r in first] == [1, 2, 3]
    rest = train.main(argv[:1] + [str(parts)] + argv[2:] + ["--resume"])
    assert [r["step"] for r in rest] == [4, 5, 6]
    for a, b in zip(whole, first + rest, strict=True):
        assert (a["loss"], a["lm_loss"], a["diffusion_loss"], a["grad_norm"]) == (
            b["loss"], b["lm_loss"], b["diffusion_loss"], b["grad_norm"])
    for name in ("model.safetensors", "optimizer.safetensors"):
        expected = load_file(str(tmp_path / "whole" / train.CHECKPOINT_DIR / name))
        resumed = load_file(str(parts / train.CHECKPOINT_DIR / name))
        assert expected.keys() == resumed.keys()
        assert all(torch.equal(expected[key], resumed[key]) for key in expected), name
    assert [r["step"] for r in metrics(parts)] == list(range(1, 7))


def test_resume_refuses_a_checkpoint_of_other_options(tmp_path):
    train.main(tiny_argv(tmp_path, "--steps", "4", "--stop-at", "1"))
    with pytest.raises(ValueError, match=r"--resume: .* \(--lr: checkpoint 0.003, now 0.001\)"):
        train.main(tiny_argv(tmp_path, "--steps", "4", "--resume") + ["--lr", "1e-3"])


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, capsys):
    history = train.main(tiny_argv(tmp_path, "--steps", "1", "--resume"))
    assert [r["step"] for r in history] == [1]
    assert "no checkpoint" in capsys.readouterr().out


def test_progress_lines_show_loss_parts_throughput_and_eta(tmp_path, capsys):
    train.main(tiny_argv(tmp_path, "--steps", "4") + ["--log-every", "2"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "4/4"]
    assert all("lm " in line and "diffusion " in line and "tok/s" in line and "ETA" in line for line in lines)


def test_the_end_of_a_run_writes_the_loss_curve_and_samples(tmp_path):
    pytest.importorskip("matplotlib")
    argv = [arg for arg in tiny_argv(tmp_path, "--steps", "2", "--samples", "2", "--sample-steps", "2")
            if arg != "--no-plots"]
    train.main(argv)
    for name in ("loss_curve.png", "samples.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_training_and_evaluation_on_user_data_with_a_corrupt_image(tmp_path, capsys):
    image_module = pytest.importorskip("PIL.Image")
    for name, colour in (("red.png", (255, 0, 0)), ("green.png", (0, 255, 0)), ("blue.png", (0, 0, 255))):
        image_module.new("RGB", (24, 24), colour).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = ['{"image": "red.png", "caption": "red"}', '{"image": "broken.png", "caption": "broken"}',
             '{"image": "green.png", "caption": "green"}']
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "heldout.jsonl").write_text('{"image": "blue.png", "caption": "blue"}\n')
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="broken.png"):
        history = train.main(tiny_argv(out, "--steps", "2", "--batch-size", "4", "--seq-len", "32") + [
            "--data", str(tmp_path / "train.jsonl"), "--heldout-data", str(tmp_path / "heldout.jsonl")])
    assert len(history) == 2 and all(math.isfinite(r["loss"]) for r in history)
    assert "2 images, 1 unreadable skipped" in capsys.readouterr().out
    results = evaluate.main([str(out / "checkpoint"), "--image-steps", "2"])
    assert set(results["image_to_text"]) == {"exact"} and "text_to_image" not in results
    assert results["caption_perplexity"] > 1


def test_resume_finds_the_checkpoint_kept_aside_by_an_interrupted_swap(tmp_path, capsys):
    whole = train.main(tiny_argv(tmp_path / "whole", "--steps", "2"))
    train.main(tiny_argv(tmp_path, "--steps", "2", "--stop-at", "1"))
    checkpoint = tmp_path / train.CHECKPOINT_DIR
    checkpoint.rename(checkpoint.with_name("checkpoint.previous"))  # stopped between the two renames
    rest = train.main(tiny_argv(tmp_path, "--steps", "2", "--resume"))
    assert "resumed from" in capsys.readouterr().out and [r["step"] for r in rest] == [2]
    assert rest[0]["loss"] == whole[1]["loss"] and (checkpoint / "model.safetensors").is_file()


def test_training_and_evaluation_on_vae_latents(vae_dir, tmp_path):
    out = tmp_path / "run"
    train.main(["--out", str(out), "--vae", str(vae_dir), "--patch-size", "2", "--train-samples", "16",
                "--heldout-samples", "2", "--dim", "32", "--n-layers", "2", "--n-heads", "2", "--batch-size", "4",
                "--steps", "2", "--no-plots", "--threads", "1"])
    state = checkpoint.read_train_state(out / "checkpoint")
    assert state["codec"] == {"kind": "vae", "path": str(vae_dir.resolve())}
    assert len(list((out / "latents").glob("latents-*.safetensors"))) == 1
    results = evaluate.main([str(out / "checkpoint"), "--image-steps", "2", "--threads", "1"])
    assert results["samples"] == 2
    # The figures again, without evaluate's loops: from the checkpoint, the held-out scenes and the
    # run's VAE (text -> image decodes the generated latents, the rest reads encoded images).
    model, vae, tokenizer = tc.Transfusion.load(out / "checkpoint"), codec.VAECodec(vae_dir), tc.ByteTokenizer()
    run = state["args"]
    heldout = heldout_set(run["data"], image_size=run["image_size"], max_shapes=run["max_shapes"],
                          heldout_samples=run["heldout_samples"], seed=run["seed"])
    items = [heldout[i] for i in range(len(heldout))]
    latents = vae.encode(torch.stack([item.image for item in items]))  # [2, 4, 8, 8]
    text_to_image = dict.fromkeys(("exact", "colour", "shape", "position"), 0)
    longest, captions_right = max(len(tokenizer.encode(item.caption)) for item in items), 0
    for i, (item, latent) in enumerate(zip(items, latents)):
        generated = model.generate([tokenizer.encode(item.caption)], force_image=True, max_new_tokens=0,
                                   image_steps=2, sampler="ddim", cfg_scale=3.0, clip_x0=None, seed=i)[0]
        found = detect_shapes(vae.decode(generated[None])[0])
        text_to_image["exact"] += found == item.shapes
        for name in ("colour", "shape", "position"):  # one shape per image: a wrong count gets nothing
            text_to_image[name] += len(found) == 1 and getattr(found[0], name) == getattr(item.shapes[0], name)
        caption = model.generate([latent], max_new_tokens=longest + 8, temperature=0, image_steps=1, seed=0)
        captions_right += "".join(tokenizer.decode(part) for part in caption if isinstance(part, list)) == item.caption
    assert results["text_to_image"] == {name: hits / 2 for name, hits in text_to_image.items()}
    assert results["text_to_image"]["exact"] <= min(results["text_to_image"].values())  # exact: every attribute
    assert results["image_to_text"]["exact"] == captions_right / 2
    documents = [[latent, tokenizer.encode(item.caption)] for latent, item in zip(latents, items)]
    assert results["caption_perplexity"] == pytest.approx(evaluate.caption_perplexity(model, documents), rel=1e-6)
