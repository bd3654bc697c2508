"""Checkpoint files: safetensors for tensors, JSON for the rest; nothing is pickled.

A model checkpoint is a directory with ``config.json`` (the ``TransfusionConfig`` fields) and
``model.safetensors`` (the state dict): ``save_model`` / ``load_model``, which
``Transfusion.save`` / ``Transfusion.load`` call. A training checkpoint adds the optimizer state
(``optimizer.safetensors``, one tensor per ``parameter/field``) and ``train_state.json`` (step,
options, codec, parameter groups); ``write_training_checkpoint`` writes it beside the old one and
swaps it in whole. Imports only ``config``: the model class is passed in.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path

from safetensors.torch import load_file, save_file

from .config import TransfusionConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAIN_STATE_FILE = "train_state.json"  # the run's arguments and progress, next to the weights


# ----------------------------------------------------------------------------------------------
# Model checkpoints
# ----------------------------------------------------------------------------------------------
def save_model(model, path) -> None:
    """Write ``path/model.safetensors`` (weights) and ``path/config.json``; nothing pickled."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    save_file({name: t.contiguous() for name, t in model.state_dict().items()}, str(path / WEIGHTS_FILE))


def load_model(model_class, path, device=None):
    """Build ``model_class(config)`` from ``path/config.json`` and load ``path/model.safetensors``.

    Raises ``FileNotFoundError`` without the two files, and ``ValueError`` naming unknown config
    fields or every missing, unexpected and mis-shaped tensor.
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path}: expected a checkpoint directory with {CONFIG_FILE} and {WEIGHTS_FILE}")
    config_fields = json.loads((path / CONFIG_FILE).read_text())
    unknown = set(config_fields) - {f.name for f in fields(TransfusionConfig)}
    if unknown:
        raise ValueError(f"{path / CONFIG_FILE}: unknown TransfusionConfig fields {sorted(unknown)}")
    model = model_class(TransfusionConfig(**config_fields))
    weights = load_file(str(path / WEIGHTS_FILE))
    expected = model.state_dict()
    problems = [f"missing {name}" for name in expected if name not in weights]
    problems += [f"unexpected {name}" for name in weights if name not in expected]
    problems += [
        f"{name}: checkpoint shape {tuple(weights[name].shape)}, config needs {tuple(t.shape)}"
        for name, t in expected.items() if name in weights and weights[name].shape != t.shape
    ]
    if problems:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match {path / CONFIG_FILE}: " + "; ".join(problems))
    model.load_state_dict(weights)
    return model.to(device) if device is not None else model


# ----------------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------------
def write_training_checkpoint(path, model, optimizer_state: dict, train_state: dict) -> None:
    """Write a model checkpoint of ``model`` plus ``optimizer.safetensors`` and ``train_state.json``.

    ``optimizer_state`` is a full optimizer state dict keyed by parameter name (its ``"state"``
    is written; ``train_state`` holds the parameter groups). The directory is written beside the
    old one and swapped in, so an interruption leaves the previous checkpoint whole (or, between
    the two renames, kept aside as ``PATH.previous``).
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_model(model, partial)
    tensors = {f"{name}/{key}": value.contiguous() for name, state in optimizer_state["state"].items()
               for key, value in state.items()}
    save_file(tensors, str(partial / OPTIMIZER_FILE))
    (partial / TRAIN_STATE_FILE).write_text(json.dumps(train_state, indent=2) + "\n")
    previous = path.with_name(path.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if path.exists():
        path.rename(previous)
    partial.rename(path)
    shutil.rmtree(previous, ignore_errors=True)


def read_train_state(checkpoint) -> dict:
    """``CHECKPOINT/train_state.json``: step, options (``args``), codec, parameter groups."""
    path = Path(checkpoint) / TRAIN_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"CHECKPOINT: {path} not found; expected a checkpoint written by python -m transfusion_core.train"
        )
    return json.loads(path.read_text())


def read_training_tensors(checkpoint, param_groups) -> tuple[dict, dict]:
    """The weights and the optimizer state dict (``{"state": ..., "param_groups": param_groups}``)."""
    checkpoint = Path(checkpoint)
    per_parameter = {}
    for key, value in load_file(str(checkpoint / OPTIMIZER_FILE)).items():
        name, _, field = key.rpartition("/")
        per_parameter.setdefault(name, {})[field] = value
    return load_file(str(checkpoint / WEIGHTS_FILE)), {"state": per_parameter, "param_groups": param_groups}
