"""What the program prints: the resume command, silence on processes other than the main one, the epoch line."""

from __future__ import annotations

from pathlib import Path

import torch

from brain_trainer.run_log import RunLog, resume_command
from brain_trainer.tracking import TrackedRun


def test_the_resume_command_is_the_command_as_given_with_the_checkpoint():
    argv = ("--root_dir", "data", "--resume", "auto", "--lr", "1e-3", "--resume=old.pt")
    assert resume_command(argv, Path("ckpt/last_brain_v2.pt")) == (
        "python train_multimodal_brain_flickr8k.py --root_dir data --lr 1e-3 --resume ckpt/last_brain_v2.pt"
    )


def test_a_silent_log_prints_nothing_and_opens_no_event_file(tmp_path, capsys):
    log = RunLog(enabled=False)
    log.print("hello")
    log.error("Error: x")
    log.banner(
        train_samples=1,
        val_samples=1,
        device=torch.device("cpu"),
        precision="fp32",
        batch_size=2,
        per_process=1,
        lr=1.0,
        start_epoch=0,
        epochs=1,
        world_size=2,
    )
    log.open_trackers(("tensorboard", "jsonl"), TrackedRun(str(tmp_path / "runs"), "ckpt", None, purge_step=0))
    log.scalars({"train/loss": 1.0}, 1, 0)
    log.close()
    captured = capsys.readouterr()
    assert captured.out == captured.err == "" and not (tmp_path / "runs").exists()


def test_an_epoch_without_a_step_says_so_instead_of_nan(capsys):
    metrics = {"loss": 1.0, **{f"{d}_R@{k}": 50.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}}
    RunLog().epoch_end(epoch=3, epochs=4, train_loss=None, metrics=metrics, improved=False, seconds=1)
    assert "Epoch 3/4: train loss n/a (no step this epoch), val loss 1.0000" in capsys.readouterr().out


def test_a_split_or_fold_too_small_for_recall_at_10_is_one_warning(capsys):
    log = RunLog()
    log.small_split("test", 5000, folds=5)  # COCO's 1K test: 1,000 images a fold
    log.small_split("val", 100)
    assert capsys.readouterr().out == ""
    log.small_split("test", 25, folds=5)
    log.small_split("val", 8)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("⚠ --folds 5: each fold of the test split has 5 images: text -> image R@k is 100")
    assert lines[1].startswith("⚠ The val split has 8 images")
