"""A checkpoint is data from outside: every field of a real format-3 file, replaced by values of other types and
shapes, is refused by the one validation with one line naming the file and the field, never a traceback; and
the classes of damage that used to get through (RNG states of the right keys and the wrong content, a per-
parameter `step` of another shape, counters past int64, a tensor claiming more memory than exists)."""

from __future__ import annotations

import collections
import copy
import random
import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import DATA
from torch import nn

from brain_trainer import checkpointing as ck
from brain_trainer.trainer import TrainState

JUNK = {
    "None": None,
    "a string": "junk",
    "a list": [1, "two", None],
    "a huge int": 2**70,
    "NaN": float("nan"),
    "a tensor": torch.zeros(3, 5),
    "a nested dict": {"a": {"b": [None, "x", float("inf")]}, 7: "seven"},
}
OPTIONAL = {  # fields that may be None (a weights-only file's, or absent)
    "best_val",
    "val_loss",
    "config",
    "data_state",
    "rng_state",
    "tokenizer",
    "run",
    "data",
    "versions",
    "created",
    "optimizer_state_dict",
    "scaler_state_dict",
}
NUMBERS = {"best_val", "val_loss", "epoch_loss_sum"}  # any finite number, a huge int included, is one


def a_format_3_checkpoint() -> dict:
    """What the trainer writes after a few AdamW steps: every field of format 3, a scratch tokenizer included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
    old = torch.load(DATA / "main_c80bc36_step11.pt", weights_only=True)
    state = TrainState(epoch=2, samples_seen=16, global_step=11, best_val=0.75, val_loss=0.8)
    return ck.make_checkpoint(
        model=model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=True),
        train_state=state.state_dict(),
        config=old["config"],
        tokenizer=old["tokenizer"],
        rng_states=[ck.capture_rng_state(), ck.capture_rng_state()],
        run={"id": "a", "parent": None, "started_ns": 1, "threads": 2, "trackers": {"mlflow": "0f3a", "wandb": "x7"}},
        fingerprint={"samples": 70, "sha256": "0" * 64},
        data={"root_dir": "/data", "annotations": "token", "val_fraction": 0.1, "test_fraction": None},
    )


def refusal(checkpoint: dict, tmp_path: Path) -> str:
    """The one line `--resume` (and every command reading a checkpoint) says about `checkpoint`."""
    path = tmp_path / "damaged.pt"
    torch.save(checkpoint, path)
    with pytest.raises(ck.CheckpointError) as refused:
        ck.load_for_resume(str(path))
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"{path}: ")
    return line


def test_the_real_checkpoint_passes(tmp_path):
    path = tmp_path / "good.pt"
    torch.save(fresh(), path)
    assert ck.load_for_resume(str(path))["global_step"] == 11


@pytest.mark.parametrize("junk", [["id"], {"mlflow": 7}, {"mlflow": {"nested": "x"}}, "0f3a"])
def test_tracker_run_ids_that_are_not_strings_by_tracker_are_refused(tmp_path, junk):
    checkpoint = fresh()
    checkpoint["run"]["trackers"] = junk
    assert "run.trackers" in refusal(checkpoint, tmp_path)


REAL = a_format_3_checkpoint()
FIELDS = sorted(REAL)


def is_valid(field: str, junk: str) -> bool:
    """The junk that is a value of the field's own kind: None where the format allows it, a huge int for a
    float, any string for the time it was written (only printed)."""
    return (
        junk == "None"
        and field in OPTIONAL | {"format_version"}  # a missing format_version reads as format 2
        or junk == "a huge int"
        and field in NUMBERS
        or junk == "a string"
        and field == "created"
    )


def fresh() -> dict:
    return copy.deepcopy(REAL)


@pytest.mark.parametrize(
    "field, junk", [(field, junk) for field in FIELDS for junk in JUNK if not is_valid(field, junk)]
)
def test_every_field_replaced_by_junk_is_refused_in_one_line_naming_it(tmp_path, field, junk):
    checkpoint = fresh()
    checkpoint[field] = JUNK[junk]
    line = refusal(checkpoint, tmp_path)
    assert f"field '{field}" in line or field == "format_version" and "was written by a newer brain-trainer" in line


@pytest.mark.parametrize(
    "field, junk",
    [
        (field, junk)
        for field in sorted(REAL["data_state"])
        for junk in ("a string", "a huge int", "NaN", "a tensor", "a nested dict")
        if not is_valid(field, junk)
    ],
)
def test_every_data_state_field_replaced_by_junk_is_refused(tmp_path, field, junk):
    checkpoint = fresh()
    checkpoint["data_state"][field] = JUNK[junk]
    assert f"field 'data_state.{field}" in refusal(checkpoint, tmp_path)


def test_a_python_random_state_of_another_version_is_refused(tmp_path):
    checkpoint = fresh()
    checkpoint["rng_state"][1]["python"]["version"] = 7
    assert "field 'rng_state[1].python'" in refusal(checkpoint, tmp_path)


def test_a_torch_generator_state_of_another_size_is_refused(tmp_path):
    checkpoint = fresh()
    checkpoint["rng_state"][0]["torch"] = torch.zeros(100, dtype=torch.uint8)
    assert "field 'rng_state[0].torch'" in refusal(checkpoint, tmp_path)


@pytest.mark.parametrize(
    "change", [{"bit_generator": "PCG64"}, {"pos": 10**6}, {"state": torch.zeros(3, dtype=torch.int64)}]
)
def test_a_numpy_state_that_is_not_mt19937_is_refused(tmp_path, change):
    checkpoint = fresh()
    checkpoint["rng_state"][0]["numpy"].update(change)
    assert "field 'rng_state[0].numpy'" in refusal(checkpoint, tmp_path)


def test_a_per_parameter_step_of_another_shape_is_refused(tmp_path):
    checkpoint = fresh()
    state = checkpoint["optimizer_state_dict"]["state"][0]
    state["step"] = torch.ones_like(state["exp_avg"])
    assert "field 'optimizer_state_dict.state[0].step' is a torch.float32 tensor of shape (8, 4)" in refusal(
        checkpoint, tmp_path
    )


def test_moments_of_different_shapes_are_refused(tmp_path):
    checkpoint = fresh()
    checkpoint["optimizer_state_dict"]["state"][2]["exp_avg_sq"] = torch.zeros(2, 2)
    assert "field 'optimizer_state_dict.state[2]'" in refusal(checkpoint, tmp_path)


@pytest.mark.parametrize("field", ["global_step", "epoch"])
def test_a_counter_past_int64_is_refused(tmp_path, field):
    checkpoint = fresh()
    checkpoint[field] = 2**63
    assert f"field '{field}' is 9223372036854775808 (expected an integer <= 2**62, within int64)" in refusal(
        checkpoint, tmp_path
    )


class View:
    """Pickles as a view of `tensor`'s storage with another declared shape and stride, as a damaged or
    hostile file can hold one."""

    def __init__(self, tensor: torch.Tensor, size: tuple, stride: tuple):
        self.tensor, self.size, self.stride = tensor, size, stride

    def __reduce_ex__(self, protocol):
        storage = torch.storage.TypedStorage(
            wrap_storage=self.tensor.untyped_storage(), dtype=self.tensor.dtype, _internal=True
        )
        return torch._utils._rebuild_tensor_v2, (storage, 0, self.size, self.stride, False, collections.OrderedDict())


@pytest.mark.parametrize("size, stride", [((2**20, 2**20), (0, 0)), ((2**40,), (1,))])
def test_a_tensor_claiming_more_memory_than_the_file_holds_is_refused_before_it_is_allocated(tmp_path, size, stride):
    checkpoint = fresh()
    checkpoint["model_state_dict"]["0.weight"] = View(torch.ones(4), size, stride)
    path = tmp_path / "huge.pt"
    torch.save(checkpoint, path)
    for load in (ck.load_for_resume, ck.load_checkpoint):
        with pytest.raises(ck.CheckpointError, match=re.escape(f"tensor 'model_state_dict.0.weight' of shape {size}")):
            load(str(path))


def test_a_damaged_tokenizer_is_refused(tmp_path):
    checkpoint = fresh()
    checkpoint["tokenizer"] = checkpoint["tokenizer"][:-40]
    assert "field 'tokenizer'" in refusal(checkpoint, tmp_path)


def test_the_fuzz_never_ends_in_anything_but_the_one_line(tmp_path):
    """Random junk at random depths of random fields: a refusal or a pass, never another exception."""
    chooser = random.Random(27)
    for _ in range(40):
        checkpoint = fresh()
        field = chooser.choice(FIELDS)
        target = checkpoint[field]
        junk = JUNK[chooser.choice(list(JUNK))]
        if isinstance(target, dict) and target:
            target[chooser.choice(list(target))] = junk
        elif isinstance(target, list) and target and isinstance(target[0], dict):
            target[0][chooser.choice(list(target[0]))] = junk
        else:
            checkpoint[field] = junk
        path = tmp_path / "fuzzed.pt"
        torch.save(checkpoint, path)
        try:
            ck.load_for_resume(str(path))
        except ck.CheckpointError as error:
            assert "\n" not in str(error)


def test_a_storage_claiming_more_bytes_than_its_record_is_refused_before_it_is_allocated(tmp_path):
    checkpoint = fresh()
    checkpoint["model_state_dict"]["0.weight"] = torch.ones(123457)  # a number its pickle holds once, as the numel
    plain = tmp_path / "plain.pt"
    torch.save(checkpoint, plain)
    with zipfile.ZipFile(plain) as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    name = next(name for name in records if name.endswith("data.pkl"))
    numel = b"J" + struct.pack("<i", 123457)  # BININT: the storage's element count, before the tensor's shape
    records[name] = records[name].replace(numel, b"\x8a\x06" + (2**40).to_bytes(6, "little"), 1)  # LONG1
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(damaged, "w", zipfile.ZIP_STORED) as archive:
        for entry, data in records.items():
            archive.writestr(entry, data)
    with pytest.raises(ck.CheckpointError, match=r"storage \S+ claims 4398046511104 bytes, its record holds 493828"):
        ck.load_checkpoint(str(damaged))
