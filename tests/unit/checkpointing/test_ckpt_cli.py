"""`brain-trainer ckpt inspect | convert` on real files: what inspect prints and its verdict (exit 2 for a file
--resume refuses), convert of legacy files, and every failure as one `Error:` line with exit 2."""

from __future__ import annotations

import argparse

import pytest
import torch
from checkpoint_helpers import a_full_checkpoint, assert_bitwise_equal, broken_sources, restore, small_model

from brain_trainer.checkpointing import LAST, CheckpointError, load_checkpoint, save_checkpoint
from brain_trainer.checkpointing.cli import main


def test_inspect_prints_format_epoch_step_and_config_and_accepts_a_good_file(tmp_path, capsys):
    path = str(tmp_path / LAST)
    save_checkpoint(a_full_checkpoint(), path)
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    for expected in (
        f"file:       {path}",
        "format:     3",
        "epoch:      4 (last completed; next 5, sample 0)",
        "step:       123",
        "best_val:   0.75",
        "precision:  fp16",
        "processes:  1",
        "  d_shared: 8",
        "tensors:",
    ):
        assert any(line.startswith(expected) for line in out.splitlines()), expected
    assert out.splitlines()[-1] == "verdict:    --resume accepts it"


def test_inspect_of_a_weights_only_file_says_what_resuming_it_means(tmp_path, capsys):
    torch.save(small_model().state_dict(), tmp_path / "weights.pt")
    assert main(["inspect", str(tmp_path / "weights.pt")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "format:     legacy (model weights only)" in out
    assert out[-1] == "verdict:    --resume accepts it (weights only: a fresh optimizer, epoch 0)"


def nan_weights(checkpoint: dict) -> None:
    checkpoint["model_state_dict"]["0.weight"][0, 0] = float("nan")


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda checkpoint: checkpoint.update(epoch=-5), "field 'epoch' is -5 (expected an integer >= -1)"),
        (nan_weights, "1 weight tensors hold NaN or inf (e.g. 0.weight)"),
        (lambda checkpoint: checkpoint.update(format_version=99), "format 99 was written by a newer brain-trainer"),
    ],
    ids=["epoch_-5", "nan_weights", "format_99"],
)
def test_inspect_prints_the_refusal_of_a_file_resume_refuses_and_exits_2(tmp_path, capsys, damage, reason):
    checkpoint = a_full_checkpoint()
    damage(checkpoint)
    path = str(tmp_path / "damaged.pt")
    save_checkpoint(checkpoint, path)
    assert main(["inspect", path]) == 2
    captured = capsys.readouterr()
    verdict = captured.out.splitlines()[-1]
    assert verdict.startswith("verdict:    --resume refuses it: ") and reason in verdict and path not in verdict
    assert captured.err == ""


def test_inspect_of_a_file_that_does_not_load_is_one_error_line(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["inspect", str(tmp_path / "bad.pt")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1 and captured.err.startswith("Error: ")


def test_convert_wraps_a_legacy_file_that_then_resumes_as_the_current_format(tmp_path, capsys):
    weights = {f"module.{k}": v for k, v in small_model().state_dict().items()}
    torch.save(weights, tmp_path / "old.pt")
    assert main(["convert", str(tmp_path / "old.pt"), str(tmp_path / "new.pt")]) == 0
    converted = torch.load(tmp_path / "new.pt", weights_only=True)
    assert converted["format_version"] == 3 and converted["epoch"] == -1 and "0.weight" in converted["model_state_dict"]
    assert converted["converted_from"] == str(tmp_path / "old.pt")
    target = small_model(3)
    lines, point = restore(converted, target)
    assert "✓ New format checkpoint with full training state" in lines and point.epoch == 0
    assert_bitwise_equal(target.state_dict(), small_model().state_dict())
    before = (tmp_path / "new.pt").read_bytes()
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "old.pt"), str(tmp_path / "new.pt")]) == 2  # never overwrites
    assert "new.pt: already exists" in capsys.readouterr().err
    assert (tmp_path / "new.pt").read_bytes() == before


def test_convert_refuses_a_full_checkpoint_rather_than_dropping_its_state(tmp_path, capsys):
    save_checkpoint(a_full_checkpoint(), str(tmp_path / "full.pt"))
    assert main(["convert", str(tmp_path / "full.pt"), str(tmp_path / "out.pt")]) == 2
    assert "is already a full training checkpoint" in capsys.readouterr().err and not (tmp_path / "out.pt").exists()


def test_convert_trust_unpickles_a_file_safe_loading_refuses(tmp_path, capsys):
    weights = small_model().state_dict()
    torch.save({"state_dict": weights, "args": argparse.Namespace(lr=1)}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="refused: loading it would need unsafe unpickling"):
        load_checkpoint(str(tmp_path / "old.pt"))
    assert main(["convert", "--trust", str(tmp_path / "old.pt"), str(tmp_path / "new.pt")]) == 0
    assert capsys.readouterr().out.startswith(f"⚠ Loading {tmp_path / 'old.pt'} with full unpickling (--trust)")
    assert_bitwise_equal(load_checkpoint(str(tmp_path / "new.pt"))["model_state_dict"], weights)


@pytest.mark.parametrize("kind", ["missing", "truncated", "random", "folder"])
def test_convert_trust_of_a_file_that_cannot_be_loaded_is_one_error_line(tmp_path, capsys, kind):
    source = broken_sources(tmp_path)[kind]
    assert main(["convert", "--trust", str(source), str(tmp_path / "new.pt")]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert len(err.splitlines()) == 1 and str(source) in err and err.startswith("Error: "), err
    if kind == "missing":
        assert err.startswith(f"Error: Checkpoint file not found: {source}") and "unpickling" not in captured.out
    assert "Traceback" not in err and not (tmp_path / "new.pt").exists()
