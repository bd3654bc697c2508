"""Evaluate a training checkpoint: ``python -m transfusion_core.evaluate CHECKPOINT``.

On the held-out split of the run's data set (``CHECKPOINT/train_state.json`` names it):

- **text -> image**: an image generated from each held-out caption (DDIM, or Euler steps for a
  continuous-time flow model; classifier-free guidance) is read back with
  ``datasets.detect_shapes``: exact (every shape right) and accuracy of each attribute (colour,
  shape, position). Embedded data set only.
- **image -> text**: a greedy caption of each held-out image: exact match, and, on the embedded
  data set, accuracy of each attribute of the parsed caption.
- **caption perplexity**: per caption byte (EOS included) given the clean image, on held-out
  image-then-caption documents.

Prints a table (with chance levels) and writes JSON (``CHECKPOINT/eval.json`` by default).
``write_samples`` draws the training run's ``samples.png`` from the same generation helpers.
Attributes are compared shape by shape in reading order of positions; a missing or extra shape
counts as wrong for every attribute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tfkernels._checks import check_float, check_int

from .checkpoint import TRAIN_STATE_FILE, CheckpointError, read_train_state
from .codec import codec_from_description
from .config import IGNORE_INDEX
from .data import ByteTokenizer, Packer
from .datasets import DataError, ShapesDataset, detect_shapes, heldout_set, parse_caption
from .model import Transfusion
from .plots import write_samples_grid

ATTRIBUTES = ("colour", "shape", "position")
TOKENIZER = ByteTokenizer()


# ----------------------------------------------------------------------------------------------
# Generation in both directions
# ----------------------------------------------------------------------------------------------
def default_sampler(model: Transfusion) -> str:
    """The sampler of the evaluation and the samples: DDIM, or Euler for a continuous-time (flow) model;
    both take one model call per step."""
    return "euler" if model.config.continuous_time else "ddim"


@torch.no_grad()
def text_to_image(model: Transfusion, codec, caption: str, *, steps: int, cfg_scale: float | None,
                  seed: int, sampler: str | None = None) -> torch.Tensor:
    """An image ``[3, H, W]`` in [-1, 1] generated from a caption (``steps`` steps of ``sampler``,
    by default ``default_sampler(model)``)."""
    latent = model.generate([TOKENIZER.encode(caption)], force_image=True, max_new_tokens=0,
                            image_steps=steps, sampler=sampler or default_sampler(model), cfg_scale=cfg_scale,
                            clip_x0=codec.clip_x0, seed=seed)[0]
    return codec.decode(latent[None])[0]


@torch.no_grad()
def image_to_text(model: Transfusion, latent: torch.Tensor, *, max_new_tokens: int) -> str:
    """A greedy caption of an image latent ``[C, h, w]`` (the text it generates up to EOS)."""
    # Should the model open an image instead of text, one denoising step keeps that cheap; the
    # caption is the text alone.
    out = model.generate([latent], max_new_tokens=max_new_tokens, temperature=0, image_steps=1, seed=0)
    return "".join(TOKENIZER.decode(part) for part in out if isinstance(part, list))


def attribute_hits(truth, found) -> dict[str, int]:
    """Right attributes of the true shapes, pairing shapes in reading order (``None``: none right)."""
    found = found or []
    hits = dict.fromkeys(ATTRIBUTES, 0)
    if len(found) != len(truth):  # a missing or extra shape: no pairing to trust
        return hits
    for true, guess in zip(truth, found):
        for name in ATTRIBUTES:
            hits[name] += getattr(true, name) == getattr(guess, name)
    return hits


@torch.no_grad()
def caption_perplexity(model: Transfusion, documents, *, batch_size: int = 16) -> float:
    """Perplexity per caption byte (EOS included) of ``[latent, caption_tokens]`` documents.

    Images are read clean (t = 0), as generation reads a prompt image; the one target before
    the image (BOS -> BOI) is not a caption byte and is left out.
    """
    if not isinstance(documents, (list, tuple)) or not documents:
        raise ValueError(f"documents: expected a non-empty list of [latent, caption tokens], got {documents!r}"[:200])
    check_int("batch_size", batch_size, 1)
    config = model.config
    longest = max(len(tokens) for _, tokens in documents)
    patches = max(latent.shape[1] * latent.shape[2] for latent, _ in documents) // config.patch_size**2
    packer = Packer(config, longest + patches + 4, image_first_t_max=0)  # BOS, BOI, EOI, EOS
    nll, count = 0.0, 0
    for start in range(0, len(documents), batch_size):
        batch = packer(documents[start:start + batch_size]).to(model.device)
        if config.continuous_time:  # the packer's steps are integers: clean is the float time 0
            batch = dataclasses.replace(batch, timesteps=torch.zeros(batch.num_images, device=model.device))
        hidden, _ = model.predict(batch, batch.patches)
        scored = (batch.targets != IGNORE_INDEX) & (batch.tokens != config.bos_id)
        logits = model.logits(hidden[scored])
        nll += float(F.cross_entropy(logits, batch.targets[scored], reduction="sum"))
        count += int(scored.sum())
    return math.exp(nll / count)


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------
def evaluate(model: Transfusion, codec, heldout, *, samples: int | None = None, image_steps: int = 25,
             cfg_scale: float | None = 3.0, seed: int = 0, sampler: str | None = None, log=print) -> dict:
    """Metrics of ``model`` on the first ``samples`` items of ``heldout`` (all by default); images by
    ``image_steps`` steps of ``sampler`` (``default_sampler(model)`` by default)."""
    if not isinstance(model, Transfusion):
        raise TypeError(f"model: expected a Transfusion, got {type(model).__name__}")
    if samples is not None:
        check_int("samples", samples, 1)
    check_int("image_steps", image_steps, 1, model.config.num_timesteps)
    if cfg_scale is not None:
        check_float("cfg_scale", cfg_scale)
    check_int("seed", seed, 0)
    sampler = sampler or default_sampler(model)
    model.eval()
    count = len(heldout) if samples is None else min(samples, len(heldout))
    if count < 1:
        raise ValueError(f"heldout: expected at least 1 held-out item, got {len(heldout)}")
    items = [heldout[i] for i in range(count)]
    latents = codec.encode(torch.stack([item.image for item in items]))  # [n, C, h, w]
    shapes_data = isinstance(heldout, ShapesDataset)
    longest_caption = max(len(TOKENIZER.encode(item.caption)) for item in items)
    results = {"samples": count}
    progress_every = max(1, count // 4)

    started = time.perf_counter()
    documents = [[latent, TOKENIZER.encode(item.caption)] for latent, item in zip(latents, items)]
    results["caption_perplexity"] = caption_perplexity(model, documents)
    seconds = {"caption_perplexity": time.perf_counter() - started}

    started = time.perf_counter()
    exact, hits, total_shapes = 0, dict.fromkeys(ATTRIBUTES, 0), 0
    for i, (latent, item) in enumerate(zip(latents, items)):
        text = image_to_text(model, latent.to(model.device), max_new_tokens=longest_caption + 8)
        exact += text == item.caption
        if shapes_data:
            for name, hit in attribute_hits(item.shapes, parse_caption(text)).items():
                hits[name] += hit
            total_shapes += len(item.shapes)
        if (i + 1) % progress_every == 0 or i + 1 == count:
            log(f"  image -> text {i + 1}/{count}: exact {exact / (i + 1):.3f}  "
                f"({time.perf_counter() - started:.0f}s)")
    results["image_to_text"] = {"exact": exact / count}
    if shapes_data:
        results["image_to_text"] |= {name: hits[name] / total_shapes for name in ATTRIBUTES}
    seconds["image_to_text"] = time.perf_counter() - started

    if shapes_data:
        started = time.perf_counter()
        exact, hits = 0, dict.fromkeys(ATTRIBUTES, 0)
        for i, item in enumerate(items):
            image = text_to_image(model, codec, item.caption, steps=image_steps, cfg_scale=cfg_scale, seed=seed + i,
                                  sampler=sampler)
            found = detect_shapes(image)
            exact += found == item.shapes
            for name, hit in attribute_hits(item.shapes, found).items():
                hits[name] += hit
            if (i + 1) % progress_every == 0 or i + 1 == count:
                log(f"  text -> image {i + 1}/{count}: exact {exact / (i + 1):.3f}  "
                    f"({time.perf_counter() - started:.0f}s)")
        results["text_to_image"] = {"exact": exact / count} | {name: hits[name] / total_shapes for name in ATTRIBUTES}
        seconds["text_to_image"] = time.perf_counter() - started
        if heldout.max_shapes == 1:
            results["chance"] = heldout.chance()
    results["settings"] = {"image_steps": image_steps, "cfg_scale": cfg_scale, "sampler": sampler, "seed": seed}
    results["seconds"] = seconds
    return results


def format_table(results: dict) -> str:
    chance = results.get("chance", {})
    rows = [("metric", "value", "chance")]
    for task, label in (("text_to_image", "text -> image"), ("image_to_text", "image -> text")):
        for name, value in results.get(task, {}).items():
            rows.append((f"{label} {name}", f"{value:.3f}", f"{chance[name]:.3f}" if name in chance else ""))
    rows.append(("caption perplexity (per byte)", f"{results['caption_perplexity']:.4f}", ""))
    widths = [max(len(row[k]) for row in rows) for k in range(3)]
    lines = ["  ".join(cell.ljust(width) if k == 0 else cell.rjust(width)
                       for k, (cell, width) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The samples figure
# ----------------------------------------------------------------------------------------------
def write_samples(path, model: Transfusion, codec, heldout, *, samples: int, steps: int,
                  cfg_scale: float | None) -> None:
    """``samples.png``: images from the first ``samples`` held-out captions (``steps`` steps of
    ``default_sampler(model)``, guidance ``cfg_scale``) and greedy captions of the first held-out images."""
    check_int("samples", samples, 1)
    check_int("steps", steps, 1, model.config.num_timesteps)
    count = min(samples, len(heldout))
    items = [heldout[i] for i in range(count)]
    judged = isinstance(heldout, ShapesDataset)
    longest = max(len(item.caption.encode()) for item in items)
    text_to_image_rows, image_to_text_rows = [], []
    for i, item in enumerate(items):
        image = text_to_image(model, codec, item.caption, steps=steps, cfg_scale=cfg_scale, seed=i)
        text_to_image_rows.append((item.caption, image, detect_shapes(image) == item.shapes if judged else None))
        latent = codec.encode(item.image[None])[0].to(model.device)
        text = image_to_text(model, latent, max_new_tokens=longest + 8)
        image_to_text_rows.append((text, item.image, text == item.caption))
    write_samples_grid(path, text_to_image_rows, image_to_text_rows)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    """The command line. A checkpoint it cannot read, or held-out data that is wrong, ends in one
    line ``error: ...`` on stderr naming the file and the field or line, exit status 1; a bad
    option in argparse's usage message, exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m transfusion_core.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory written by transfusion_core.train")
    parser.add_argument("--samples", type=int, default=None, help="held-out items to use (default: all)")
    parser.add_argument("--image-steps", type=int, default=25,
                        help="steps per generated image (DDIM; Euler for a flow model)")
    parser.add_argument("--sampler", choices=("ddpm", "ddim", "euler", "heun"), default=None,
                        help="image sampler (default: ddim; euler for a flow model)")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON output (default: CHECKPOINT/eval.json)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    for name, low in (("samples", 1), ("image_steps", 1), ("seed", 0), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')}: expected an int >= {low}, got {value}")
    if not math.isfinite(args.cfg_scale):
        parser.error(f"--cfg-scale: expected a finite float, got {args.cfg_scale}")
    for name in ("checkpoint", "out"):
        if getattr(args, name) is not None and "\0" in getattr(args, name):
            parser.error(f"{name}: contains a NUL byte")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: this machine has no CUDA device")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _evaluate_checkpoint(args, parser)
    except (CheckpointError, DataError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _evaluate_checkpoint(args, parser) -> dict:
    state = read_train_state(args.checkpoint)
    file = Path(args.checkpoint) / TRAIN_STATE_FILE
    run = state.get("args")
    if not isinstance(run, dict):
        raise CheckpointError(f"{file}: args: expected an object of the run's options, got {run!r}")
    try:
        codec = codec_from_description(state.get("codec"), device=args.device)
    except (ImportError, OSError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{file}: codec: {type(error).__name__}: {error}") from None
    try:
        heldout = heldout_set(run["data"], run["heldout_data"], image_size=run["image_size"],
                              max_shapes=run["max_shapes"], heldout_samples=run["heldout_samples"], seed=run["seed"])
    except DataError:
        raise
    except KeyError as error:
        raise CheckpointError(f"{file}: args: missing option {error}") from None
    except (TypeError, ValueError) as error:  # the data set's own checks name the option
        raise CheckpointError(f"{file}: args: {error}") from None
    if heldout is None:
        parser.error("the run has no held-out data set (train it with --heldout-data)")
    model = Transfusion.load(args.checkpoint, device=args.device)
    if args.image_steps > model.config.num_timesteps:
        parser.error(f"--image-steps: expected at most the model's {model.config.num_timesteps} timesteps, "
                     f"got {args.image_steps}")
    print(f"evaluating {args.checkpoint} (step {state['step']}) on {min(args.samples or len(heldout), len(heldout))} "
          f"held-out items", flush=True)
    results = evaluate(model, codec, heldout, samples=args.samples, image_steps=args.image_steps,
                       cfg_scale=args.cfg_scale, seed=args.seed, sampler=args.sampler,
                       log=lambda line: print(line, flush=True))
    results["checkpoint"] = str(args.checkpoint)
    results["step"] = state["step"]
    print(format_table(results))
    out = Path(args.out) if args.out is not None else Path(args.checkpoint) / "eval.json"
    try:
        out.write_text(json.dumps(results, indent=2) + "\n")
    except OSError as error:
        parser.error(f"--out: cannot write {out} ({error.strerror or error})")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
