"""Train a Transfusion model: ``python -m transfusion_core.train [--preset tiny] [options]``.

One process on a CPU or a GPU, or several under ``torchrun --nproc_per_node=N`` (DDP; with
``--fsdp``, FSDP2's ``fully_shard`` on every transformer block and on the model); gloo on CPUs,
NCCL on GPUs; only rank 0 writes. AdamW, linear warmup then cosine decay, gradient clipping,
bf16 autocast on a GPU (float32 on a CPU).

Batches. A step trains on ``--batch-size`` documents (caption + image, the paper's order and
caption dropout), split into ``--micro-batches`` micro-batches whose gradients are averaged; with
N processes each runs ``micro-batches / N`` of them. Micro-batch ``m`` of step ``s`` (its
documents, their packing, caption order and dropout, timesteps and noise) is a pure function of
``(seed, s, m)``, so the run is the same for any number of processes and the step is the whole
random state: a resumed run continues bit-identically.

Output in ``--out``: ``checkpoint/`` (``model.safetensors`` + ``config.json``, loadable with
``Transfusion.load``; ``optimizer.safetensors``; ``train_state.json`` with the step and the
arguments; nothing pickled), written every ``--checkpoint-every`` steps and at the end;
``metrics.jsonl`` (one line per step); ``loss_curve.png`` and ``samples.png`` (images generated
from held-out captions, captions generated for held-out images). The checkpoint files are
``checkpoint.py``'s, the loss curve ``plots.py``'s, the samples ``evaluate.write_samples``'.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .checkpoint import TRAIN_STATE_FILE, read_train_state, read_training_tensors, write_training_checkpoint
from .codec import PixelCodec, VAECodec, encode_dataset
from .config import TransfusionConfig, is_int
from .data import ByteTokenizer, Packer
from .datasets import ShapesDataset, heldout_set, training_set
from .evaluate import write_samples
from .model import Transfusion
from .plots import write_loss_curve

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"

# Presets: every option below has a value in "tiny"; other presets override some of them.
PRESETS = {
    # The CPU default: the embedded data set (one shape per 16x16 image), a 0.9M-parameter model.
    # About 6 minutes of training on 2 CPU cores (the README gives the time and figures reached).
    "tiny": dict(
        data="shapes", heldout_data=None, image_size=16, max_shapes=1, train_samples=100_000, heldout_samples=48,
        dim=128, n_layers=4, n_heads=4, image_encoder="linear", patch_size=4, diffusion_target="v",
        steps=1800, batch_size=32, micro_batches=1, seq_len=57,
        lr=1e-3, min_lr_ratio=0.1, warmup=100, weight_decay=0.01, grad_clip=1.0,
        caption_first_prob=0.5, drop_caption_prob=0.1,
        checkpoint_every=500, log_every=25, samples=8, sample_steps=25, cfg_scale=3.0,
    ),
    # For a GPU (not measured here): 32x32 images of one or two shapes, U-Net patches, 2x2.
    "small": dict(
        image_size=32, max_shapes=2, train_samples=1_000_000, heldout_samples=96,
        dim=384, n_layers=8, n_heads=6, image_encoder="unet", patch_size=2,
        steps=20_000, batch_size=256, micro_batches=8, seq_len=1024, lr=5e-4, warmup=1000,
        checkpoint_every=2000, log_every=100,
    ),
}
# What a resumed run must share with its checkpoint: everything that changes the arithmetic.
RUN_IDENTITY = (
    "data", "heldout_data", "image_size", "max_shapes", "train_samples", "dim", "n_layers", "n_heads",
    "image_encoder", "patch_size", "diffusion_target", "steps", "batch_size", "micro_batches", "seq_len", "lr",
    "min_lr_ratio",
    "warmup", "weight_decay", "grad_clip", "caption_first_prob", "drop_caption_prob", "seed", "vae",
)


@dataclass
class TrainArgs:
    out: str
    preset: str
    data: str
    heldout_data: str | None
    image_size: int
    max_shapes: int
    train_samples: int
    heldout_samples: int
    vae: str | None
    latent_cache: str | None
    dim: int
    n_layers: int
    n_heads: int
    image_encoder: str
    patch_size: int
    diffusion_target: str
    steps: int
    batch_size: int
    micro_batches: int
    seq_len: int
    lr: float
    min_lr_ratio: float
    warmup: int
    weight_decay: float
    grad_clip: float
    caption_first_prob: float
    drop_caption_prob: float
    seed: int
    checkpoint_every: int
    log_every: int
    samples: int
    sample_steps: int
    cfg_scale: float
    resume: bool
    stop_at: int | None
    fsdp: bool
    device: str | None
    threads: int | None
    plots: bool


def parse_args(argv=None) -> TrainArgs:
    parser = argparse.ArgumentParser(prog="python -m transfusion_core.train", description=__doc__.split("\n\n")[0],
                                     epilog="An option left out takes the preset's value (PRESETS in this module).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="defaults for every option below")
    parser.add_argument("--out", default=None, help="output directory (default: runs/PRESET)")
    group = parser.add_argument_group("data")
    group.add_argument("--data", help='"shapes" (embedded) or a JSONL file of {"image": path, "caption": text}')
    group.add_argument("--heldout-data", help="held-out JSONL file, for a JSONL data set")
    group.add_argument("--image-size", type=int, help="image side in pixels")
    group.add_argument("--max-shapes", type=int, help="embedded data set: shapes per image, 1..max")
    group.add_argument("--train-samples", type=int, help="embedded data set: training scenes")
    group.add_argument("--heldout-samples", type=int, help="embedded data set: held-out scenes")
    group.add_argument("--vae", help="a local diffusers AutoencoderKL directory (default: pixel space)")
    group.add_argument("--latent-cache", help="where VAE latents are cached (default: OUT/latents)")
    group = parser.add_argument_group("model")
    group.add_argument("--dim", type=int)
    group.add_argument("--n-layers", type=int)
    group.add_argument("--n-heads", type=int)
    group.add_argument("--image-encoder", choices=("linear", "unet"))
    group.add_argument("--patch-size", type=int)
    group.add_argument("--diffusion-target", choices=("eps", "v", "x0"), help="what the image output predicts")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--steps", type=int, help="optimizer steps")
    group.add_argument("--batch-size", type=int, help="documents per step, over all processes")
    group.add_argument("--micro-batches", type=int, help="micro-batches per step, over all processes")
    group.add_argument("--seq-len", type=int, help="positions per packed row")
    group.add_argument("--lr", type=float, help="peak learning rate")
    group.add_argument("--min-lr-ratio", type=float, help="final learning rate / peak")
    group.add_argument("--warmup", type=int, help="linear warmup steps")
    group.add_argument("--weight-decay", type=float)
    group.add_argument("--grad-clip", type=float, help="max gradient norm")
    group.add_argument("--caption-first-prob", type=float, help="caption before its image (the paper: 0.8)")
    group.add_argument("--drop-caption-prob", type=float, help="caption dropout, for guidance (the paper: 0.1)")
    group.add_argument("--seed", type=int, default=0)
    group = parser.add_argument_group("run")
    group.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (and one at the end)")
    group.add_argument("--log-every", type=int, help="steps between progress lines")
    group.add_argument("--samples", type=int, help="held-out samples in samples.png (0: none)")
    group.add_argument("--sample-steps", type=int, help="DDIM steps per sample image")
    group.add_argument("--cfg-scale", type=float, help="guidance scale of the sample images")
    group.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if there is one")
    group.add_argument("--stop-at", type=int, help="stop after this step, as an interruption would (resume later)")
    group.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    group.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    group.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    group.add_argument("--no-plots", dest="plots", action="store_false", help="skip loss_curve.png and samples.png")
    namespace = vars(parser.parse_args(argv))
    values = PRESETS["tiny"] | PRESETS[namespace["preset"]]
    values |= {name: value for name, value in namespace.items() if value is not None}
    values["out"] = values.get("out") or f"runs/{values['preset']}"
    args = TrainArgs(**{field.name: values.get(field.name) for field in dataclasses.fields(TrainArgs)})
    check_args(args)
    return args


def check_args(args: TrainArgs) -> None:
    """Raise ``ValueError`` naming the first bad option."""
    def fail(name, expected):
        raise ValueError(f"--{name.replace('_', '-')}: expected {expected}, got {getattr(args, name)!r}")

    for name in ("image_size", "train_samples", "heldout_samples", "dim", "n_layers", "n_heads", "patch_size",
                 "steps", "batch_size", "micro_batches", "seq_len", "checkpoint_every", "log_every", "sample_steps"):
        if not is_int(getattr(args, name), 1):
            fail(name, "an int >= 1")
    for name in ("warmup", "samples"):
        if not is_int(getattr(args, name), 0):
            fail(name, "an int >= 0")
    if args.batch_size % args.micro_batches:
        fail("micro_batches", f"a divisor of --batch-size={args.batch_size}")
    if not args.lr > 0:
        fail("lr", "a number > 0")
    for name in ("min_lr_ratio", "caption_first_prob", "drop_caption_prob"):
        if not 0 <= getattr(args, name) <= 1:
            fail(name, "a number in [0, 1]")
    if not args.weight_decay >= 0:
        fail("weight_decay", "a number >= 0")
    if not args.grad_clip > 0:
        fail("grad_clip", "a number > 0")
    if args.stop_at is not None and not is_int(args.stop_at, 1, args.steps):
        fail("stop_at", f"an int in [1, --steps={args.steps}]")
    if args.threads is not None and not is_int(args.threads, 1):
        fail("threads", "an int >= 1")


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------
@dataclass
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_processes(device_name: str | None) -> Processes:
    """One process, or the process group torchrun describes (gloo on CPUs, NCCL on GPUs)."""
    device_name = device_name or ("cuda" if torch.cuda.is_available() else "cpu")
    if "WORLD_SIZE" not in os.environ:
        return Processes(0, 1, torch.device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_name == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_name)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def print0(processes: Processes, *lines) -> None:
    if processes.main:
        print(*lines, flush=True)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def derived_seed(*parts) -> int:
    """A 63-bit seed from any parts, the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class DocumentStream:
    """Training documents ``[caption tokens, latent]`` in a seeded order, epoch after epoch."""

    def __init__(self, dataset, latents: torch.Tensor | None, seed: int):
        self.dataset, self.latents, self.seed = dataset, latents, seed
        self.tokenizer = ByteTokenizer()
        self._epoch, self._order = None, None

    def document(self, position: int) -> list:
        """The ``position``-th training document: a caption then its image latent."""
        epoch, offset = divmod(position, len(self.dataset))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, "epoch", epoch))
            self._epoch, self._order = epoch, torch.randperm(len(self.dataset), generator=generator)
        index = int(self._order[offset])
        item = self.dataset[index]
        latent = item.image if self.latents is None else self.latents[index]
        return [self.tokenizer.encode(item.caption), latent]


def micro_batch(stream: DocumentStream, packer: Packer, args: TrainArgs, step: int, micro: int):
    """Micro-batch ``micro`` of step ``step`` (0-based), packed: a function of (seed, step, micro)."""
    size = args.batch_size // args.micro_batches
    first = (step * args.micro_batches + micro) * size
    documents = [stream.document(position) for position in range(first, first + size)]
    packer.generator.manual_seed(derived_seed(args.seed, "pack", step, micro))
    return packer(documents)


# ----------------------------------------------------------------------------------------------
# Model, optimizer, schedule, checkpoints
# ----------------------------------------------------------------------------------------------
def model_config(args: TrainArgs, codec) -> TransfusionConfig:
    if args.image_size % codec.downsample:
        raise ValueError(f"--image-size: expected a multiple of the codec's downsampling {codec.downsample}, "
                         f"got {args.image_size}")
    # Patch position embeddings: without them the tiny preset learns colours but places shapes
    # (and reads their positions) at chance within its CPU budget.
    fields = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, image_encoder=args.image_encoder,
                  patch_size=args.patch_size, image_channels=codec.latent_channels,
                  image_size=args.image_size // codec.downsample, diffusion_target=args.diffusion_target,
                  patch_position_embedding=True)
    if args.image_encoder == "unet":  # one level per halving: 32, 64, ... channels
        fields["unet_channels"] = tuple(32 * 2**k for k in range(args.patch_size.bit_length()))
    try:
        return TransfusionConfig(**fields)
    except ValueError as error:  # it names a config field: say that the model options set it
        raise ValueError(f"model options: {error}") from None


def learning_rate(args: TrainArgs, step: int) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def wrap_model(model: Transfusion, args: TrainArgs, processes: Processes):
    """DDP, FSDP2 (each block, then the whole model) or the model itself for one process."""
    if processes.world_size == 1:
        return model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        return fully_shard(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[processes.device.index] if processes.device.type == "cuda" else None
    )


def gradient_sync(model, sync: bool):
    """Synchronise gradients only on a step's last micro-batch (DDP and FSDP2 alike)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(path: Path, model, optimizer, config, args: TrainArgs, step: int, codec, processes):
    """Write weights, optimizer state (safetensors) and ``train_state.json``; rank 0 writes.

    The directory is written beside the old one and swapped in, so an interruption leaves the
    previous checkpoint whole.
    """
    weights = get_model_state_dict(model, options=FULL_STATE)  # gathered on rank 0 under FSDP
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)
    if processes.main:
        train_state = {"step": step, "args": dataclasses.asdict(args), "codec": codec.describe(),
                       "param_groups": optimizer_state["param_groups"], "world_size": processes.world_size}
        write_training_checkpoint(path, unwrapped(weights, config), optimizer_state, train_state)
    if processes.world_size > 1:
        dist.barrier()


def load_checkpoint(path: Path, model, optimizer, args: TrainArgs, config: TransfusionConfig) -> int:
    """Restore weights and optimizer state (every process reads the files); return the step."""
    state = read_train_state(path)
    saved = state["args"]
    differences = [f"--{name.replace('_', '-')}: checkpoint {saved[name]!r}, now {getattr(args, name)!r}"
                   for name in RUN_IDENTITY if saved.get(name) != getattr(args, name)]
    if differences:
        raise ValueError(f"--resume: {path} was trained with other options ({'; '.join(differences)})")
    weights, optimizer_state = read_training_tensors(path, Transfusion, config, state["param_groups"])
    set_model_state_dict(model, weights, options=FULL_STATE)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=FULL_STATE)
    return state["step"]


def unwrapped(weights: dict, config: TransfusionConfig) -> Transfusion:
    """A plain model holding full weights (a DDP or FSDP2 model cannot ``save`` or ``generate``)."""
    model = Transfusion(config)
    model.load_state_dict(weights)
    return model


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------
def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


def progress_line(record: dict, args: TrainArgs, elapsed: float, steps_done: int, tokens_per_s: float) -> str:
    """One line of progress; ``tokens_per_s`` counts text tokens and image patches, not padding."""
    step = record["step"]
    filled = round(20 * step / args.steps)
    eta = elapsed / max(1, steps_done) * (args.steps - step)
    return (f"step {step:>{len(str(args.steps))}}/{args.steps} [{'#' * filled}{'.' * (20 - filled)}] "
            f"loss {record['loss']:.4f} (lm {record['lm_loss']:.4f} + diffusion {record['diffusion_loss']:.4f} x "
            f"lambda) | lr {record['lr']:.2e} | {tokens_per_s:,.0f} tok/s | "
            f"{clock(elapsed)} elapsed, ETA {clock(eta)}")


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(args: TrainArgs) -> list[dict]:
    """Run (or resume) the training ``args`` describe; return the metrics of this process's steps."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    processes = start_processes(args.device)
    try:
        return _train(args, processes)
    finally:
        if processes.world_size > 1:
            dist.destroy_process_group()


def _train(args: TrainArgs, processes: Processes) -> list[dict]:
    local_micro_batches, leftover = divmod(args.micro_batches, processes.world_size)
    if leftover or not local_micro_batches:
        raise ValueError(f"--micro-batches: expected a multiple of the {processes.world_size} processes, "
                         f"got {args.micro_batches}")
    out = Path(args.out)
    checkpoint_path = out / CHECKPOINT_DIR
    if processes.main:
        out.mkdir(parents=True, exist_ok=True)

    heldout = heldout_set(args.data, args.heldout_data, image_size=args.image_size, max_shapes=args.max_shapes,
                          heldout_samples=args.heldout_samples, seed=args.seed)
    train_set = training_set(args.data, image_size=args.image_size, max_shapes=args.max_shapes,
                             train_samples=args.train_samples, seed=args.seed)
    if not isinstance(train_set, ShapesDataset):
        print0(processes, f"data: {args.data}: {len(train_set)} images, {len(train_set.skipped)} unreadable skipped")
    codec, latents = PixelCodec(), None
    if args.vae is not None:
        codec = VAECodec(args.vae, device=processes.device)
        cache = Path(args.latent_cache) if args.latent_cache else out / "latents"
        if processes.main:  # rank 0 encodes once; the others read its cache
            encode_dataset(codec, train_set, cache, log=lambda line: print0(processes, line))
        if processes.world_size > 1:
            dist.barrier()
        latents = encode_dataset(codec, train_set, cache, log=lambda line: None)

    config = model_config(args, codec)
    torch.manual_seed(args.seed)  # the initial weights
    model = Transfusion(config).to(processes.device)
    parameters = sum(p.numel() for p in model.parameters())
    wrapped = wrap_model(model, args, processes)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay)
    start = 0
    resume_from = checkpoint_path
    if not checkpoint_path.exists():  # a run stopped while swapping checkpoints kept the old one here
        resume_from = checkpoint_path.with_name(checkpoint_path.name + ".previous")
    if args.resume and (resume_from / TRAIN_STATE_FILE).is_file():
        start = load_checkpoint(resume_from, wrapped, optimizer, args, config)
        print0(processes, f"resumed from {resume_from} at step {start}")
    elif args.resume:
        print0(processes, f"no checkpoint in {checkpoint_path}: starting from step 0")

    metrics_path = out / METRICS_FILE
    if processes.main:  # keep the history up to the checkpoint, drop steps it did not keep
        kept = [line for line in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
                if start and json.loads(line)["step"] <= start]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    mode = "FSDP2" if args.fsdp and processes.world_size > 1 else "DDP" if processes.world_size > 1 else "1 process"
    print0(processes, f"training {parameters / 1e6:.2f}M parameters on {processes.device} ({mode}, "
                      f"{processes.world_size} x {local_micro_batches} micro-batches of "
                      f"{args.batch_size // args.micro_batches} documents); {len(train_set)} training items; "
                      f"steps {start + 1}..{args.stop_at or args.steps} of {args.steps}")

    stream = DocumentStream(train_set, latents, args.seed)
    packer = Packer(config, args.seq_len, caption_first_prob=args.caption_first_prob,
                    drop_caption_prob=args.drop_caption_prob)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=processes.device.type == "cuda")
    last_step = args.stop_at or args.steps
    history, started = [], time.perf_counter()
    window_positions = window_seconds = 0.0  # throughput since the last progress line
    for step in range(start, last_step):
        step_started = time.perf_counter()
        lr = learning_rate(args, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(4, dtype=torch.float64)  # loss, lm_loss, diffusion_loss, positions
        for k in range(local_micro_batches):
            batch = micro_batch(stream, packer, args, step, processes.rank * local_micro_batches + k)
            batch = batch.to(processes.device)
            with gradient_sync(wrapped, sync=k == local_micro_batches - 1), autocast:
                losses = wrapped(batch)
                (losses.loss / local_micro_batches).backward()
            sums[:3] += torch.stack([x.detach().double().cpu() for x in losses]) / local_micro_batches
            sums[3] += int((batch.doc_ids >= 0).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if processes.world_size > 1:
            dist.all_reduce(sums)
            sums[:3] /= processes.world_size
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        seconds = time.perf_counter() - step_started
        record = {"step": step + 1, "loss": float(sums[0]), "lm_loss": float(sums[1]),
                  "diffusion_loss": float(sums[2]), "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_s": float(sums[3]) / seconds, "seconds": seconds}
        history.append(record)
        window_positions, window_seconds = window_positions + float(sums[3]), window_seconds + seconds
        if processes.main:
            with metrics_path.open("a") as metrics:
                metrics.write(json.dumps(record) + "\n")
            done = step + 1 - start
            if (step + 1) % args.log_every == 0 or step + 1 in (start + 1, last_step):
                print(progress_line(record, args, time.perf_counter() - started, done,
                                    window_positions / window_seconds), flush=True)
                window_positions = window_seconds = 0.0
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == last_step:
            save_checkpoint(checkpoint_path, wrapped, optimizer, config, args, step + 1, codec, processes)
    print0(processes, f"trained steps {start + 1}..{last_step} in {clock(time.perf_counter() - started)}; "
                      f"checkpoint: {checkpoint_path}")

    if last_step == args.steps and args.plots:
        weights = get_model_state_dict(wrapped, options=FULL_STATE)  # every process takes part
        if processes.main:
            final = unwrapped(weights, config).to(processes.device).eval()
            write_loss_curve(metrics_path, out / "loss_curve.png")
            print(f"wrote {out / 'loss_curve.png'}", flush=True)
            if heldout is not None and args.samples:
                write_samples(out / "samples.png", final, codec, heldout, samples=args.samples,
                              steps=args.sample_steps, cfg_scale=args.cfg_scale)
                print(f"wrote {out / 'samples.png'}", flush=True)
    return history


def main(argv=None) -> list[dict]:
    try:
        args = parse_args(argv)
    except ValueError as error:
        sys.exit(f"error: {error}")
    return train(args)


if __name__ == "__main__":
    main()
