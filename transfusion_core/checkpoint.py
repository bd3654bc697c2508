"""Checkpoint files: safetensors for tensors, JSON for the rest; nothing is pickled.

A model checkpoint is a directory with ``config.json`` (the ``TransfusionConfig`` fields) and
``model.safetensors`` (the state dict): ``save_model`` / ``load_model``, which
``Transfusion.save`` / ``Transfusion.load`` call. A training checkpoint adds the optimizer state
(``optimizer.safetensors``, one tensor per ``parameter/field``) and ``train_state.json`` (step,
options, codec, parameter groups); ``write_training_checkpoint`` writes it beside the old one and
swaps it in whole, ``recover_training_checkpoint`` finishes a swap that a kill interrupted, and
``check_resume`` refuses one that a run cannot continue exactly. Imports only ``config``: the model
class and the run's options are passed in.

Reading trusts nothing. Every problem with a checkpoint's files raises ``CheckpointError`` (a
``ValueError``) whose message starts with the file and names the field or tensor: JSON that is
not JSON (or has a key twice), a config field of the wrong type or value (``TransfusionConfig``'s
own ``TypeError`` / ``ValueError`` message, after the file name), a missing, unexpected or
mis-shaped tensor, a tensor that is not floating point, a non-finite value, a damaged
safetensors file. A missing file raises ``MissingCheckpointError`` (a ``CheckpointError`` and a
``FileNotFoundError``). The weights' names, shapes and dtypes are read from the safetensors
header and compared with the model the config describes, built on the meta device, before any
tensor is allocated: a config that asks for a huge model fails without allocating it. The
safetensors files this module writes carry the SHA-256 of their tensors in the header's metadata,
checked on reading: a flipped byte in the data is named, not loaded.

Crash safety (``write_training_checkpoint``): every file is written and fsynced, then the
directory and its parent, before each rename, and ``train_state.json`` is written last (to a
temporary name, then renamed), so a directory holding all four files is complete. The swap keeps
one invariant: at every instant ``PATH`` or ``PATH.previous`` is a complete checkpoint (once one
was ever written), and ``PATH.previous`` is removed only while ``PATH`` is complete. So any
sequence of kills, at any point, leaves the newest complete checkpoint on disk, and
``recover_training_checkpoint`` puts it back at ``PATH``: a complete ``PATH.partial`` (written
whole, not yet swapped in) is the newest; else ``PATH`` if complete; else ``PATH.previous``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import TransfusionConfig, is_int

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAIN_STATE_FILE = "train_state.json"  # the run's arguments and progress, next to the weights; written last
TRAINING_FILES = (CONFIG_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE)
PARTIAL_SUFFIX = ".partial"  # being written
PREVIOUS_SUFFIX = ".previous"  # the one it replaces, kept until the new one is in place
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtypes a float parameter is loaded from


class CheckpointError(ValueError):
    """A checkpoint file is damaged or does not match: the message starts with the file."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint file is not there (also a ``FileNotFoundError``)."""


# ----------------------------------------------------------------------------------------------
# Durable file operations: write, fsync, then rename
# ----------------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    """fsync a file or a directory (a directory's entries: created, renamed, removed files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a fsynced temporary file, then a rename."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    _fsync(path.parent)


def _digest(tensors: dict) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _write_tensors(path: Path, tensors: dict) -> None:
    """``save_file`` (with the tensors' SHA-256 in the header's metadata) to a temporary file,
    fsync it, rename it to ``path``."""
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata={"sha256": _digest(tensors)})
    _fsync(temporary)
    os.replace(temporary, path)
    _fsync(path.parent)


def atomic_write(path, data: bytes) -> None:
    """Replace the file ``path`` by ``data`` whole or not at all (fsynced temporary file, rename,
    fsync of the directory)."""
    _write_file(_check_path("path", path), data)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _check_path(name: str, path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a str or os.PathLike, got {type(path).__name__}")
    if "\0" in os.fspath(path):
        raise ValueError(f"{name}: contains a NUL byte: {path!r}")
    return Path(path)


# ----------------------------------------------------------------------------------------------
# Reading files that may be damaged
# ----------------------------------------------------------------------------------------------
def _no_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"key {duplicates[0]!r} appears more than once")
    return dict(pairs)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; ``CheckpointError`` naming the file for anything else."""
    if not path.is_file():
        raise MissingCheckpointError(f"{path}: not found")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path}: not UTF-8 (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{path}: not JSON ({error})") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (safetensors dtype, shape)}`` from a safetensors file's header; nothing else is read."""
    if not path.is_file():
        raise MissingCheckpointError(f"{path}: not found")
    try:
        with safe_open(str(path), framework="pt") as file:  # checks the header and that the data covers it
            names = file.keys()  # a safe_open is not iterable
            return {name: (file.get_slice(name).get_dtype(), tuple(file.get_slice(name).get_shape()))
                    for name in names}
    except (SafetensorError, OSError, ValueError) as error:  # ValueError: a dtype torch does not have
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file whose header was checked, against the SHA-256 its
    metadata holds (files this module wrote; a file without one is taken as it is); non-finite
    values are named."""
    try:
        with safe_open(str(path), framework="pt") as file:
            names, metadata = file.keys(), file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    if "sha256" in metadata and metadata["sha256"] != _digest(tensors):
        raise CheckpointError(f"{path}: the tensors do not match the SHA-256 written with them (a damaged file)")
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: {name}: {int((~torch.isfinite(tensor)).sum())} non-finite values")
    return tensors


def _shape_problems(header: dict, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Missing, unexpected, mis-shaped and non-float tensors of ``header`` against ``expected``."""
    problems = [f"missing {name}" for name in expected if name not in header]
    problems += [f"unexpected {name}" for name in header if name not in expected]
    for name, shape in expected.items():
        if name not in header:
            continue
        dtype, got = header[name]
        if got != tuple(shape):
            problems.append(f"{name}: checkpoint shape {got}, config needs {tuple(shape)}")
        if dtype not in FLOAT_DTYPES:
            problems.append(f"{name}: dtype {dtype}, expected a float dtype ({', '.join(FLOAT_DTYPES)})")
    return problems


def _expected_shapes(model_class, config: TransfusionConfig) -> tuple[dict, dict]:
    """Shapes of the state dict and of the parameters of ``model_class(config)``, built on the meta
    device: no memory is allocated, whatever size the config asks for."""
    return _meta_shapes(model_class, json.dumps(asdict(config), sort_keys=True))


@functools.lru_cache(maxsize=8)
def _meta_shapes(model_class, config_json: str) -> tuple[dict, dict]:
    try:
        with torch.device("meta"):
            model = model_class(TransfusionConfig(**json.loads(config_json)))
    except (RuntimeError, TypeError, OverflowError, MemoryError) as error:  # a weight of 2**63 elements or more
        reason = " ".join(str(error).splitlines()[0].split())
        raise CheckpointError(f"the config describes a model that cannot be built ({reason})") from None
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    parameters = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            raise TypeError(f"model_class: state {name} is {tensor.dtype}; checkpoints hold float tensors only")
    return state, parameters


def _check_layer_count(path: Path, config: TransfusionConfig, header: dict) -> None:
    """``config.n_layers`` against the ``layers.<i>.`` tensors of the header, before the meta-device
    model is built: ``n_layers: 10**9`` would take hours to build even without memory."""
    held = {name.split(".")[1] for name in header if name.startswith("layers.") and name.count(".") >= 2}
    if config.n_layers != len(held):
        raise CheckpointError(f"{path / WEIGHTS_FILE} does not match {path / CONFIG_FILE}: n_layers={config.n_layers}, "
                              f"the weights hold {len(held)} layers")


# ----------------------------------------------------------------------------------------------
# Model checkpoints
# ----------------------------------------------------------------------------------------------
def save_model(model, path) -> None:
    """Write ``path/model.safetensors`` (weights) and ``path/config.json``; nothing pickled.

    Each file is written to a temporary name, fsynced and renamed, so neither is ever torn.
    """
    path = _check_path("path", path)
    path.mkdir(parents=True, exist_ok=True)
    _write_tensors(path / WEIGHTS_FILE, {name: t.detach().contiguous() for name, t in model.state_dict().items()})
    _write_file(path / CONFIG_FILE, (json.dumps(asdict(model.config), indent=2) + "\n").encode())


def read_model_config(path) -> TransfusionConfig:
    """The ``TransfusionConfig`` of ``path/config.json``: every field present, known and checked.

    A field missing, unknown, or that ``TransfusionConfig`` rejects (its ``TypeError`` or ``ValueError``)
    raises ``CheckpointError`` naming the file and the field.
    """
    file = _check_path("path", path) / CONFIG_FILE
    values = read_json(file)
    names = [f.name for f in fields(TransfusionConfig)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise CheckpointError(f"{file}: unknown TransfusionConfig fields {unknown}")
    missing = [name for name in names if name not in values]
    if missing:
        raise CheckpointError(f"{file}: missing TransfusionConfig fields {missing}")
    try:
        return TransfusionConfig(**values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{file}: {error}") from None


def load_model(model_class, path, device=None):
    """Build ``model_class(config)`` from ``path/config.json`` and load ``path/model.safetensors``.

    The config is checked field by field and the weights' header (names, shapes, dtypes) against
    the model the config describes before the model is built; then the values must be finite.
    Raises ``MissingCheckpointError`` without the two files, ``CheckpointError`` naming the file
    and the field or every missing, unexpected, mis-shaped and non-float tensor.
    """
    path = _check_path("path", path)
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise (TypeError if isinstance(error, TypeError) else ValueError)(
                f"device: expected a torch.device or a device name, got {device!r}") from None
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise MissingCheckpointError(f"{path}: expected a checkpoint directory with {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = read_model_config(path)
    header = _header(path / WEIGHTS_FILE)
    _check_layer_count(path, config, header)
    try:
        expected, _ = _expected_shapes(model_class, config)
    except CheckpointError as error:
        raise CheckpointError(f"{path / CONFIG_FILE}: {error}") from None
    problems = _shape_problems(header, expected)
    if problems:
        raise CheckpointError(f"{path / WEIGHTS_FILE} does not match {path / CONFIG_FILE}: " + "; ".join(problems))
    weights = _read_tensors(path / WEIGHTS_FILE)
    model = model_class(config)
    model.load_state_dict(weights)
    return model.to(device) if device is not None else model


# ----------------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------------
def _siblings(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + PARTIAL_SUFFIX), path.with_name(path.name + PREVIOUS_SUFFIX)


def is_complete(path) -> bool:
    """``path`` holds the four files of a training checkpoint (``train_state.json`` is written last)."""
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in TRAINING_FILES)


def _swap_in(path: Path) -> None:
    """Put the complete ``PATH.partial`` at ``PATH``; at every step ``PATH``, ``PATH.previous`` or
    ``PATH.partial`` is complete, and the newest one can be found (see the module docstring)."""
    partial, previous = _siblings(path)
    parent = path.parent
    if is_complete(path):
        _remove_tree(previous)  # PATH is whole: the one before it can go
        _fsync(parent)
        os.rename(path, previous)
    elif path.exists() or path.is_symlink():  # not a checkpoint (damaged): PATH.partial replaces it
        _remove_tree(path)
    _fsync(parent)
    os.rename(partial, path)
    _fsync(parent)
    _remove_tree(previous)
    _fsync(parent)


def write_training_checkpoint(path, model, optimizer_state: dict, train_state: dict) -> None:
    """Write a model checkpoint of ``model`` plus ``optimizer.safetensors`` and ``train_state.json``.

    ``optimizer_state`` is a full optimizer state dict keyed by parameter name (its ``"state"``
    is written; ``train_state`` holds the parameter groups). The directory is written as
    ``PATH.partial`` (every file fsynced, ``train_state.json`` last), then swapped in. It starts
    by finishing a swap that an interruption left (``recover_training_checkpoint``), so a kill at
    any point, however many times in a row, leaves the newest complete checkpoint on disk.
    """
    path = _check_path("path", path)
    partial, _ = _siblings(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_training_checkpoint(path)  # first finish a swap a kill interrupted: PATH.partial may be the newest
    _remove_tree(partial)  # incomplete: never trusted
    partial.mkdir()
    save_model(model, partial)
    tensors = {f"{name}/{key}": value.detach().contiguous() for name, state in optimizer_state["state"].items()
               for key, value in state.items()}
    _write_tensors(partial / OPTIMIZER_FILE, tensors)
    _write_file(partial / TRAIN_STATE_FILE, (json.dumps(train_state, indent=2) + "\n").encode())
    _fsync(path.parent)
    _swap_in(path)


def recover_training_checkpoint(path) -> bool:
    """Finish or undo the swap an interruption left behind; return whether ``PATH`` is now complete.

    A complete ``PATH.partial`` (written whole, not yet swapped in) is swapped in; else, without a
    complete ``PATH``, a complete ``PATH.previous`` goes back to ``PATH``. Then leftovers are
    removed. Itself safe to interrupt. ``PATH`` can be left damaged (files missing) only if it
    was so before and nothing complete replaced it: the caller decides (``--resume`` refuses).
    """
    path = _check_path("path", path)
    partial, previous = _siblings(path)
    if is_complete(partial):
        _swap_in(path)
    elif not is_complete(path) and is_complete(previous):
        if path.exists() or path.is_symlink():
            _remove_tree(path)
            _fsync(path.parent)
        os.rename(previous, path)
        _fsync(path.parent)
    if is_complete(path) and (partial.exists() or previous.exists()):
        _remove_tree(partial)
        _remove_tree(previous)
        _fsync(path.parent)
    return is_complete(path)


def discard_training_checkpoint(path) -> bool:
    """Remove ``PATH``, ``PATH.partial`` and ``PATH.previous`` (a run that starts over); return
    whether there was anything to remove."""
    path = _check_path("path", path)
    found = False
    for candidate in (path, *_siblings(path)):
        if candidate.exists() or candidate.is_symlink():
            _remove_tree(candidate)
            found = True
    if found:
        _fsync(path.parent)
    return found


def read_train_state(checkpoint) -> dict:
    """``CHECKPOINT/train_state.json``: step, options (``args``), codec, parameter groups.

    Checked as far as this module reads it: a JSON object whose ``step`` is an int >= 1 and whose
    ``param_groups`` is a list of objects with a ``params`` list of parameter names; the caller
    checks the rest (``CheckpointError`` naming the file and the field).
    """
    path = _check_path("checkpoint", checkpoint) / TRAIN_STATE_FILE
    if not path.is_file():
        raise MissingCheckpointError(
            f"{path}: not found; expected a checkpoint written by python -m transfusion_core.train"
        )
    state = read_json(path)
    if not is_int(state.get("step"), 1):
        raise CheckpointError(f"{path}: step: expected an int >= 1, got {state.get('step')!r}")
    groups = state.get("param_groups")
    if not (isinstance(groups, list) and groups and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and all(isinstance(p, str) for p in g["params"])
            for g in groups)):
        got = repr(groups)
        raise CheckpointError(f"{path}: param_groups: expected a list of objects with a 'params' list of "
                              f"parameter names, got {got[:200] + '...' if len(got) > 200 else got}")
    return state


def option_flag(name: str) -> str:
    """How the training script spells the option ``name`` on its command line (``--min-lr-ratio``),
    as its errors and the resume errors name it."""
    return "--" + name.replace("_", "-")


def check_resume(checkpoint, state: dict, *, options: dict, identity, codec: dict, data: dict, param_groups,
                 steps: int, config: TransfusionConfig) -> None:
    """Refuse a training checkpoint that a run cannot continue exactly, naming what differs or is damaged.

    ``state`` is ``read_train_state``'s (step and parameter-group layout checked). The run is described
    by ``options`` (its options by name, as ``train_state.json`` stores them under ``args``), of which
    those named in ``identity`` (everything that changes the arithmetic) must equal the checkpoint's;
    ``codec`` and ``data`` (the sizes and hashes of its files), which must equal the checkpoint's;
    ``param_groups`` of its optimizer (every key must match but the learning rate, which each step
    sets); ``steps``, which the checkpoint's step must not exceed; and its model ``config``, which
    ``config.json`` must hold. Raises ``CheckpointError`` naming the file or the options.
    """
    path = _check_path("checkpoint", checkpoint)
    file = path / TRAIN_STATE_FILE
    saved = state.get("args")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{file}: args: expected an object of the run's options, got {saved!r}")
    missing = [name for name in identity if name not in saved]
    if missing:
        raise CheckpointError(f"{file}: args: missing options {missing}")
    differences = [f"{option_flag(name)}: checkpoint {saved[name]!r}, now {options[name]!r}"
                   for name in identity if saved[name] != options[name]]
    if differences:
        raise CheckpointError(f"--resume: {path} was trained with other options ({'; '.join(differences)})")
    if state.get("codec") != codec:
        raise CheckpointError(f"--resume: {path} was trained with codec {state.get('codec')!r}, now {codec!r}")
    saved_data = state.get("data")
    if not isinstance(saved_data, dict):
        raise CheckpointError(f"{file}: data: expected the sizes and hashes of the run's data, got {saved_data!r}")
    if set(saved_data) != set(data):
        raise CheckpointError(f"{file}: data: expected the keys {sorted(data)}, got {sorted(saved_data)}")
    changed = [f"{option_flag(name)} {options[name]} (checkpoint {_describe(saved_data[name])}, "
               f"now {_describe(data[name])})" for name in data if saved_data[name] != data[name]]
    if changed:
        raise CheckpointError(f"--resume: the data changed since {path} was written: {'; '.join(changed)}")
    if state["step"] > steps:
        raise CheckpointError(f"{file}: step: expected at most --steps={steps}, got {state['step']}")
    if not is_int(state.get("world_size"), 1):
        raise CheckpointError(f"{file}: world_size: expected an int >= 1, got {state.get('world_size')!r}")
    groups = state["param_groups"]
    current = json.loads(json.dumps(param_groups))
    if len(groups) != len(current):
        raise CheckpointError(f"{file}: param_groups: {len(groups)} groups, this run's optimizer has {len(current)}")
    for k, (saved_group, group) in enumerate(zip(groups, current)):
        if set(saved_group) != set(group):
            raise CheckpointError(f"{file}: param_groups[{k}]: keys {sorted(saved_group)}, expected {sorted(group)}")
        for key in group:
            if key == "lr":
                if not (isinstance(saved_group[key], (int, float)) and math.isfinite(saved_group[key])):
                    raise CheckpointError(f"{file}: param_groups[{k}].lr: expected a finite number, "
                                          f"got {saved_group[key]!r}")
            elif saved_group[key] != group[key]:
                got = repr(saved_group[key])
                raise CheckpointError(f"{file}: param_groups[{k}].{key}: expected {group[key]!r} (this run's), "
                                      f"got {got[:200] + '...' if len(got) > 200 else got}")
    saved_config = read_model_config(path)
    if saved_config != config:
        differences = [f"{f.name}: checkpoint {getattr(saved_config, f.name)!r}, run {getattr(config, f.name)!r}"
                       for f in fields(config) if getattr(saved_config, f.name) != getattr(config, f.name)]
        raise CheckpointError(f"{path / CONFIG_FILE}: not the run's model ({'; '.join(differences)})")


def _describe(fingerprint) -> str:
    """A file fingerprint ``{"bytes": ..., "sha256": ...}`` in a message (anything else as its repr)."""
    if not isinstance(fingerprint, dict):
        return repr(fingerprint)
    return f"{fingerprint.get('bytes')} bytes, sha256 {str(fingerprint.get('sha256'))[:12]}"


def read_training_tensors(checkpoint, model_class, config: TransfusionConfig, param_groups) -> tuple[dict, dict]:
    """The weights and the optimizer state dict (``{"state": ..., "param_groups": param_groups}``).

    Both files' headers are checked against ``model_class(config)`` (built on the meta device)
    before anything is read: the weights as ``load_model`` does; the optimizer tensors must be
    ``parameter/field`` of a parameter of the model, ``step`` a scalar, every other field of the
    parameter's shape, all floating point, each parameter with the same fields; then every value
    must be finite (and second moments ``exp_avg_sq`` >= 0).
    """
    checkpoint = _check_path("checkpoint", checkpoint)
    weights_file, optimizer_file = checkpoint / WEIGHTS_FILE, checkpoint / OPTIMIZER_FILE
    expected, parameters = _expected_shapes(model_class, config)
    problems = _shape_problems(_header(weights_file), expected)
    if problems:
        raise CheckpointError(f"{weights_file} does not match the run's model: " + "; ".join(problems))
    header = _header(optimizer_file)
    wanted, fields_of = {}, {}
    for key in header:
        name, _, field = key.rpartition("/")
        if name not in parameters or not field:
            raise CheckpointError(f"{optimizer_file}: {key}: not 'parameter/field' of a parameter of the model")
        wanted[key] = () if field == "step" else parameters[name]
        fields_of.setdefault(name, set()).add(field)
    if len({frozenset(f) for f in fields_of.values()}) > 1:
        first = min(fields_of)
        odd = next(name for name in sorted(fields_of) if fields_of[name] != fields_of[first])
        raise CheckpointError(f"{optimizer_file}: {odd} has fields {sorted(fields_of[odd])}, "
                              f"{first} has {sorted(fields_of[first])}")
    problems = _shape_problems(header, wanted)
    if problems:
        raise CheckpointError(f"{optimizer_file} does not match the run's model: " + "; ".join(problems))
    per_parameter = {}
    for key, value in _read_tensors(optimizer_file).items():
        name, _, field = key.rpartition("/")
        if field in ("exp_avg_sq", "max_exp_avg_sq") and bool((value < 0).any()):
            raise CheckpointError(f"{optimizer_file}: {key}: negative second moments")
        if field == "step" and not (float(value) >= 0 and math.isfinite(float(value))):
            raise CheckpointError(f"{optimizer_file}: {key}: expected a step >= 0, got {float(value)}")
        per_parameter.setdefault(name, {})[field] = value
    return _read_tensors(weights_file), {"state": per_parameter, "param_groups": param_groups}


__all__ = [
    "CONFIG_FILE", "OPTIMIZER_FILE", "TRAINING_FILES", "TRAIN_STATE_FILE", "WEIGHTS_FILE", "CheckpointError",
    "MissingCheckpointError", "atomic_write", "check_resume", "discard_training_checkpoint", "is_complete",
    "load_model", "option_flag", "read_json", "read_model_config", "read_train_state", "read_training_tensors",
    "recover_training_checkpoint", "save_model", "write_training_checkpoint",
]
