"""The training script: options, schedule, learning, kernel/reference parity, checkpoints, exact resume,\nuser data, VAE latents (the torchrun tests are in test_train_distributed.py)."""

import dataclasses
import json
import math
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import transfusion_core as tc
from transfusion_core import checkpoint, codec, evaluate, train
from transfusion_core.checkpoint import CheckpointError
from transfusion_core.datasets import DataError, detect_shapes, heldout_set

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


def test_every_option_is_declared_once_by_its_field():
    """TrainArgs' fields are the options: the parser's flags, the presets, the checks and the resume identity
    are read from them, and the README's table names every flag and no other."""
    options = {f.name: f for f in dataclasses.fields(train.TrainArgs)}
    flags = {action.dest: action.option_strings for action in train.argument_parser()._actions
             if action.dest != "help"}
    assert set(flags) == set(options)
    assert flags["plots"] == ["--no-plots"] and flags["min_lr_ratio"] == ["--min-lr-ratio"]
    assert all(flags[name] == [checkpoint.option_flag(name)] for name in options if name != "plots")
    assert train.PRESETS["tiny"] == {name: f.metadata["presets"]["tiny"] for name, f in options.items()
                                     if "tiny" in f.metadata["presets"]}
    assert set(train.PRESETS["small"]) < set(train.PRESETS["tiny"])
    assert set(train.RUN_IDENTITY) < set(options) and {"lr", "seed", "vae"} <= set(train.RUN_IDENTITY)
    assert not {"out", "resume", "stop_at", "log_every", "threads"} & set(train.RUN_IDENTITY)
    readme = (Path(train.__file__).parent / "README.md").read_text()
    table = readme[readme.index("### Options"):readme.index("### Data, codec")]
    assert set(re.findall(r"`(--[a-z-]+)`", table)) == {flag for names in flags.values() for flag in names}


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "8", "--micro-batches", "3"], "--micro-batches"),
    (["--lr", "0"], "--lr: expected a finite float > 0"),
    (["--lr", "inf"], "--lr: expected a finite float > 0"),
    (["--lr", "nan"], "--lr: expected a finite float > 0"),
    (["--weight-decay", "inf"], "--weight-decay: expected a finite float >= 0"),
    (["--cfg-scale", "nan"], "--cfg-scale: expected a finite float"),
    (["--steps", "0"], "--steps"),
    (["--steps", "10", "--stop-at", "11"], "--stop-at"),
    (["--drop-caption-prob", "1.5"], "--drop-caption-prob"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--max-shapes", "3"], r"--max-shapes: expected an int in \[1, 2\], got 3"),
    (["--image-size", "20"], "--image-size: expected a multiple of 16 up to 1024 with --data shapes"),
    (["--image-size", "2048"], "--image-size: expected a multiple of 16 up to 1024"),
    (["--heldout-data", "x.jsonl"], "--heldout-data: expected none with --data shapes"),
    (["--seed", "-1"], "--seed: expected an int >= 0"),
    (["--device", "banana"], r"--device: expected one of \('cpu', 'cuda'\)"),
    (["--vae", "/nowhere"], "--vae: expected a diffusers AutoencoderKL directory"),
    (["--out", ""], "--out: expected a non-empty string"),
    (["--noise-schedule", "flow", "--flow-shift", "0"], "--flow-shift: expected a finite float > 0"),
    (["--flow-time-std", "-1"], "--flow-time-std: expected a finite float > 0"),
    (["--flow-time-mean", "nan"], "--flow-time-mean: expected a finite float"),
])
def test_bad_options_raise_naming_the_option(argv, message, capsys):
    with pytest.raises(ValueError, match=message):
        train.parse_args(argv)
    assert re.search(message, cli_error(argv, capsys))


def test_a_hand_built_train_args_of_the_wrong_type_is_a_type_error():
    args = train.parse_args([])
    with pytest.raises(TypeError, match="--lr: expected a finite float > 0, got '1e-3'"):
        train.check_args(dataclasses.replace(args, lr="1e-3"))
    with pytest.raises(TypeError, match="--resume: expected a bool"):
        train.train(dataclasses.replace(args, resume=1))


def test_model_options_the_config_rejects_are_reported(tmp_path, capsys):
    args = train.parse_args(["--dim", "30", "--n-heads", "4"])
    with pytest.raises(ValueError, match="model options: TransfusionConfig.n_heads"):
        train.model_config(args, train.PixelCodec())
    assert "model options: TransfusionConfig.n_heads" in cli_error(tiny_argv(tmp_path, "--dim", "30"), capsys)
    assert "--sample-steps: expected at most the model's 1000 timesteps, got 5000" in cli_error(
        tiny_argv(tmp_path, "--sample-steps", "5000"), capsys)
    assert "--image-first-t-max: expected at most the model's last timestep, 999, got 1000" in cli_error(
        tiny_argv(tmp_path, "--image-first-t-max", "1000"), capsys)


def test_packing_options_reach_the_packer(monkeypatch, tmp_path):
    """--clean-image-copies and --image-first-t-max are the Packer's arguments in the training loop."""
    created = []

    class Recorded(train.Packer):
        def __init__(self, *args, **kwargs):
            created.append(kwargs)
            raise RuntimeError("recorded")

    monkeypatch.setattr(train, "Packer", Recorded)
    args = train.parse_args(tiny_argv(tmp_path, "--clean-image-copies", "--image-first-t-max", "999", "--steps", "1"))
    with pytest.raises(RuntimeError, match="recorded"):
        train.train(args)
    assert created[0]["clean_image_copies"] is True and created[0]["image_first_t_max"] == 999
    assert train.parse_args([]).clean_image_copies is False and train.parse_args([]).image_first_t_max == 500


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


def run(argv):
    """The training function itself: errors raise (``train.main`` turns them into one line)."""
    return train.train(train.parse_args(argv))


def cli_error(argv, capsys) -> str:
    """``python -m transfusion_core.train ARGV`` fails: exit status 1, one line on stderr, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_resume_refuses_a_checkpoint_of_other_options(tmp_path, capsys):
    train.main(tiny_argv(tmp_path, "--steps", "4", "--stop-at", "1"))
    message = r"--resume: .* \(--lr: checkpoint 0.003, now 0.001\)"
    with pytest.raises(ValueError, match=message):
        run(tiny_argv(tmp_path, "--steps", "4", "--resume") + ["--lr", "1e-3"])
    assert re.search(message, cli_error(tiny_argv(tmp_path, "--steps", "4", "--resume") + ["--lr", "1e-3"], capsys))


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


# ----------------------------------------------------------------------------------------------
# Kills, damaged run files, changed data: --resume continues exactly or refuses, naming why
# ----------------------------------------------------------------------------------------------
class Killed(BaseException):
    """A SIGKILL, as the files see it: nothing after it runs."""


def kill_at_rename(monkeypatch, source_name, step):
    """Kill the run at the rename of ``source_name`` while the checkpoint of ``step`` is being swapped in."""
    real_rename = os.rename

    def rename(source, target, *args, **kwargs):
        partial = Path(source).with_name(Path(source).name.split(".")[0] + ".partial")
        if Path(source).name == source_name and checkpoint.read_train_state(partial)["step"] == step:
            raise Killed(f"killed at rename {source} -> {target}")
        return real_rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)


def losses(history):
    return [(r["loss"], r["lm_loss"], r["diffusion_loss"], r["grad_norm"]) for r in history]


def test_two_kills_in_a_row_resume_from_the_newest_checkpoint_bit_identically(tmp_path, monkeypatch, capsys):
    """Killed between the two renames of step 2's swap (checkpoint.previous =
    step 1, checkpoint.partial = step 2, no checkpoint/), resumed, then killed again between the
    renames of step 3's: the second resume starts at step 3 with metrics 1..3, and the run ends
    as an uninterrupted one."""
    argv = tiny_argv(tmp_path / "run", "--steps", "4", "--checkpoint-every", "1")
    whole = train.main(tiny_argv(tmp_path / "whole", "--steps", "4"))
    with monkeypatch.context() as patch, pytest.raises(Killed):
        kill_at_rename(patch, "checkpoint.partial", 2)
        train.main(argv)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["checkpoint.partial", "checkpoint.previous", "metrics.jsonl"]
    with monkeypatch.context() as patch, pytest.raises(Killed):
        kill_at_rename(patch, "checkpoint.partial", 3)
        train.main(argv + ["--resume"])
    assert "resumed from" in capsys.readouterr().out
    assert checkpoint.read_train_state(tmp_path / "run" / "checkpoint.previous")["step"] == 2
    rest = train.main(argv + ["--resume"])
    assert "at step 3" in capsys.readouterr().out and [r["step"] for r in rest] == [4]
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert losses(metrics(tmp_path / "run")) == losses(whole)


def test_a_torn_last_metrics_line_is_dropped_and_said(tmp_path, capsys):
    argv = tiny_argv(tmp_path, "--steps", "3")
    train.main(argv + ["--stop-at", "2"])
    with (tmp_path / train.METRICS_FILE).open("a") as file:
        file.write('{"step": 3, "loss": 7.1, "lm_lo')  # killed while appending
    train.main(argv + ["--resume"])
    assert "metrics.jsonl: dropped a torn last line (line 3" in capsys.readouterr().out
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    lines = (tmp_path / train.METRICS_FILE).read_text().splitlines()
    (tmp_path / train.METRICS_FILE).write_text("\n".join([lines[0], "garbage", lines[1]]) + "\n")
    assert re.search(r"metrics.jsonl:2: not a metrics record \(b'garbage'\)",
                     cli_error(argv + ["--resume"], capsys))


def _edit_state(path, edit):
    state_file = path / "checkpoint" / "train_state.json"
    state = json.loads(state_file.read_text())
    edit(state)
    state_file.write_text(json.dumps(state))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(step=-5), r"train_state.json: step: expected an int >= 1, got -5"),
    (lambda s: s.update(step="2"), r"train_state.json: step: expected an int >= 1, got '2'"),
    (lambda s: s.update(step=99), r"train_state.json: step: expected at most --steps=3, got 99"),
    (lambda s: s.pop("args"), r"train_state.json: args: expected an object of the run's options, got None"),
    (lambda s: s["args"].pop("lr"), r"train_state.json: args: missing options \['lr'\]"),
    (lambda s: s.pop("data"), r"train_state.json: data: expected the sizes and hashes"),
    (lambda s: s["data"].pop("vae"), r"train_state.json: data: expected the keys \['data', 'heldout_data', 'vae'\]"),
    (lambda s: s.update(codec={"kind": "vae"}), r"--resume: .* was trained with codec \{'kind': 'vae'\}"),
    (lambda s: s.update(world_size=0), r"train_state.json: world_size: expected an int >= 1, got 0"),
    (lambda s: s.update(param_groups=[]), r"train_state.json: param_groups: expected a list"),
    (lambda s: s["param_groups"][0].update(betas="x"), r"train_state.json: param_groups\[0\].betas: expected \[0.9"),
    (lambda s: s["param_groups"][0].update(lr=None), r"train_state.json: param_groups\[0\].lr: expected a finite"),
    (lambda s: s["param_groups"][0].pop("eps"), r"train_state.json: param_groups\[0\]: keys"),
    (lambda s: s["param_groups"][0]["params"].pop(), r"train_state.json: param_groups\[0\].params: expected"),
])
def test_damaged_train_state_is_one_named_error(tmp_path, capsys, edit, message):
    argv = tiny_argv(tmp_path, "--steps", "3")
    train.main(argv + ["--stop-at", "1"])
    _edit_state(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        run(argv + ["--resume"])
    assert re.search(message, cli_error(argv + ["--resume"], capsys))
    assert [r["step"] for r in metrics(tmp_path)] == [1]  # nothing was touched


def test_a_train_state_without_options_that_have_defaults_is_refused_naming_them(tmp_path, capsys):
    """train_state.json holds every option of the run's identity: one left out is refused even where the
    preset has a value for it, and another schedule is named as a difference."""
    argv = tiny_argv(tmp_path, "--steps", "2")
    train.main(argv + ["--stop-at", "1"])
    assert re.search(r"was trained with other options \(.*--noise-schedule: checkpoint 'cosine', now 'flow'\)",
                     cli_error(argv + ["--noise-schedule", "flow", "--resume"], capsys))
    _edit_state(tmp_path, lambda s: [s["args"].pop(name) for name in ("noise_schedule", *tc.config.FLOW_DEFAULTS)])
    assert re.search(r"train_state.json: args: missing options \['noise_schedule', 'flow_time_distribution', "
                     r"'flow_time_mean', 'flow_time_std', 'flow_shift'\]", cli_error(argv + ["--resume"], capsys))
    assert [r["step"] for r in metrics(tmp_path)] == [1]  # nothing was touched


def test_damaged_checkpoint_files_are_named_and_never_mean_step_0(tmp_path, capsys):
    argv = tiny_argv(tmp_path, "--steps", "3")
    train.main(argv + ["--stop-at", "1"])
    config_file = tmp_path / "checkpoint" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"norm_eps": 1e-3}))
    assert re.search(r"config.json: not the run's model \(norm_eps: checkpoint 0.001, run 1e-05\)",
                     cli_error(argv + ["--resume"], capsys))
    config_file.write_text(json.dumps(config | {"norm_eps": "1e-5"}))
    assert re.search(r"config.json: TransfusionConfig.norm_eps: expected a finite float > 0, got '1e-5'",
                     cli_error(argv + ["--resume"], capsys))
    config_file.write_text(json.dumps(config))
    (tmp_path / "checkpoint" / "optimizer.safetensors").write_bytes(b"\x00" * 5)
    assert "optimizer.safetensors: not a readable safetensors file" in cli_error(argv + ["--resume"], capsys)
    (tmp_path / "checkpoint" / "optimizer.safetensors").unlink()  # no complete checkpoint anywhere
    assert re.search(r"checkpoint: not a complete checkpoint \(missing optimizer.safetensors\)",
                     cli_error(argv + ["--resume"], capsys))
    assert [r["step"] for r in metrics(tmp_path)] == [1]


def test_stop_at_before_the_checkpoint_and_a_run_that_starts_over(tmp_path, capsys):
    argv = tiny_argv(tmp_path, "--steps", "3")
    train.main(argv + ["--stop-at", "2"])
    assert "--stop-at: expected a step after the checkpoint's step 2, got 1" in cli_error(
        argv + ["--stop-at", "1", "--resume"], capsys)
    train.main(argv + ["--stop-at", "1"])  # no --resume: the old checkpoint goes at once
    assert "starting over (no --resume): removed the checkpoint" in capsys.readouterr().out
    assert checkpoint.read_train_state(tmp_path / "checkpoint")["step"] == 1


@pytest.fixture
def user_data(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    for name, colour in (("red.png", (255, 0, 0)), ("green.png", (0, 255, 0))):
        image_module.new("RGB", (16, 16), colour).save(tmp_path / name)
    lines = ['{"image": "red.png", "caption": "red"}', '{"image": "green.png", "caption": "green"}']
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_resume_refuses_data_whose_contents_changed(user_data, capsys):
    image_module = pytest.importorskip("PIL.Image")
    argv = tiny_argv(user_data / "run", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
                     "--data", str(user_data / "train.jsonl"))
    train.main(argv + ["--stop-at", "1"])
    state = checkpoint.read_train_state(user_data / "run" / "checkpoint")
    jsonl = (user_data / "train.jsonl").stat().st_size
    images = sum((user_data / name).stat().st_size for name in ("red.png", "green.png"))
    assert state["data"]["data"]["bytes"] == jsonl + images and state["data"]["heldout_data"] is None
    image_module.new("RGB", (16, 16), (0, 0, 255)).save(user_data / "red.png")  # same path, other contents
    error = cli_error(argv + ["--resume"], capsys)
    assert re.search(r"--resume: the data changed since .* was written: --data .*train.jsonl \(checkpoint \d+ "
                     r"bytes, sha256 [0-9a-f]{12}, now \d+ bytes, sha256 [0-9a-f]{12}\)", error)


@pytest.mark.parametrize("line, message", [
    (b'{"image": "red.png", "caption": "r\xe9d"}', r"train.jsonl:2: not UTF-8 \(byte 0xe9"),
    (b'{"image": "red.png\\u0000", "caption": "red"}', r"train.jsonl:2: 'image' contains a NUL byte"),
    (b'{"image": "red.png", "caption": "' + b"x" * 20 + b'"}',
     r"train.jsonl:2: caption of 20 bytes, more than the 12 a training row has room for"),
])
def test_data_errors_end_in_one_line_naming_file_and_line_before_training(user_data, capsys, line, message):
    (user_data / "train.jsonl").write_bytes(b'{"image": "red.png", "caption": "red"}\n' + line + b"\n")
    argv = tiny_argv(user_data / "run", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
                     "--data", str(user_data / "train.jsonl"))
    with pytest.raises(DataError, match=message):
        run(argv)
    assert re.search(message, cli_error(argv, capsys))
    assert not (user_data / "run" / train.METRICS_FILE).exists()  # found at load time, not at a step


def test_seq_len_too_short_for_the_embedded_captions_is_an_option_error(tmp_path, capsys):
    """Two shapes: captions up to 78 bytes; the 16 patches of a 16x16 image and 4 specials: 98 positions."""
    error = cli_error(tiny_argv(tmp_path, "--max-shapes", "2", "--seq-len", "57", "--patch-size", "4"), capsys)
    assert "--seq-len: expected at least 98 (the longest caption of the embedded data set with --max-shapes 2, " \
           "78 bytes, its image's 16 patches and BOS/BOI/EOI/EOS), got 57" in error
    assert "--seq-len: expected at least 20" in cli_error(tiny_argv(tmp_path, "--seq-len", "10", "--patch-size", "4"),
                                                          capsys)


# ------------------------------------------------------------------------------ continuous-time flow
def test_noise_schedule_flow_option_and_its_defaults(tmp_path, capsys):
    assert train.PRESETS["tiny"]["noise_schedule"] == "cosine" and train.PRESETS["tiny"]["diffusion_target"] == "v"
    args = train.parse_args(["--noise-schedule", "flow"])
    assert args.diffusion_target == "flow", "a flow model predicts the velocity unless told otherwise"
    assert (args.flow_time_distribution, args.flow_time_mean, args.flow_time_std, args.flow_shift) == (
        "logit_normal", 0.0, 1.0, 1.0)
    config = train.model_config(train.parse_args(["--noise-schedule", "flow", "--diffusion-target", "v",
                                                  "--flow-shift", "2"]), train.PixelCodec())
    assert config.continuous_time and config.diffusion_target == "v" and config.flow_shift == 2.0
    assert "model options: TransfusionConfig.diffusion_target: expected 'flow', 'v' or 'x0' with " \
        "noise_schedule='flow'" in cli_error(tiny_argv(tmp_path, "--noise-schedule", "flow", "--diffusion-target",
                                                       "eps"), capsys)
    assert "model options: TransfusionConfig.flow_shift: expected 1.0: the flow_* fields apply to " \
        "noise_schedule='flow' only, got 2.0" in cli_error(tiny_argv(tmp_path, "--flow-shift", "2"), capsys)


def test_a_flow_run_learns_resumes_exactly_and_evaluates_with_euler(tmp_path, capsys):
    argv = tiny_argv(tmp_path, "--steps", "40", "--noise-schedule", "flow", "--flow-shift", "1.5",
                     "--heldout-samples", "2")
    history = train.main(argv)
    first = sum(r["loss"] for r in history[:5]) / 5
    last = sum(r["loss"] for r in history[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert sum(r["diffusion_loss"] for r in history[-5:]) < sum(r["diffusion_loss"] for r in history[:5])
    model = tc.Transfusion.load(tmp_path / train.CHECKPOINT_DIR)
    assert model.config.noise_schedule == "flow" and model.config.flow_shift == 1.5
    parts = tmp_path / "parts"
    argv_parts = argv[:1] + [str(parts)] + argv[2:]
    train.main(argv_parts + ["--stop-at", "20"])
    resumed = train.main(argv_parts + ["--resume"])
    assert [r["loss"] for r in resumed] == [r["loss"] for r in history[20:]], "bit-identical"
    assert "--flow-shift: checkpoint 1.5, now 2.0" in cli_error(
        [a if a != "1.5" else "2.0" for a in argv_parts] + ["--resume"], capsys)
    results = evaluate.main([str(tmp_path / train.CHECKPOINT_DIR), "--image-steps", "2", "--threads", "1"])
    assert results["settings"]["sampler"] == "euler" and math.isfinite(results["caption_perplexity"])
