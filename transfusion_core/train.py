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
from dataclasses import dataclass, field, fields
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

from tfkernels._checks import check_choice, check_float, check_int
from tfkernels.schedule import TIME_DISTRIBUTIONS

from .checkpoint import (
    TRAINING_FILES,
    CheckpointError,
    atomic_write,
    check_resume,
    discard_training_checkpoint,
    is_complete,
    option_flag,
    read_train_state,
    read_training_tensors,
    recover_training_checkpoint,
    write_training_checkpoint,
)
from .codec import PixelCodec, VAECodec, encode_dataset
from .config import FLOW_DEFAULTS, IMAGE_ENCODERS, TransfusionConfig, is_int
from .data import ByteTokenizer, Packer
from .datasets import MAX_IMAGE_SIZE, DataError, ShapesDataset, heldout_set, training_set
from .evaluate import write_samples
from .model import Transfusion
from .plots import write_loss_curve

CHECKPOINT_DIR = "checkpoint"
# The diffusion modes and targets the script trains (TransfusionConfig takes more: rectified_flow's
# integer grid, diffusers' target names).
TRAIN_SCHEDULES = ("cosine", "linear", "flow")
TRAIN_TARGETS = ("eps", "v", "x0", "flow")
METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------------------------
# Options: each declared once, as a field of TrainArgs; the parser, the presets, the checks of one
# option and the resume identity are read from the fields' metadata.
# ----------------------------------------------------------------------------------------------
# "tiny" (the default) is sized for a CPU: the embedded data set (one shape per 16x16 image), a 0.9M-parameter
# model (the README gives its training time on 2 CPU cores and the figures it reaches).
# "small" is sized for a GPU (its figures are not measured): 32x32 images of one or two shapes, U-Net patches, 2x2.
# A preset starts from tiny's values and overrides some.
PRESET_NAMES = ("tiny", "small")
_NO_VALUE = object()  # an option without a value in a preset


def option(group: str | None, help: str, *, tiny=_NO_VALUE, small=_NO_VALUE, identity: bool = False,
           choices: tuple | None = None, low=None, high=None, above=None, default=None):
    """A field of ``TrainArgs``: the option ``--name`` (``--no-name`` for a bool that defaults to True).

    ``group``: its section of ``--help``. ``tiny``, ``small``: its value in each preset. ``default``:
    its value where neither a preset nor the command line gives one. ``identity``: part of what a
    resumed run must share with its checkpoint (everything that changes the arithmetic).
    ``choices``, ``low`` / ``high`` (inclusive) and ``above`` (exclusive, for a float): the values
    ``check_args`` accepts, by the field's type.
    """
    presets = {name: value for name, value in zip(PRESET_NAMES, (tiny, small)) if value is not _NO_VALUE}
    return field(metadata={"group": group, "help": help, "presets": presets, "identity": identity,
                           "choices": choices, "low": low, "high": high, "above": above, "default": default})


@dataclass
class TrainArgs:
    """The options of a training run (``--help``; the README's table)."""

    preset: str = option(None, "defaults for every option below", choices=PRESET_NAMES, default="tiny")
    out: str = option(None, "output directory (default: runs/PRESET)")
    data: str = option("data", '"shapes" (embedded) or a JSONL file of {"image": path, "caption": text}',
                       tiny="shapes", identity=True)
    heldout_data: str | None = option("data", "held-out JSONL file, for a JSONL data set", tiny=None, identity=True)
    image_size: int = option("data", "image side in pixels", tiny=16, small=32, identity=True, low=1)
    max_shapes: int = option("data", "embedded data set: shapes per image, 1..max", tiny=1, small=2, identity=True,
                             low=1, high=2)
    train_samples: int = option("data", "embedded data set: training scenes", tiny=100_000, small=1_000_000,
                                identity=True, low=1)
    heldout_samples: int = option("data", "embedded data set: held-out scenes", tiny=48, small=96, low=1)
    vae: str | None = option("data", "a local diffusers AutoencoderKL directory (default: pixel space)",
                             identity=True)
    latent_cache: str | None = option("data", "where VAE latents are cached (default: OUT/latents)")
    dim: int = option("model", "model width", tiny=128, small=384, identity=True, low=1)
    n_layers: int = option("model", "transformer blocks", tiny=4, small=8, identity=True, low=1)
    n_heads: int = option("model", "attention heads", tiny=4, small=6, identity=True, low=1)
    image_encoder: str = option("model", "patch embedding: a linear layer or U-Net down blocks", tiny="linear",
                                small="unet", identity=True, choices=IMAGE_ENCODERS)
    patch_size: int = option("model", "patch side in latent pixels", tiny=4, small=2, identity=True, low=1)
    diffusion_target: str = option("model", "what the image output predicts (default with --noise-schedule flow: "
                                   "flow)", tiny="v", identity=True, choices=TRAIN_TARGETS)
    noise_schedule: str = option("model", "DDPM betas (integer steps) or flow: continuous-time rectified flow",
                                 tiny="cosine", identity=True, choices=TRAIN_SCHEDULES)
    flow_time_distribution: str = option("model", "flow: how training draws t in [0, 1], before the shift",
                                         tiny=FLOW_DEFAULTS["flow_time_distribution"], identity=True,
                                         choices=TIME_DISTRIBUTIONS)
    flow_time_mean: float = option("model", "flow, logit_normal: mean of the normal",
                                   tiny=FLOW_DEFAULTS["flow_time_mean"], identity=True)
    flow_time_std: float = option("model", "flow, logit_normal: std of the normal",
                                  tiny=FLOW_DEFAULTS["flow_time_std"], identity=True, above=0)
    flow_shift: float = option("model", "flow: time shift s t / (1 + (s - 1) t) of training and sampling (SD3)",
                               tiny=FLOW_DEFAULTS["flow_shift"], identity=True, above=0)
    steps: int = option("optimisation", "optimizer steps", tiny=1800, small=20_000, identity=True, low=1)
    batch_size: int = option("optimisation", "documents per step, over all processes", tiny=32, small=256,
                             identity=True, low=1)
    micro_batches: int = option("optimisation", "micro-batches per step, over all processes", tiny=1, small=8,
                                identity=True, low=1)
    seq_len: int = option("optimisation", "positions per packed row", tiny=57, small=1024, identity=True, low=1)
    lr: float = option("optimisation", "peak learning rate", tiny=1e-3, small=5e-4, identity=True, above=0)
    min_lr_ratio: float = option("optimisation", "final learning rate / peak", tiny=0.1, identity=True, low=0, high=1)
    warmup: int = option("optimisation", "linear warmup steps", tiny=100, small=1000, identity=True, low=0)
    weight_decay: float = option("optimisation", "AdamW weight decay", tiny=0.01, identity=True, low=0)
    grad_clip: float = option("optimisation", "max gradient norm", tiny=1.0, identity=True, above=0)
    caption_first_prob: float = option("optimisation", "caption before its image (the paper: 0.8)", tiny=0.5,
                                       identity=True, low=0, high=1)
    drop_caption_prob: float = option("optimisation", "caption dropout, for guidance (the paper: 0.1)", tiny=0.1,
                                      identity=True, low=0, high=1)
    image_first_t_max: int = option("optimisation", "largest t of an image that text follows in its document (the "
                                    "paper: 500; num_timesteps - 1: no cap)", tiny=500, identity=True, low=0)
    clean_image_copies: bool = option("optimisation", "pack each image twice: a noisy copy (diffusion loss, hidden "
                                      "from every later token) then its clean copy (t = 0), which later tokens read",
                                      identity=True, default=False)
    seed: int = option("optimisation", "seed of every random choice", tiny=0, identity=True, low=0)
    checkpoint_every: int = option("run", "steps between checkpoints (and one at the end)", tiny=500, small=2000,
                                   low=1)
    log_every: int = option("run", "steps between progress lines", tiny=25, small=100, low=1)
    samples: int = option("run", "held-out samples in samples.png (0: none)", tiny=8, low=0)
    sample_steps: int = option("run", "steps per sample image (DDIM; Euler for a flow model)", tiny=25, low=1)
    cfg_scale: float = option("run", "guidance scale of the sample images", tiny=3.0)
    resume: bool = option("run", "continue from OUT/checkpoint if there is one", default=False)
    stop_at: int | None = option("run", "stop after this step, as an interruption would (resume later)")
    fsdp: bool = option("run", "under torchrun: FSDP2 instead of DDP", default=False)
    device: str | None = option("run", "cpu or cuda (default: cuda when available)")
    threads: int | None = option("run", "torch CPU threads (default: torch's)", low=1)
    plots: bool = option("run", "skip loss_curve.png and samples.png", default=True)


OPTIONS = fields(TrainArgs)
PRESETS = {preset: {f.name: f.metadata["presets"][preset] for f in OPTIONS if preset in f.metadata["presets"]}
           for preset in PRESET_NAMES}
# What a resumed run must share with its checkpoint (checkpoint.check_resume).
RUN_IDENTITY = tuple(f.name for f in OPTIONS if f.metadata["identity"])


def argument_parser() -> argparse.ArgumentParser:
    """The command line of ``TrainArgs``: only the options given land in the namespace."""
    parser = argparse.ArgumentParser(prog="python -m transfusion_core.train", description=__doc__.split("\n\n")[0],
                                     epilog="An option left out takes the preset's value (PRESETS in this module).",
                                     argument_default=argparse.SUPPRESS)
    groups = {None: parser}
    for f in OPTIONS:
        meta = f.metadata
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        group = groups[meta["group"]]
        if f.type == "bool":  # a flag that flips the default
            flag = option_flag(f.name if not meta["default"] else f"no_{f.name}")
            group.add_argument(flag, dest=f.name, action="store_false" if meta["default"] else "store_true",
                               help=meta["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type.split(" |")[0]]
            group.add_argument(option_flag(f.name), type=kind, choices=meta["choices"], help=meta["help"])
    return parser


def parse_args(argv=None) -> TrainArgs:
    given = vars(argument_parser().parse_args(argv))
    if given.get("noise_schedule") == "flow":
        given.setdefault("diffusion_target", "flow")  # a flow model predicts the velocity unless told otherwise
    values = {f.name: f.metadata["default"] for f in OPTIONS} | PRESETS["tiny"]
    values |= PRESETS[given.get("preset", values["preset"])] | given
    if values["out"] is None:
        values["out"] = f"runs/{values['preset']}"
    args = TrainArgs(**values)
    try:
        check_args(args)
    except (TypeError, ValueError) as error:  # from the command line every type is right: a bad value
        raise OptionError(str(error)) from None
    return args


class OptionError(ValueError):
    """An option that cannot work, found after parsing (with the model, the data or the processes)."""


def _check_option(f, value) -> None:
    """One option by its field: its type, then ``choices``, ``low`` / ``high`` or ``above``."""
    meta, flag = f.metadata, option_flag(f.name)
    kind, _, optional = f.type.partition(" | ")
    if optional and value is None:
        return
    if meta["choices"] is not None:
        check_choice(flag, value, meta["choices"])
    elif kind == "str":
        if not isinstance(value, str):
            raise TypeError(f"{flag}: expected {'None or ' if optional else ''}a str, got {value!r}")
        if not value or "\0" in value:
            raise OptionError(f"{flag}: expected a non-empty string without NUL bytes, got {value!r}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"{flag}: expected a bool, got {value!r}")
    elif kind == "int":
        check_int(flag, value, meta["low"], meta["high"])
    elif meta["above"] is not None:
        expected = f"a finite float > {meta['above']}"
        if check_float(flag, value, what=expected) <= meta["above"]:
            raise OptionError(f"{flag}: expected {expected}, got {value!r}")
    else:
        check_float(flag, value, meta["low"], meta["high"])


def check_args(args: TrainArgs) -> None:
    """Raise naming the first bad option (``--name: expected ..., got ...``): ``TypeError`` for a
    value of the wrong type (possible only for a ``TrainArgs`` built by hand), ``ValueError``
    (``OptionError``) for a wrong value. What needs the codec, the data or the processes is
    checked by ``train`` before its first step."""
    if not isinstance(args, TrainArgs):
        raise TypeError(f"args: expected a TrainArgs, got {type(args).__name__}")
    for f in OPTIONS:
        _check_option(f, getattr(args, f.name))

    def fail(name, expected):
        raise OptionError(f"{option_flag(name)}: expected {expected}, got {getattr(args, name)!r}")

    if args.batch_size % args.micro_batches:
        fail("micro_batches", f"a divisor of --batch-size={args.batch_size}")
    if args.stop_at is not None:
        check_int("--stop-at", args.stop_at, 1, args.steps)
    if args.data == "shapes":
        if args.heldout_data is not None:
            fail("heldout_data", "none with --data shapes (the embedded data set has its own held-out split)")
        if args.image_size % 16 or args.image_size > MAX_IMAGE_SIZE:
            fail("image_size", f"a multiple of 16 up to {MAX_IMAGE_SIZE} with --data shapes")
    if args.vae is not None and not (Path(args.vae) / "config.json").is_file():
        fail("vae", "a diffusers AutoencoderKL directory (with a config.json)")
    if args.device is not None:
        check_choice("--device", args.device, ("cpu", "cuda"))
        if args.device == "cuda" and not torch.cuda.is_available():
            fail("device", "cpu: this machine has no CUDA device")


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


def load_data(args: TrainArgs, config: TransfusionConfig):
    """The training and held-out sets, every training document checked to fit a row of ``--seq-len``.

    A row must hold BOS, the caption, BOI, the image's patches, EOI and EOS: on the embedded data
    set its longest caption must fit (else ``OptionError`` naming ``--seq-len``); in a JSONL file
    every caption must (else ``DataError`` naming the file and line), checked here at load time
    rather than at the step that draws the document.
    """
    patches = (config.image_size // config.patch_size) ** 2
    room = args.seq_len - patches - 4  # caption bytes a row has room for
    if room < 0:
        raise OptionError(f"--seq-len: expected at least {patches + 4} (an image's {patches} patches and "
                          f"BOS/BOI/EOI/EOS), got {args.seq_len}")
    heldout = heldout_set(args.data, args.heldout_data, image_size=args.image_size, max_shapes=args.max_shapes,
                          heldout_samples=args.heldout_samples, seed=args.seed)
    train_set = training_set(args.data, image_size=args.image_size, max_shapes=args.max_shapes,
                             train_samples=args.train_samples, seed=args.seed, max_caption_bytes=room)
    if isinstance(train_set, ShapesDataset) and train_set.longest_caption_bytes > room:
        raise OptionError(
            f"--seq-len: expected at least {args.seq_len - room + train_set.longest_caption_bytes} (the longest "
            f"caption of the embedded data set with --max-shapes {args.max_shapes}, "
            f"{train_set.longest_caption_bytes} bytes, its image's {patches} patches and BOS/BOI/EOI/EOS), "
            f"got {args.seq_len}"
        )
    return train_set, heldout


def data_identity(args: TrainArgs, train_set, heldout) -> dict:
    """What a resumed run must find unchanged beyond the options: the size and SHA-256 of the JSONL
    files and every image they name, and of the VAE's files (``None`` for the embedded data set
    and pixels, which the options determine)."""
    def fingerprint(dataset):
        return getattr(dataset, "fingerprint", None) if dataset is not None else None

    vae = None
    if args.vae is not None:
        digest, total = hashlib.sha256(), 0
        for file in sorted(f for f in Path(args.vae).iterdir() if f.is_file()):
            data = file.read_bytes()
            digest.update(file.name.encode() + b"\0" + hashlib.sha256(data).digest())
            total += len(data)
        vae = {"bytes": total, "sha256": digest.hexdigest()}
    return {"data": fingerprint(train_set), "heldout_data": fingerprint(heldout), "vae": vae}


# ----------------------------------------------------------------------------------------------
# Model, optimizer, schedule, checkpoints
# ----------------------------------------------------------------------------------------------
def model_config(args: TrainArgs, codec) -> TransfusionConfig:
    if args.image_size % codec.downsample:
        raise OptionError(f"--image-size: expected a multiple of the codec's downsampling {codec.downsample}, "
                          f"got {args.image_size}")
    # Patch position embeddings: without them the tiny preset learns colours but places shapes
    # (and reads their positions) at chance within its CPU budget.
    fields = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, image_encoder=args.image_encoder,
                  patch_size=args.patch_size, image_channels=codec.latent_channels,
                  image_size=args.image_size // codec.downsample, diffusion_target=args.diffusion_target,
                  noise_schedule=args.noise_schedule, **{name: getattr(args, name) for name in FLOW_DEFAULTS},
                  patch_position_embedding=True)
    if args.image_encoder == "unet":  # one level per halving: 32, 64, ... channels
        fields["unet_channels"] = tuple(32 * 2**k for k in range(args.patch_size.bit_length()))
    try:
        config = TransfusionConfig(**fields)
    except (TypeError, ValueError) as error:  # it names a config field: say that the model options set it
        raise OptionError(f"model options: {error}") from None
    if args.sample_steps > config.num_timesteps:
        raise OptionError(f"--sample-steps: expected at most the model's {config.num_timesteps} timesteps, "
                          f"got {args.sample_steps}")
    if args.image_first_t_max >= config.num_timesteps:
        raise OptionError(f"--image-first-t-max: expected at most the model's last timestep, "
                          f"{config.num_timesteps - 1}, got {args.image_first_t_max}")
    return config


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


def save_checkpoint(path: Path, model, optimizer, config, args: TrainArgs, step: int, codec, data: dict, processes):
    """Write weights, optimizer state (safetensors) and ``train_state.json``; rank 0 writes.

    ``checkpoint.write_training_checkpoint`` swaps the directory in crash-safely: a kill at any
    point leaves the newest complete checkpoint for ``--resume``.
    """
    weights = get_model_state_dict(model, options=FULL_STATE)  # gathered on rank 0 under FSDP
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)
    if processes.main:
        train_state = {"step": step, "args": dataclasses.asdict(args), "codec": codec.describe(), "data": data,
                       "param_groups": optimizer_state["param_groups"], "world_size": processes.world_size}
        write_training_checkpoint(path, unwrapped(weights, config), optimizer_state, train_state)
    if processes.world_size > 1:
        dist.barrier()


def load_checkpoint(path: Path, model, optimizer, args: TrainArgs, config: TransfusionConfig, codec,
                    data: dict) -> int:
    """Restore weights and optimizer state (every process reads the files); return the step.

    Everything is checked before anything is loaded (``checkpoint.check_resume``: the run's options,
    codec, data, optimizer and model config; then both safetensors headers against the model); a
    damaged or mismatched checkpoint raises ``CheckpointError`` naming the file and what is wrong.
    """
    state = read_train_state(path)
    param_groups = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)["param_groups"]
    check_resume(path, state, options=dataclasses.asdict(args), identity=RUN_IDENTITY, codec=codec.describe(),
                 data=data, param_groups=param_groups, steps=args.steps, config=config)
    if args.stop_at is not None and args.stop_at <= state["step"]:
        raise OptionError(f"--stop-at: expected a step after the checkpoint's step {state['step']}, got {args.stop_at}")
    weights, optimizer_state = read_training_tensors(path, Transfusion, config, param_groups)
    set_model_state_dict(model, weights, options=FULL_STATE)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=FULL_STATE)
    return state["step"]


def unwrapped(weights: dict, config: TransfusionConfig) -> Transfusion:
    """A plain model holding full weights (a DDP or FSDP2 model cannot ``save`` or ``generate``)."""
    model = Transfusion(config)
    model.load_state_dict(weights)
    return model


def kept_metrics(path: Path, start: int) -> tuple[bytes, str | None]:
    """The lines of ``metrics.jsonl`` up to step ``start``, and a note if a torn last line was dropped.

    A kill while a line was appended leaves it torn (not JSON): that last line is dropped and
    said so. Any other line that is not a JSON record with an int ``step`` raises
    ``CheckpointError`` naming the file and line.
    """
    if start == 0 or not path.exists():
        return b"", None
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    note = None
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not (isinstance(record, dict) and is_int(record.get("step"), 1)):
                raise ValueError("no step")
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            if number == len(lines) or (number == len(lines) - 1 and not lines[-1]):
                note = f"{path}: dropped a torn last line (line {number}: written when the run was stopped)"
                break
            raise CheckpointError(f"{path}:{number}: not a metrics record ({line[:80]!r}); "
                                  f"fix or remove the line") from None
        if record["step"] <= start:
            kept.append(line + b"\n")
    return b"".join(kept), note


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
    """Run (or resume) the training ``args`` describe; return the metrics of this process's steps.

    Raises ``OptionError`` (an option that cannot work), ``DataError`` (user data, naming file and
    line) or ``CheckpointError`` (a checkpoint ``--resume`` cannot continue), all ``ValueError``.
    """
    check_args(args)
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
        raise OptionError(f"--micro-batches: expected a multiple of the {processes.world_size} processes, "
                          f"got {args.micro_batches}")
    out = Path(args.out)
    checkpoint_path = out / CHECKPOINT_DIR
    if processes.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OptionError(f"--out: cannot create {out} ({error.strerror or error})") from None

    codec, latents = PixelCodec(), None
    if args.vae is not None:
        try:
            codec = VAECodec(args.vae, device=processes.device)
        except (ImportError, OSError, ValueError, RuntimeError) as error:
            raise OptionError(f"--vae: {args.vae}: {type(error).__name__}: {error}") from None
    config = model_config(args, codec)
    train_set, heldout = load_data(args, config)
    if not isinstance(train_set, ShapesDataset):
        print0(processes, f"data: {args.data}: {len(train_set)} images, {len(train_set.skipped)} unreadable skipped")
    data = data_identity(args, train_set, heldout)
    if args.vae is not None:
        cache = Path(args.latent_cache) if args.latent_cache else out / "latents"
        if processes.main:  # rank 0 encodes once; the others read its cache
            encode_dataset(codec, train_set, cache, log=lambda line: print0(processes, line))
        if processes.world_size > 1:
            dist.barrier()
        latents = encode_dataset(codec, train_set, cache, log=lambda line: None)

    torch.manual_seed(args.seed)  # the initial weights
    model = Transfusion(config).to(processes.device)
    parameters = sum(p.numel() for p in model.parameters())
    wrapped = wrap_model(model, args, processes)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay)
    start = 0
    if processes.main:
        if args.resume:  # finish or undo a checkpoint swap that a kill interrupted
            recover_training_checkpoint(checkpoint_path)
        elif discard_training_checkpoint(checkpoint_path):
            print(f"starting over (no --resume): removed the checkpoint in {checkpoint_path}", flush=True)
    if processes.world_size > 1:
        dist.barrier()
    if args.resume and is_complete(checkpoint_path):
        start = load_checkpoint(checkpoint_path, wrapped, optimizer, args, config, codec, data)
        print0(processes, f"resumed from {checkpoint_path} at step {start}")
    elif args.resume and checkpoint_path.exists():
        missing = [name for name in TRAINING_FILES if not (checkpoint_path / name).is_file()]
        raise CheckpointError(f"{checkpoint_path}: not a complete checkpoint (missing {', '.join(missing)}) and no "
                              f"complete one beside it; move it away to start from step 0")
    elif args.resume:
        print0(processes, f"no checkpoint in {checkpoint_path}: starting from step 0 (metrics.jsonl restarted)")

    metrics_path = out / METRICS_FILE
    if processes.main:  # keep the history up to the checkpoint, drop steps it did not keep
        kept, note = kept_metrics(metrics_path, start)
        if note:
            print(note, flush=True)
        atomic_write(metrics_path, kept)
    mode = "FSDP2" if args.fsdp and processes.world_size > 1 else "DDP" if processes.world_size > 1 else "1 process"
    print0(processes, f"training {parameters / 1e6:.2f}M parameters on {processes.device} ({mode}, "
                      f"{processes.world_size} x {local_micro_batches} micro-batches of "
                      f"{args.batch_size // args.micro_batches} documents); {len(train_set)} training items; "
                      f"steps {start + 1}..{args.stop_at or args.steps} of {args.steps}")

    stream = DocumentStream(train_set, latents, args.seed)
    packer = Packer(config, args.seq_len, caption_first_prob=args.caption_first_prob,
                    drop_caption_prob=args.drop_caption_prob, image_first_t_max=args.image_first_t_max,
                    clean_image_copies=args.clean_image_copies)
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
            save_checkpoint(checkpoint_path, wrapped, optimizer, config, args, step + 1, codec, data, processes)
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
    """The command line: on a bad option, bad data or a checkpoint it cannot resume, one line
    ``error: ...`` on stderr (naming the option, the file and line, or the field) and exit status 1."""
    try:
        return train(parse_args(argv))
    except (OptionError, DataError, CheckpointError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
