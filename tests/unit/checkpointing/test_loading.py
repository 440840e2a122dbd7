"""Loading with weights_only=True from real files: every refusal in one line naming the file, the startup
checks a file passes before a run resumes from it, and files written by earlier and current code."""

from __future__ import annotations

import os
import pickle
import re

import pytest
import torch
from checkpoint_helpers import DATA, a_full_checkpoint, assert_bitwise_equal, small_model

from brain_trainer import checkpointing as ck
from brain_trainer.trainer import TrainState


def test_a_missing_file_says_not_found_with_the_ls_hint(tmp_path):
    with pytest.raises(
        ck.CheckpointError, match=r"^Checkpoint file not found: .*nope.pt \(check the path: ls -lh .*nope.pt\)$"
    ):
        ck.load_checkpoint(str(tmp_path / "nope.pt"))


def test_a_folder_passed_as_a_file_is_named(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ck.CheckpointError, match=r"ckpt: is a folder; pass a checkpoint file$"):
        ck.load_checkpoint(str(tmp_path / "ckpt"))


@pytest.mark.parametrize(
    "content, message", [(b"", "empty file (0 bytes)"), (b"hello, not a checkpoint", "not a PyTorch checkpoint")]
)
def test_empty_and_foreign_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ck.CheckpointError) as refusal:
        ck.load_checkpoint(str(path))
    assert str(refusal.value).startswith(f"{path}: ") and message in str(refusal.value)


def test_a_truncated_file_is_named(tmp_path):
    path = tmp_path / ck.LAST
    ck.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ck.CheckpointError, match="last_brain_v2.pt: truncated or not a PyTorch checkpoint"):
        ck.load_checkpoint(str(path))


def test_a_link_the_user_made_is_read_through_and_a_dangling_one_is_not_found(tmp_path):
    ck.save_checkpoint({"global_step": 4}, str(tmp_path / ck.LAST))
    (tmp_path / "latest.pt").symlink_to(tmp_path / ck.LAST)
    assert ck.load_checkpoint(str(tmp_path / "latest.pt"))["global_step"] == 4
    (tmp_path / "gone.pt").symlink_to(tmp_path / "nothing.pt")
    with pytest.raises(ck.CheckpointError, match="Checkpoint file not found"):
        ck.load_checkpoint(str(tmp_path / "gone.pt"))


class Malicious:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": Malicious(marker), "epoch": 1}, path)
    with pytest.raises(
        ck.CheckpointError,
        match=r"refused: loading it would need unsafe unpickling of .*system.*"
        r"which can run any code; do not load it",
    ):
        ck.load_checkpoint(str(path))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    os.link(path, folder / ck.LAST)  # --resume auto meets it as last_brain_v2.pt
    found = ck.find_latest_checkpoint(ck.LocalStorage(str(folder)), log=lambda line: None)
    assert found.location is None and [name for name, _ in found.unreadable] == [ck.LAST]
    assert "unsafe unpickling" in found.unreadable[0][1]
    assert not marker.exists()


def test_a_plain_pickle_is_refused_without_inviting_unsafe_loading(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    with pytest.raises(ck.CheckpointError) as refusal:
        ck.load_checkpoint(str(path))
    assert "not a PyTorch checkpoint that loads safely" in str(refusal.value)
    assert "weights_only=False" not in str(refusal.value) and "--trust" not in str(refusal.value)


def test_a_file_holding_something_else_than_a_dict_is_named(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(ck.CheckpointError, match=r"list.pt: holds a list, not a checkpoint dict or state_dict"):
        ck.load_checkpoint(str(tmp_path / "list.pt"))


# ----------------------------------------------------------------------------- startup checks


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epoch", -5, "field 'epoch' is -5 (expected an integer >= -1)"),
        ("epoch", "3", "field 'epoch' is '3' (expected an integer >= -1)"),
        ("epoch", True, "field 'epoch' is True (expected an integer >= -1)"),
        ("global_step", "ten", "field 'global_step' is 'ten' (expected an integer >= 0)"),
        ("global_step", -1, "field 'global_step' is -1 (expected an integer >= 0)"),
        ("data_state", {"samples_seen": 0}, "field 'data_state.epoch' is None (expected an integer >= 0)"),
        ("data_state", [1], "field 'data_state' is [1] (expected a dict)"),
        ("rng_state", [{"torch": 1}], "field 'rng_state[0]' is 'dict'"),
        ("rng_state", "seed", "field 'rng_state' is 'str'"),
        ("best_val", float("nan"), "field 'best_val' is nan (expected a finite number or None)"),
        ("val_loss", float("inf"), "field 'val_loss' is inf (expected a finite number or None)"),
        ("config", ["lr"], "field 'config' is ['lr'] (expected a dict)"),
        ("tokenizer", 7, "field 'tokenizer' is 'int'"),
        ("format_version", 99, "format 99 was written by a newer brain-trainer"),
    ],
)
def test_a_damaged_field_is_one_line_naming_the_file_and_the_field(tmp_path, field, value, message):
    checkpoint = a_full_checkpoint()
    checkpoint[field] = value
    path = str(tmp_path / "damaged.pt")
    ck.save_checkpoint(checkpoint, path)
    with pytest.raises(ck.CheckpointError) as refusal:
        ck.load_for_resume(path)
    assert str(refusal.value).startswith(f"{path}: ") and message in str(refusal.value)
    assert "\n" not in str(refusal.value)


def test_weights_holding_nan_are_refused_unless_asked_for(tmp_path):
    model = small_model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    path = str(tmp_path / "nan.pt")
    ck.save_checkpoint({"model_state_dict": model.state_dict(), "epoch": 0}, path)
    with pytest.raises(ck.CheckpointError, match=r"1 weight tensors hold NaN or inf \(e.g. 0.weight\)"):
        ck.load_for_resume(path)
    assert torch.isnan(ck.load_for_resume(path, allow_nonfinite=True)["model_state_dict"]["0.weight"]).any()


# ----------------------------------------------------------------------------- files that must resume


def test_a_checkpoint_written_by_the_current_code_passes_the_startup_checks_bit_for_bit(tmp_path):
    checkpoint = a_full_checkpoint(epoch=2, global_step=30, samples_seen=16)
    path = str(tmp_path / ck.LAST)
    ck.save_checkpoint(checkpoint, path)
    loaded = ck.load_for_resume(path)
    assert_bitwise_equal(loaded["model_state_dict"], checkpoint["model_state_dict"])
    assert_bitwise_equal(loaded["optimizer_state_dict"], checkpoint["optimizer_state_dict"])
    assert_bitwise_equal(loaded["rng_state"], checkpoint["rng_state"])
    state = TrainState()
    state.load_state_dict(ck.train_state_of(loaded))
    assert (state.epoch, state.samples_seen, state.global_step, state.best_val) == (3, 16, 30, 0.75)


def test_the_format_2_file_of_commit_c80bc36_still_loads_for_resume():
    path = str(DATA / "main_c80bc36_step11.pt")
    checkpoint = ck.load_for_resume(path)
    assert checkpoint["format_version"] == 2 and ck.is_full_checkpoint(checkpoint)
    state = TrainState()
    state.load_state_dict(ck.train_state_of(checkpoint))
    assert (state.epoch, state.samples_seen, state.global_step) == (1, 24, 11)
    assert len(ck.rng_states_of(checkpoint)) == 1
    assert len(ck.model_weights(checkpoint, path)) == len(checkpoint["model_state_dict"])


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "data_state",
            {"epoch": 1, "samples_seen": 0, "epoch_loss_sum": "x"},
            "field 'data_state.epoch_loss_sum' is 'x'",
        ),
        (
            "data_state",
            {"epoch": 1, "samples_seen": 0, "skipped_images": "x"},
            "field 'data_state.skipped_images' is 'x'",
        ),
        (
            "rng_state",
            [{"torch": torch.zeros(3, dtype=torch.uint8), "cuda": [], "python": {}, "numpy": {}}],
            "field 'rng_state[0]' is 'dict' (expected a dict of python, numpy, torch and cuda states with their keys)",
        ),
        ("run", "abc", "field 'run' is 'abc' (expected a dict)"),
        ("format_version", "3", "field 'format_version' is '3' (expected an integer)"),
    ],
)
def test_every_damaged_field_is_refused_before_anything_is_claimed(tmp_path, field, value, message):
    checkpoint = a_full_checkpoint()
    checkpoint[field] = value
    path = str(tmp_path / "damaged.pt")
    ck.save_checkpoint(checkpoint, path)
    with pytest.raises(ck.CheckpointError, match=re.escape(message)):
        ck.load_for_resume(path)


def test_trust_is_offered_only_for_globals_known_to_build_plain_values(tmp_path):
    import argparse

    path = tmp_path / "namespace.pt"
    torch.save({"model_state_dict": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(
        ck.CheckpointError,
        match=r"argparse.Namespace; if you trust where the file comes from, "
        r"`brain-trainer ckpt convert --trust",
    ):
        ck.load_checkpoint(str(path))
    evil = tmp_path / "evil.pt"
    torch.save({"model_state_dict": Malicious(tmp_path / "pwned"), "epoch": 1}, evil)
    with pytest.raises(ck.CheckpointError) as refusal:
        ck.load_checkpoint(str(evil))
    assert "which can run any code; do not load it" in str(refusal.value) and "--trust" not in str(refusal.value)
