"""Checkpoint files: model save/load (safetensors + JSON), every kind of damage named before anything is
allocated, training checkpoints swapped in crash-safely (kills injected at every file operation)."""

import functools
import itertools
import json
import os
import re
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import transfusion_core as tc
from transfusion_core import checkpoint
from transfusion_core.checkpoint import CheckpointError, MissingCheckpointError
from transfusion_core.config import FLOW_DEFAULTS

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
    with pytest.raises(CheckpointError, match=shape_message):
        tc.Transfusion.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"image_encoder": "unet"}))
    names_message = r"does not match .*missing image_io.conv_in.weight.*unexpected image_io.patch_in.weight"
    with pytest.raises(CheckpointError, match=names_message):
        tc.Transfusion.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_experts": 8}))
    with pytest.raises(CheckpointError, match=r"unknown TransfusionConfig fields \['n_experts'\]"):
        tc.Transfusion.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        tc.Transfusion.load(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# Damaged model checkpoints: a CheckpointError (a ValueError) naming the file and the field
# ----------------------------------------------------------------------------------------------
def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | changes))


def _replace_tensor(path, name, tensor):
    weights = {key: t for key, t in tc.Transfusion.load(path).state_dict().items()}
    weights[name] = tensor
    save_file({key: t.contiguous() for key, t in weights.items()}, str(path / "model.safetensors"))


WEIGHT = "norm.weight"  # [dim]


def test_a_config_without_fields_that_have_defaults_is_refused_naming_them(tmp_path):
    """config.json holds every field: one left out is refused even where TransfusionConfig has a default
    for it (the flow-matching fields), so a checkpoint never loads as a model it was not."""
    path = tmp_path
    tc.Transfusion(tiny_config()).save(path)
    values = json.loads((path / "config.json").read_text())
    assert set(FLOW_DEFAULTS) <= set(values)
    (path / "config.json").write_text(json.dumps({k: v for k, v in values.items() if k not in FLOW_DEFAULTS}))
    missing = re.escape(str(sorted(FLOW_DEFAULTS, key=list(values).index)))
    with pytest.raises(CheckpointError, match=rf"config.json: missing TransfusionConfig fields {missing}"):
        tc.Transfusion.load(path)


@pytest.mark.parametrize("damage, message", [
    (lambda p: _edit_config(p, norm_eps="1e-5"),
     r"config.json: TransfusionConfig.norm_eps: expected a finite float > 0, got '1e-5'"),
    (lambda p: _edit_config(p, rope_theta=None), r"config.json: TransfusionConfig.rope_theta: expected a finite float"),
    (lambda p: _edit_config(p, patch_position_embedding="yes"),
     r"config.json: TransfusionConfig.patch_position_embedding: expected a bool, got 'yes'"),
    (lambda p: _edit_config(p, dim=32.0), r"config.json: TransfusionConfig.dim: expected an int in \[1, 2147483647\], got 32.0"),
    (lambda p: _edit_config(p, norm_eps=float("nan")), r"config.json: TransfusionConfig.norm_eps: .* got nan"),
    (lambda p: (p / "config.json").write_text(json.dumps({k: v for k, v in json.loads(
        (p / "config.json").read_text()).items() if k != "rope_theta"})),
     r"config.json: missing TransfusionConfig fields \['rope_theta'\]"),
    (lambda p: (p / "config.json").write_text("{not json"), r"config.json: not JSON \(.* line 1 column 2\)"),
    (lambda p: (p / "config.json").write_bytes(b'{"dim": "\xff"}'), r"config.json: not UTF-8 \(byte 9\)"),
    (lambda p: (p / "config.json").write_text("[1, 2]"), r"config.json: expected a JSON object, got list"),
    (lambda p: (p / "config.json").write_text('{"dim": 32, "dim": 64}'),
     r"config.json: not JSON \(key 'dim' appears more than once\)"),
    (lambda p: (p / "config.json").write_text("[" * 100_000), r"config.json: not JSON"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 7), r"model.safetensors: not a readable safetensors"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-10]),
     r"model.safetensors: not a readable safetensors file \(.*not fully covered"),
    (lambda p: (p / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}"),
     r"model.safetensors: not a readable safetensors"),
    (lambda p: _replace_tensor(p, WEIGHT, torch.ones(32, dtype=torch.int64)),
     r"model.safetensors does not match .*norm.weight: dtype I64, expected a float dtype"),
    (lambda p: _replace_tensor(p, WEIGHT, torch.ones(32, dtype=torch.bool)), r"norm.weight: dtype BOOL"),
    (lambda p: _replace_tensor(p, WEIGHT, torch.ones(32, dtype=torch.complex64)), r"norm.weight: dtype C64"),
    (lambda p: _replace_tensor(p, WEIGHT, torch.full((32,), float("nan"))),
     r"model.safetensors: norm.weight: 32 non-finite values"),
    (lambda p: _replace_tensor(p, WEIGHT, torch.ones(33)), r"norm.weight: checkpoint shape \(33,\), config needs"),
])
def test_every_damaged_model_checkpoint_is_a_named_value_error(tmp_path, damage, message):
    tc.Transfusion(tiny_config()).save(tmp_path)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message) as caught:
        tc.Transfusion.load(tmp_path)
    assert isinstance(caught.value, ValueError) and str(tmp_path) in str(caught.value)


def test_a_flipped_byte_in_the_weights_is_found_by_their_checksum(tmp_path):
    tc.Transfusion(tiny_config()).save(tmp_path)
    raw = bytearray((tmp_path / "model.safetensors").read_bytes())
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as file:
        assert len(file.metadata()["sha256"]) == 64
    raw[-5] ^= 0x01  # a low mantissa bit of the last weight: still finite, still a float
    (tmp_path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model.safetensors: the tensors do not match the SHA-256 written"):
        tc.Transfusion.load(tmp_path)


def test_a_config_of_too_many_layers_or_an_unbuildable_model_fails_on_the_header(tmp_path):
    tc.Transfusion(tiny_config()).save(tmp_path)
    _edit_config(tmp_path, n_layers=10**9)  # hours to build, even on the meta device
    with pytest.raises(CheckpointError, match=r"n_layers=1000000000, the weights hold 2 layers"):
        tc.Transfusion.load(tmp_path)
    _edit_config(tmp_path, n_layers=2, image_channels=2**31 - 1, patch_size=2**30, image_size=2**30)
    with pytest.raises(CheckpointError, match=r"config.json: the config describes a model that cannot be built "
                                              r"\([^\n]*\)$"):
        tc.Transfusion.load(tmp_path)  # a patch of 2**91 values


def test_a_huge_config_fails_on_the_header_before_any_model_is_built(tmp_path):
    """vocab_size 2**40 is out of TransfusionConfig's range; 2**31 - 1 would need 256 GiB: the weights'
    header is compared with a meta-device model, and only a matching checkpoint builds a real one."""
    tc.Transfusion(tiny_config()).save(tmp_path)
    _edit_config(tmp_path, vocab_size=2**40)
    with pytest.raises(CheckpointError, match=r"config.json: TransfusionConfig.vocab_size: expected an int in "):
        tc.Transfusion.load(tmp_path)
    _edit_config(tmp_path, vocab_size=2**31 - 1)
    devices = []

    class Recording(tc.Transfusion):
        def __init__(self, config):
            devices.append(torch.get_default_device().type)
            super().__init__(config)

    with pytest.raises(CheckpointError, match=r"tok_embeddings.weight: checkpoint shape \(260, 32\), config needs "
                                              r"\(2147483647, 32\)"):
        checkpoint.load_model(Recording, tmp_path)
    assert devices == ["meta"]
    _edit_config(tmp_path, vocab_size=260)
    checkpoint.load_model(Recording, tmp_path)
    assert devices == ["meta", "meta", "cpu"]


def test_load_arguments_are_checked(tmp_path):
    tc.Transfusion(tiny_config()).save(tmp_path)
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike, got NoneType"):
        tc.Transfusion.load(None)
    with pytest.raises(ValueError, match="path: contains a NUL byte"):
        tc.Transfusion.load(str(tmp_path) + "\0x")
    with pytest.raises(ValueError, match="device: expected a torch.device or a device name, got 'banana'"):
        tc.Transfusion.load(tmp_path, device="banana")
    with pytest.raises(MissingCheckpointError, match="config.json and model.safetensors"):
        tc.Transfusion.load(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------------
def _optimizer_state(model, value):
    return {"state": {name: {"step": torch.tensor(float(value)), "exp_avg": torch.full_like(p, value),
                             "exp_avg_sq": torch.full_like(p, value)}
                      for name, p in model.named_parameters()},
            "param_groups": [{"lr": 0.1, "params": [name for name, _ in model.named_parameters()]}]}


def _write(path, model, step):
    optimizer_state = _optimizer_state(model, step)
    train_state = {"step": step, "args": {"lr": 0.1}, "param_groups": optimizer_state["param_groups"]}
    checkpoint.write_training_checkpoint(path, model, optimizer_state, train_state)
    return train_state


def test_training_checkpoint_round_trip_and_swap(tmp_path):
    """Weights, optimizer tensors and train_state.json come back as written; a second write
    replaces the first whole and leaves no .partial or .previous directory behind."""
    torch.manual_seed(0)
    model = tc.Transfusion(tiny_config())
    path = tmp_path / "checkpoint"
    for step in (1, 2):
        train_state = _write(path, model, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "train_state.json"]
    state = checkpoint.read_train_state(path)
    assert state == json.loads(json.dumps(train_state))
    weights, optimizer = checkpoint.read_training_tensors(path, tc.Transfusion, model.config, state["param_groups"])
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[name], t) for name, t in model.state_dict().items())
    assert optimizer["param_groups"] == state["param_groups"]
    expected = _optimizer_state(model, 2)
    assert optimizer["state"].keys() == expected["state"].keys()
    for name, fields in expected["state"].items():
        assert optimizer["state"][name].keys() == fields.keys()
        assert all(torch.equal(optimizer["state"][name][key], value) for key, value in fields.items())
    assert tc.Transfusion.load(path).config == model.config


def test_read_train_state_needs_a_training_checkpoint(tmp_path):
    tc.Transfusion(tiny_config()).save(tmp_path)
    with pytest.raises(FileNotFoundError, match="train_state.json: not found"):
        checkpoint.read_train_state(tmp_path)


@pytest.mark.parametrize("state, message", [
    ('{"step": -5, "param_groups": [{"params": []}]}', r"train_state.json: step: expected an int >= 1, got -5"),
    ('{"step": 2.5, "param_groups": [{"params": []}]}', r"train_state.json: step: expected an int >= 1, got 2.5"),
    ('{"param_groups": [{"params": []}]}', r"train_state.json: step: expected an int >= 1, got None"),
    ('{"step": 2, "param_groups": {"params": []}}', r"train_state.json: param_groups: expected a list of objects"),
    ('{"step": 2, "param_groups": [{"params": [1]}]}', r"train_state.json: param_groups: expected a list"),
    ('{"step": 2, "param_groups": [{"params": []}', r"train_state.json: not JSON \(Expecting"),
])
def test_damaged_train_state_is_named(tmp_path, state, message):
    (tmp_path / "train_state.json").write_text(state)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.read_train_state(tmp_path)


def _rewrite_optimizer(path, edit):
    with safe_open(str(path / "optimizer.safetensors"), framework="pt") as file:
        names = file.keys()  # a safe_open is not iterable
        tensors = {name: file.get_tensor(name) for name in names}
    edit(tensors)
    save_file(tensors, str(path / "optimizer.safetensors"))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"nowhere.weight/exp_avg": torch.zeros(1)}),
     r"optimizer.safetensors: nowhere.weight/exp_avg: not 'parameter/field' of a parameter"),
    (lambda t: t.update({"norm.weight/exp_avg": torch.zeros(5)}),
     r"optimizer.safetensors does not match the run's model: norm.weight/exp_avg: checkpoint shape \(5,\)"),
    (lambda t: t.update({"norm.weight/exp_avg": torch.zeros(32, dtype=torch.int32)}), r"dtype I32"),
    (lambda t: t.pop("norm.weight/exp_avg"), r"optimizer.safetensors: norm.weight has fields \['exp_avg_sq', 'step'\]"),
    (lambda t: t.update({"norm.weight/exp_avg_sq": -torch.ones(32)}), r"norm.weight/exp_avg_sq: negative second"),
    (lambda t: t.update({"norm.weight/step": torch.tensor(float("inf"))}), r"norm.weight/step: 1 non-finite"),
    (lambda t: t.update({"norm.weight/step": torch.tensor(-1.0)}), r"norm.weight/step: expected a step >= 0"),
])
def test_damaged_optimizer_state_is_named_before_it_is_read(tmp_path, edit, message):
    model = tc.Transfusion(tiny_config())
    path = tmp_path / "checkpoint"
    state = _write(path, model, 1)
    _rewrite_optimizer(path, edit)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.read_training_tensors(path, tc.Transfusion, model.config, state["param_groups"])


# ----------------------------------------------------------------------------------------------
# Crash safety: a kill injected before every file operation of the swap, twice in a row
# ----------------------------------------------------------------------------------------------
class Killed(BaseException):
    """A SIGKILL as the file system sees it: the operation does not happen, nothing after it runs
    (a BaseException, so that no ``except Exception`` cleanup could run either)."""


class KillSwitch:
    """Counts the file operations (os renames, fsyncs, mkdir, unlink, rmdir and the safetensors
    writes) and kills at the ``at``-th one; a killed safetensors write leaves half a file."""

    OPERATIONS = ("rename", "replace", "fsync", "mkdir", "unlink", "rmdir")

    def __init__(self, monkeypatch):
        self.at, self.count, self.step, self.committed, self.log = None, 0, None, set(), []
        for name in self.OPERATIONS:  # fsync is only logged: a kill is not a power cut, and fsync is slow
            real = (lambda fd: None) if name == "fsync" else getattr(os, name)
            monkeypatch.setattr(os, name, self._wrap(name, real))
        real_save_file = checkpoint.save_file

        def torn_save_file(tensors, filename, *args, **kwargs):
            self._tick("save_file", filename)
            real_save_file(tensors, filename, *args, **kwargs)

        def half_written(filename):
            with open(filename, "wb") as file:
                file.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a header cut short

        self._torn = half_written
        monkeypatch.setattr(checkpoint, "save_file", torn_save_file)

    def _tick(self, name, *args):
        if self.at is None:
            return
        self.count += 1
        if name == "fsync":
            args = (os.readlink(f"/proc/self/fd/{args[0]}"),)
        self.log.append((name, *map(str, args[:2])))
        if self.count == self.at:
            if name == "save_file":
                self._torn(args[0])
            raise Killed(f"killed at operation {self.count}: {name} {args[:2]}")

    def _wrap(self, name, real):
        def operation(*args, **kwargs):
            self._tick(name, *args)
            result = real(*args, **kwargs)
            if self.at is not None and name == "replace" and str(args[1]).endswith(
                    checkpoint.PARTIAL_SUFFIX + os.sep + checkpoint.TRAIN_STATE_FILE):
                self.committed.add(self.step)  # the new checkpoint is complete from here on
            return result
        return operation

    def run(self, at, function, *args, step=None):
        """``function(*args)``, killed at its ``at``-th file operation (``None``: not killed);
        return the number of operations it made, or ``None`` if it was killed."""
        self.at, self.count, self.step, self.log = at if at is not None else 10**9, 0, step, []
        try:
            function(*args)
        except Killed:
            return None
        finally:
            self.at = None
        return self.count


@functools.cache
def _model(step):
    torch.manual_seed(step)  # each step's weights differ
    return tc.Transfusion(tiny_config(dim=8, n_layers=1, n_heads=2, n_kv_heads=2, num_timesteps=10))


def _check_newest(path, step):
    """PATH is recovered to the checkpoint of ``step``, whole: it loads and holds that step's weights."""
    assert checkpoint.recover_training_checkpoint(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert checkpoint.read_train_state(path)["step"] == step
    model = _model(step)
    weights, optimizer = checkpoint.read_training_tensors(path, tc.Transfusion, model.config, [])
    assert all(torch.equal(weights[name], t) for name, t in model.state_dict().items())
    assert float(optimizer["state"]["norm.weight"]["step"]) == step


def _killed_runs(tmp_path, monkeypatch):
    """A kill switch, a step-1 checkpoint to copy, and how many file operations saving step 2 makes."""
    switch = KillSwitch(monkeypatch)
    template = tmp_path / "template"
    _write(template / "checkpoint", _model(1), 1)
    shutil.copytree(template, tmp_path / "count")
    operations = switch.run(None, _write, tmp_path / "count" / "checkpoint", _model(2), 2)
    assert operations > 20
    return switch, template, operations


def test_a_kill_at_any_point_of_the_swap_then_resume_finds_the_newest_checkpoint(tmp_path, monkeypatch):
    """Step 1 is on disk; saving step 2 is killed before its n-th file operation, for every n. The
    recovery --resume does first puts the newest complete checkpoint back in place (2 once its
    train_state.json was in place, else 1), and the next save then works."""
    switch, template, operations = _killed_runs(tmp_path, monkeypatch)
    found = set()
    for n in range(1, operations + 1):
        work = tmp_path / f"run-{n}"
        shutil.copytree(template, work)
        switch.committed = {1}
        assert switch.run(n, _write, work / "checkpoint", _model(2), 2, step=2) is None
        _check_newest(work / "checkpoint", max(switch.committed))
        found.add(max(switch.committed))
        _write(work / "checkpoint", _model(3), 3)
        _check_newest(work / "checkpoint", 3)
        shutil.rmtree(work)
    assert found == {1, 2}


def test_two_kills_in_a_row_at_every_pair_of_points_keep_the_newest_checkpoint(tmp_path, monkeypatch):
    """Saving step 2 killed at operation n, then saving step 3 killed at operation m (with no
    recovery between: the save finishes the interrupted swap itself), for every n and m: the
    recovery then finds the newest complete checkpoint. In particular, killed between the two
    renames, the next save must not delete PATH.previous while no PATH exists."""
    switch, template, operations = _killed_runs(tmp_path, monkeypatch)
    runs = 0
    for n in range(1, operations + 1):
        for m in itertools.count(1):  # until the save of step 3 runs to its end
            work = tmp_path / f"run-{n}-{m}"
            shutil.copytree(template, work)
            path = work / "checkpoint"
            switch.committed = {1}
            assert switch.run(n, _write, path, _model(2), 2, step=2) is None
            finished = switch.run(m, _write, path, _model(3), 3, step=3) is not None
            _check_newest(path, max(switch.committed))
            shutil.rmtree(work)
            runs += 1
            if finished:
                assert max(switch.committed) == 3
                break
    assert runs > operations * operations


def test_kills_during_recovery_itself(tmp_path, monkeypatch):
    """Saving step 2 killed at operation n, then the recovery killed at its operation r, for every
    n and r: a second recovery still finds the newest complete checkpoint."""
    switch, template, operations = _killed_runs(tmp_path, monkeypatch)
    for n in range(1, operations + 1):
        work = tmp_path / f"run-{n}"
        shutil.copytree(template, work)
        switch.committed = {1}
        switch.run(n, _write, work / "checkpoint", _model(2), 2, step=2)
        for r in itertools.count(1):
            trial = tmp_path / f"trial-{n}-{r}"
            shutil.copytree(work, trial)
            finished = switch.run(r, checkpoint.recover_training_checkpoint, trial / "checkpoint") is not None
            _check_newest(trial / "checkpoint", max(switch.committed))
            shutil.rmtree(trial)
            if finished:
                break
        shutil.rmtree(work)


def test_every_file_and_directory_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    switch = KillSwitch(monkeypatch)
    path = tmp_path / "checkpoint"
    _write(path, _model(1), 1)
    switch.run(None, _write, path, _model(2), 2)
    log = switch.log
    partial, previous, parent = (str(path) + checkpoint.PARTIAL_SUFFIX, str(path) + checkpoint.PREVIOUS_SUFFIX,
                                 str(tmp_path))

    def index(*entry):
        return log.index(entry)

    for k, (name, *args) in enumerate(log):
        if name == "replace":  # a file put in place: its data was synced, then its directory is
            source, target = args
            assert ("fsync", source) in log[:k], source
            assert ("fsync", os.path.dirname(target)) in log[k:], target
    swap_in, keep_aside = index("rename", partial, str(path)), index("rename", str(path), previous)
    last_file = max(k for k, entry in enumerate(log) if entry[0] == "replace" and entry[2].startswith(partial))
    assert last_file < keep_aside < swap_in
    assert ("fsync", partial) in log[last_file:keep_aside]  # the new directory's entries are on disk
    assert ("fsync", parent) in log[last_file:keep_aside] and ("fsync", parent) in log[keep_aside + 1:swap_in]
    assert ("fsync", parent) in log[swap_in:]
    assert log.index(("unlink", "optimizer.safetensors")) > swap_in  # the old one goes only once the new is in


def test_check_resume_compares_the_run_with_the_checkpoint(tmp_path):
    """The run's identity options, codec, data, length, optimizer groups and model config, each named when it
    differs; options outside the identity may change."""
    config = tiny_config()
    tc.Transfusion(config).save(tmp_path)
    groups = [{"params": ["norm.weight"], "lr": 0.1, "betas": [0.9, 0.95]}]
    state = {"step": 3, "args": {"lr": 0.1, "seed": 0, "out": "a"}, "codec": {"kind": "pixels"},
             "data": {"data": None}, "param_groups": groups, "world_size": 1}
    run = dict(options={"lr": 0.1, "seed": 0, "out": "b", "data": "x.jsonl"}, identity=("lr", "seed"), codec={"kind": "pixels"},
               data={"data": None}, param_groups=[groups[0] | {"lr": 0.02}], steps=3, config=config)
    checkpoint.check_resume(tmp_path, state, **run)
    cases = [
        (dict(options=run["options"] | {"seed": 1}), r"was trained with other options \(--seed: checkpoint 0, now 1\)"),
        (dict(identity=("lr", "seed", "dim")), r"train_state.json: args: missing options \['dim'\]"),
        (dict(codec={"kind": "vae"}), r"was trained with codec \{'kind': 'pixels'\}, now \{'kind': 'vae'\}"),
        (dict(data={"data": {"bytes": 5, "sha256": "ab"}}), r"the data changed since .*: --data x.jsonl \(checkpoint None, now 5 bytes, sha256 ab\)"),
        (dict(steps=2), r"train_state.json: step: expected at most --steps=2, got 3"),
        (dict(param_groups=[groups[0] | {"betas": [0.9, 0.99]}]), r"param_groups\[0\].betas: expected \[0.9, 0.99\]"),
        (dict(config=tiny_config(norm_eps=1e-3)), r"config.json: not the run's model \(norm_eps: checkpoint 1e-05, run 0.001\)"),
    ]
    for change, message in cases:
        with pytest.raises(CheckpointError, match=message):
            checkpoint.check_resume(tmp_path, state, **(run | change))
