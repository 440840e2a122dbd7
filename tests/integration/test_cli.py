"""The program as a user runs it: flag validation, a tiny end-to-end run read back with TensorBoard's
EventAccumulator and torch.load(weights_only=True), and the resume rules. Runs the CLI's main() in-process, and
as a child process (the script, or a program in tests/workers/) where a test sends signals or needs its own."""

from __future__ import annotations

import collections
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    DATA,
    ROOT,
    SCRIPT,
    assert_bitwise_equal,
    events,
    finish,
    load,
    run_args,
    scalars,
    small_disk,
    start,
    wait_for_step,
)

from brain_trainer import train as cli
from brain_trainer.checkpointing import BEST, LAST, storage
from brain_trainer.checkpointing.storage import LocalStorage
from brain_trainer.config import DEMO_SETTINGS, TrainSettings
from brain_trainer.data import loaders as data
from brain_trainer.data.sample_data import write_sample_dataset
from brain_trainer.trainer import learning_rate

pytestmark = pytest.mark.slow

TRAIN_TAGS = {
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/samples_per_sec",
    "train/data_wait",
    "train/skipped_images",
}
VAL_TAGS = {f"val/{name}" for name in ("loss", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")}


def steps(accumulator, tag: str) -> list[int]:
    return [event.step for event in accumulator.Scalars(tag)]


WORKERS = ROOT / "tests" / "workers"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ----------------------------------------------------------------------------- validation: one line, status 2
# The checks of the options alone are fast tests in test_config.py; these need the data or the file system.

BAD_FLAGS = [
    (["--batch_size", "80"], "the train split has 70 samples, fewer than one batch (--batch_size 80)"),
    (["--resume", "/nowhere/last.pt"], "Checkpoint file not found: /nowhere/last.pt (check the path: ls -lh"),
    (["--eval_only", "--resume", "auto"], "--eval_only --resume auto: no checkpoint in"),
    (["--savedir", __file__], f"--savedir {__file__}: is a file; name a folder"),
    (["--savedir", f"{__file__}/ckpt"], f"--savedir {__file__}/ckpt: cannot be written"),
    (["--logdir", f"{__file__}/runs"], f"--logdir {__file__}/runs: cannot be written"),
    (
        ["--text_encoder", "no-such-org/no-such-model"],
        "--text_encoder no-such-org/no-such-model: its tokenizer could not be loaded",
    ),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f).replace(__file__, "FILE") for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_naming_it_with_status_2(sample_root, tmp_path, capsys, flags, message):
    status, _, err = run(capsys, *run_args(sample_root, tmp_path, *flags))
    assert status == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()


def test_a_bad_flag_given_to_the_script_is_one_line_on_stderr_with_status_2(sample_root, tmp_path):
    done = subprocess.run(
        [sys.executable, SCRIPT, *run_args(sample_root, tmp_path, "--lr", "-1")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("Error: --lr -1.0: must be a positive number") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()


def test_missing_root_dir_is_one_line_with_where_to_get_flickr8k(tmp_path, capsys):
    status, _, err = run(capsys, *run_args(tmp_path / "absent", tmp_path))
    assert (
        status == 2
        and err.startswith("Error: --root_dir")
        and "`brain-trainer sample-data " in err
        and err.count("\n") == 1
    )


def test_cuda_on_a_machine_without_it_names_the_fix(sample_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, err = run(capsys, *run_args(sample_root, tmp_path, "--device", "cuda", "--epochs", "1"))
    assert status == 2 and err == "Error: --device cuda: CUDA is not available on this machine; use --device cpu\n"


# ----------------------------------------------------------------------------- end to end


def test_one_tiny_epoch_writes_both_checkpoints_and_the_named_tensorboard_scalars(trained):
    tmp_path, out = trained, (trained / "out.txt").read_text()
    banner = [
        "Train samples: 70",
        "Val samples:   20",
        "Device: cpu",
        "Precision: fp32",
        "Batch size: 8",
        "Learning rate: 0.001",
        "Training epochs: 0 -> 1",
    ]
    lines = [line for line in out.splitlines() if not line.startswith("Threads: ")]  # the machine's, see test_threads
    start = lines.index(banner[0])
    assert lines[start : start + len(banner)] == banner
    assert re.search(r"^Threads: \d+ per process \(", out, re.M)
    assert re.search(r"^Epoch 0/1: train loss [\d.]+, val loss [\d.]+ \(best\), i2t R@1/5/10 ", out, re.M)

    last, best = load(tmp_path / "ckpt" / LAST), load(tmp_path / "ckpt" / BEST)
    assert last["epoch"] == best["epoch"] == 0 and last["global_step"] == 8  # 70 samples // 8 per batch
    assert last["data_state"]["epoch"] == 1 and last["data_state"]["samples_seen"] == 0
    assert last["best_val"] == last["val_loss"] and last["config"]["text_encoder"] == "scratch"
    assert isinstance(last["tokenizer"], str) and "scaler_state_dict" not in last

    accumulator = events(tmp_path / "runs")
    assert TRAIN_TAGS | VAL_TAGS <= set(accumulator.Tags()["scalars"])
    assert steps(accumulator, "train/loss") == list(range(1, 9))
    assert steps(accumulator, "val/loss") == [8]
    assert accumulator.Tags()["images"] == ["val/retrieval"]
    assert "config/text_summary" in accumulator.Tags()["tensors"]


def test_a_corrupt_image_is_warned_once_and_each_of_its_samples_is_counted(fresh_root, tmp_path, capsys):
    text = fresh_root / "Flickr8k_text"
    bad = fresh_root / "Flicker8k_Dataset" / (text / "Flickr_8k.trainImages.txt").read_text().split()[0]
    captions = sum(line.startswith(f"{bad.name}#") for line in (text / "Flickr8k.token.txt").read_text().splitlines())
    bad.write_bytes(b"not a jpeg at all")
    # 70 samples in batches of 10: the epoch trains every sample once, so each caption of the image is met once
    status, out, _ = run(
        capsys, *run_args(fresh_root, tmp_path, "--epochs", "1", "--batch_size", "10", "--no-cache_images")
    )
    assert status == 0
    assert out.count(f"⚠ Could not read image {bad.name}") == 1
    skipped = scalars(tmp_path / "runs", "train/skipped_images")
    assert captions >= 1 and skipped[-1] == (7, captions), "each sample of the unreadable image is counted once"


def test_eval_only_prints_the_retrieval_table_for_the_test_split(sample_root, trained, tmp_path, capsys):
    before = (tmp_path / "ckpt" / LAST).read_bytes()
    status, out, _ = run(
        capsys,
        *run_args(
            sample_root, tmp_path, "--eval_only", "--eval_split", "test", "--resume", str(tmp_path / "ckpt" / LAST)
        ),
    )
    assert status == 0
    assert re.search(r"^test loss [\d.]+$", out, re.M)
    assert re.search(r"^image -> text +[\d.]+ +[\d.]+ +[\d.]+ +\d+$", out, re.M)
    assert re.search(r"^text -> image +[\d.]+ +[\d.]+ +[\d.]+ +\d+$", out, re.M)
    assert (tmp_path / "ckpt" / LAST).read_bytes() == before


# ----------------------------------------------------------------------------- resume rules


def test_resume_with_only_epochs_keeps_the_checkpoints_settings(sample_root, tmp_path, capsys):
    first = run_args(sample_root, tmp_path, "--epochs", "1", "--batch_size", "10", "--lr", "3e-3", "--d_shared", "48")
    assert run(capsys, *first)[0] == 0
    status, out, _ = run(
        capsys,
        "--root_dir",
        str(sample_root),
        "--savedir",
        str(tmp_path / "ckpt"),
        "--logdir",
        str(tmp_path / "runs"),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--num_workers",
        "0",
        "--epochs",
        "2",
        "--resume",
        "auto",
    )
    assert status == 0
    assert "✓ Model state loaded (strict)" in out and "overridden on the command line: epochs 1 -> 2\n" in out
    assert "Batch size: 10" in out and "Learning rate: 0.003" in out and "Training epochs: 1 -> 2" in out
    config = load(tmp_path / "ckpt" / LAST)["config"]
    assert (config["batch_size"], config["lr"], config["d_shared"], config["epochs"]) == (10, 3e-3, 48, 2)


def test_resume_with_new_lr_sets_optimizer_lr(sample_root, trained, tmp_path, capsys):
    status, out, _ = run(capsys, *run_args(sample_root, tmp_path, "--epochs", "2", "--lr", "5e-4", "--resume", "auto"))
    assert status == 0 and "overridden on the command line: epochs 1 -> 2; lr 0.001 -> 0.0005" in out
    settings = TrainSettings(lr=5e-4, warmup_steps=2, epochs=2)
    logged = {e.step: e.value for e in events(tmp_path / "runs").Scalars("train/lr")}
    for step in range(9, 17):  # steps after the resume: lr of the new schedule, not the restored param groups
        assert logged[step] == pytest.approx(learning_rate(step - 1, settings, 16), rel=1e-6)
    last = load(tmp_path / "ckpt" / LAST)
    assert last["optimizer_state_dict"]["param_groups"][0]["lr"] == pytest.approx(
        learning_rate(15, settings, 16), rel=1e-6
    )


def test_resume_when_epochs_are_done_says_so_and_touches_nothing(sample_root, trained, tmp_path, capsys):
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    status, out, _ = run(capsys, *run_args(sample_root, tmp_path, "--resume", str(tmp_path / "ckpt" / LAST)))
    assert status == 0 and "Nothing left to train" in out and "✓ Starting from epoch 1" in out
    assert files == {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}


def test_resume_into_fp16_starts_a_fresh_scaler_with_a_warning(sample_root, trained, tmp_path, capsys):
    status, out, _ = run(
        capsys, *run_args(sample_root, tmp_path, "--epochs", "2", "--precision", "fp16", "--resume", "auto")
    )
    assert status == 0 and "⚠ Fresh GradScaler: the checkpoint was trained in fp32" in out
    assert "Precision: fp16" in out and "scaler_state_dict" in load(tmp_path / "ckpt" / LAST)
    status, out, _ = run(
        capsys, *run_args(sample_root, tmp_path, "--epochs", "3", "--precision", "bf16", "--resume", "auto")
    )
    assert status == 0 and "⚠ GradScaler state dropped: this run uses bf16" in out
    assert "scaler_state_dict" not in load(tmp_path / "ckpt" / LAST)


def test_best_survives_a_resume_and_a_worse_epoch_never_replaces_it(sample_root, trained, tmp_path, capsys):
    best_path = tmp_path / "ckpt" / BEST
    best = load(best_path)
    best["best_val"] = 1e-6  # a best no later epoch can beat
    torch.save(best, best_path)
    before = best_path.read_bytes()
    status, out, _ = run(capsys, *run_args(sample_root, tmp_path, "--epochs", "2", "--resume", str(best_path)))
    assert status == 0 and "✓ Best validation loss: 0.0000" in out
    assert best_path.read_bytes() == before
    assert load(tmp_path / "ckpt" / LAST)["best_val"] == 1e-6


def test_resuming_an_older_checkpoint_leaves_no_duplicate_tensorboard_steps(sample_root, tmp_path, capsys):
    assert run(capsys, *run_args(sample_root, tmp_path, "--epochs", "3", "--keep_last", "3"))[0] == 0
    older = tmp_path / "ckpt" / "epoch_000_brain_v2.pt"
    status, out, _ = run(capsys, *run_args(sample_root, tmp_path, "--epochs", "3", "--resume", str(older)))
    assert status == 0 and "Training epochs: 1 -> 3" in out
    accumulator = events(tmp_path / "runs")
    for tag in ("train/loss", "val/loss"):
        logged = steps(accumulator, tag)
        assert logged == sorted(set(logged)), f"{tag} has duplicate or out-of-order steps"
    assert steps(accumulator, "train/loss") == list(range(1, 25)) and steps(accumulator, "val/loss") == [8, 16, 24]


def test_resume_from_a_legacy_weights_file_starts_at_epoch_0_with_the_guides_lines(
    sample_root, trained, tmp_path, capsys
):
    weights = {f"module.{k}": v for k, v in load(tmp_path / "ckpt" / LAST)["model_state_dict"].items()}
    torch.save(weights, tmp_path / "legacy.pt")
    status, out, _ = run(
        capsys, *run_args(sample_root, tmp_path / "again", "--epochs", "1", "--resume", str(tmp_path / "legacy.pt"))
    )
    assert status == 0
    for line in (
        "✓ Old format checkpoint (model weights only)",
        "⚠ Optimizer state not in checkpoint (starting fresh)",
        "⚠ Epoch unknown (starting from epoch 0)",
        "Training epochs: 0 -> 1",
    ):
        assert line in out


# ----------------------------------------------------------------------------- options around the loop


def test_a_cache_that_cannot_be_built_falls_back_to_jpegs_and_records_it(sample_root, tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data, "build_image_cache", disk_full)
    status, out, _ = run(capsys, *run_args(sample_root, tmp_path, "--epochs", "1"))
    assert status == 0
    assert out.count("⚠ Image cache could not be built (No space left on device); decoding JPEGs instead") == 1
    assert load(tmp_path / "ckpt" / LAST)["config"]["cache_images"] is False
    status, out, _ = run(
        capsys,
        *run_args(
            sample_root, tmp_path / "eval", "--eval_only", "--cache_images", "--resume", str(tmp_path / "ckpt" / LAST)
        ),
    )
    assert status == 0 and out.count("⚠ Image cache could not be built") == 1 and "image -> text" in out


def test_a_local_torchvision_weights_file_initialises_the_image_trunk(sample_root, tmp_path, capsys):
    import torchvision

    torch.manual_seed(5)
    reference = torchvision.models.mobilenet_v3_small()
    torch.save(reference.state_dict(), tmp_path / "mobilenet.pth")
    status, out, _ = run(
        capsys,
        *run_args(
            sample_root,
            tmp_path,
            "--epochs",
            "1",
            "--lr",
            "1e-12",
            "--warmup_steps",
            "0",
            "--image_weights",
            str(tmp_path / "mobilenet.pth"),
        ),
    )
    assert (
        status == 0 and f"✓ Image weights from {tmp_path / 'mobilenet.pth'}: " in out and "(100% of the trunk)" in out
    )
    trained = load(tmp_path / "ckpt" / LAST)["model_state_dict"]
    first_conv = "image_encoder.trunk.features.0.0.weight"
    assert torch.allclose(trained[first_conv], reference.state_dict()["features.0.0.weight"], atol=1e-6)


def test_compiled_runs_save_plain_keys(sample_root, tmp_path, capsys, monkeypatch):
    # Inductor's C++ build takes minutes on 2 cores; dynamo's graph capture with the eager backend keeps the
    # wrapper (and its `_orig_mod.` names) while running in seconds.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="eager"))
    status, _, _ = run(capsys, *run_args(sample_root, tmp_path, "--epochs", "1", "--compile"))
    assert status == 0
    keys = list(load(tmp_path / "ckpt" / LAST)["model_state_dict"])
    assert "image_encoder.trunk.features.0.0.weight" in keys
    assert all("_orig_mod" not in key and not key.startswith("module.") for key in keys)


def test_a_checkpoint_written_by_the_single_process_main_still_resumes_and_trains(sample_root, tmp_path, capsys):
    old = DATA / "main_c80bc36_step11.pt"  # format 2, written by commit c80bc36, stopped by SIGTERM at step 11
    status, out, _ = run(
        capsys,
        "--root_dir",
        str(sample_root),
        "--savedir",
        str(tmp_path / "ckpt"),
        "--logdir",
        str(tmp_path / "runs"),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--num_workers",
        "0",
        "--epochs",
        "2",
        "--log_every",
        "1",
        "--resume",
        str(old),
    )
    assert status == 0, out
    for line in (
        "✓ New format checkpoint with full training state",
        "✓ Model state loaded (strict)",
        "✓ Optimizer state loaded",
        "✓ Starting from epoch 1, sample 24 (mid-epoch)",
        "✓ Global step restored to 11",
        "Training epochs: 1 -> 2",
    ):
        assert line in out
    resumed = load(tmp_path / "ckpt" / LAST)
    assert resumed["global_step"] == 16 and resumed["format_version"] == 3
    assert resumed["config"]["image_encoder"] == "shufflenet_v2_x0_5"


def test_an_empty_text_encoder_folder_is_one_line(sample_root, tmp_path, capsys):
    (tmp_path / "empty_model").mkdir()
    status, _, err = run(capsys, *run_args(sample_root, tmp_path, "--text_encoder", str(tmp_path / "empty_model")))
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"Error: --text_encoder {tmp_path / 'empty_model'}: its tokenizer could not be loaded")


# ----------------------------------------------------------------------------- nothing lost, ever


def files_of(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_fresh_run_never_replaces_another_runs_checkpoints_without_consent(sample_root, trained, capsys):
    before = files_of(trained / "ckpt")
    status, _, err = run(capsys, *run_args(sample_root, trained, "--epochs", "1"))
    assert status == 2 and err.count("\n") == 1
    assert f"--savedir {trained / 'ckpt'} already holds a run's checkpoints" in err and "newest at step 8" in err
    assert "--resume auto" in err and "--overwrite" in err
    assert files_of(trained / "ckpt") == before
    status, _, _ = run(capsys, *run_args(sample_root, trained, "--epochs", "1", "--overwrite", "--seed", "3"))
    assert status == 0 and load(trained / "ckpt" / LAST)["config"]["seed"] == 3


def test_a_resume_from_a_file_outside_the_folder_names_what_it_would_replace(sample_root, trained, tmp_path, capsys):
    (tmp_path / "other").mkdir()
    outside = tmp_path / "other" / "start.pt"
    outside.write_bytes((trained / "ckpt" / LAST).read_bytes())
    before = files_of(trained / "ckpt")
    status, _, err = run(capsys, *run_args(sample_root, trained, "--epochs", "2", "--resume", str(outside)))
    assert status == 2 and "holds another run's checkpoints (last_brain_v2.pt, best_brain_v2.pt)" in err
    assert files_of(trained / "ckpt") == before


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(sample_root, tmp_path, capsys):
    first = start(run_args(sample_root, tmp_path, "--epochs", "50"))
    try:
        wait_for_step(first, 1)
        status, _, err = run(capsys, *run_args(sample_root, tmp_path, "--epochs", "50", "--resume", "auto"))
        assert status == 2 and err.count("\n") == 1
        assert f"--savedir {tmp_path / 'ckpt'}: another run (PID {first.pid} on " in err
    finally:
        first.kill()
        first.communicate()


def test_a_checkpoint_of_nan_weights_is_refused_and_scores_no_hit_when_allowed(sample_root, trained, capsys):
    checkpoint = load(trained / "ckpt" / LAST)
    for value in checkpoint["model_state_dict"].values():
        if value.is_floating_point():
            value.fill_(float("nan"))
    torch.save(checkpoint, trained / "nan.pt")
    status, _, err = run(capsys, *run_args(sample_root, trained, "--eval_only", "--resume", str(trained / "nan.pt")))
    assert status == 2 and "weight tensors hold NaN or inf" in err and "--allow_nonfinite" in err
    status, out, _ = run(
        capsys, *run_args(sample_root, trained, "--eval_only", "--allow_nonfinite", "--resume", str(trained / "nan.pt"))
    )
    assert status == 0
    assert re.search(r"^image -> text +0\.0 +0\.0 +0\.0 +\d+$", out, re.M), "NaN scores are misses, never hits"


def test_a_damaged_checkpoint_field_is_one_line_at_startup(sample_root, trained, capsys):
    checkpoint = load(trained / "ckpt" / LAST)
    checkpoint["epoch"] = -5
    torch.save(checkpoint, trained / "ckpt" / LAST)
    status, _, err = run(capsys, *run_args(sample_root, trained, "--epochs", "2", "--resume", "auto"))
    assert status == 2
    assert err == (
        f"Error: {trained / 'ckpt' / LAST}: field 'epoch' is -5 (expected an integer >= -1); the file is "
        f"damaged: resume from another checkpoint\n"
    )


def test_a_position_beyond_the_epoch_is_refused_before_the_folder_is_claimed(sample_root, trained, capsys):
    checkpoint = load(trained / "ckpt" / LAST)
    checkpoint["data_state"]["samples_seen"] = 10**9
    torch.save(checkpoint, trained / "ckpt" / LAST)
    before = (trained / "ckpt" / LAST).read_bytes()
    status, out, err = run(capsys, *run_args(sample_root, trained, "--epochs", "2", "--resume", "auto"))
    assert status == 2 and err.count("\n") == 1 and "Train samples" not in out
    assert "field 'data_state.samples_seen' is 1000000000, beyond the epoch's 70 samples" in err
    assert (trained / "ckpt" / LAST).read_bytes() == before


@pytest.mark.parametrize(
    "split, lines, message",
    [
        ("devImages", "", "the val split has 0 images and 0 captions"),
        ("testImages", "", "the test split has 0 images and 0 captions"),
    ],
)
def test_a_split_too_small_to_evaluate_is_one_line_before_any_training(
    fresh_root, trained, capsys, split, lines, message
):
    (fresh_root / "Flickr8k_text" / f"Flickr_8k.{split}.txt").write_text(lines)
    extra = (
        ("--eval_only", "--eval_split", "test", "--resume", str(trained / "ckpt" / LAST))
        if split == "testImages"
        else ()
    )
    status, out, err = run(capsys, *run_args(fresh_root, trained / "again", "--epochs", "1", *extra))
    assert status == 2 and message in err and "Train samples" not in out


def test_a_val_split_of_one_caption_is_refused(fresh_root, tmp_path, capsys):
    token = fresh_root / "Flickr8k_text" / "Flickr8k.token.txt"
    val = (fresh_root / "Flickr8k_text" / "Flickr_8k.devImages.txt").read_text().split()
    (fresh_root / "Flickr8k_text" / "Flickr_8k.devImages.txt").write_text(val[0] + "\n")
    token.write_text(
        "".join(
            line + "\n"
            for line in token.read_text().splitlines()
            if not line.startswith(val[0]) or line.startswith(f"{val[0]}#0")
        )
    )
    status, _, err = run(capsys, *run_args(fresh_root, tmp_path, "--epochs", "1"))
    assert status == 2 and "the val split has 1 images and 1 captions" in err


def test_an_annotation_file_with_a_byte_that_is_not_utf8_is_one_line(fresh_root, tmp_path, capsys):
    token = fresh_root / "Flickr8k_text" / "Flickr8k.token.txt"
    data = token.read_bytes()
    token.write_bytes(data[:100] + b"\xff" + data[100:])
    status, _, err = run(capsys, *run_args(fresh_root, tmp_path, "--epochs", "1"))
    assert status == 2 and err == (
        f"Error: {token}: byte 100 (0xff) is not UTF-8 (invalid start byte); re-save the file as UTF-8\n"
    )


def test_unreadable_val_images_are_warned_once_and_score_as_misses(fresh_root, tmp_path, capsys):
    val = (fresh_root / "Flickr8k_text" / "Flickr_8k.devImages.txt").read_text().split()
    (fresh_root / "Flicker8k_Dataset" / val[0]).write_bytes(b"not a jpeg")
    status, out, _ = run(capsys, *run_args(fresh_root, tmp_path, "--epochs", "2"))
    assert status == 0
    assert out.count("⚠ 1 val images could not be read: they are scored as black squares (counted as misses)") == 1


def test_a_failed_checkpoint_write_stops_the_run_with_one_line_and_the_previous_file_intact(
    sample_root, tmp_path, capsys, monkeypatch
):
    real_save, calls = torch.save, []

    def full_on_the_second_save(obj, file, *args, **kwargs):
        calls.append(file)
        if len(calls) >= 2:
            raise OSError(28, "No space left on device")
        real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_the_second_save)
    status, _, err = run(capsys, *run_args(sample_root, tmp_path, "--epochs", "1", "--save_every_steps", "2"))
    monkeypatch.undo()
    assert status == 2
    assert err == (
        f"Error: could not write {tmp_path / 'ckpt' / LAST}: No space left on device; the previous "
        f"{LAST} is intact; free some space or choose another --savedir\n"
    )
    assert load(tmp_path / "ckpt" / LAST)["global_step"] == 2
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".brain_run.lock", LAST]


def test_synchronous_saves_give_the_same_run_and_every_save_logs_its_stall(sample_root, tmp_path, capsys, monkeypatch):
    real_write, writes = LocalStorage.write, []

    def recorded_write(self, name, save, summary=None):
        started = time.perf_counter()
        real_write(self, name, save, summary)
        writes.append((threading.current_thread().name, name, 1000 * (time.perf_counter() - started)))

    monkeypatch.setattr(LocalStorage, "write", recorded_write)
    runs = {}
    for mode, extra in (("background", ()), ("sync", ("--sync_saves",))):
        writes.clear()
        status, _, _ = run(
            capsys, *run_args(sample_root, tmp_path / mode, "--epochs", "1", "--save_every_steps", "3", *extra)
        )
        assert status == 0
        runs[mode] = list(writes), scalars(tmp_path / mode / "runs", "train/ckpt_stall_ms")
    assert_bitwise_equal(
        load(tmp_path / "sync" / "ckpt" / LAST)["model_state_dict"],
        load(tmp_path / "background" / "ckpt" / LAST)["model_state_dict"],
    )
    for mode, (written, stalls) in runs.items():
        assert [step for step, _ in stalls] == [3, 6, 8], f"{mode}: one stall per save (steps 3, 6, the epoch's end)"
        assert [name for _, name, _ in written] == [LAST] * 3, f"{mode}: each save written once (best is a link)"
    background_writes, _ = runs["background"]
    assert all(thread.startswith("checkpoint-writer") for thread, _, _ in background_writes)
    sync_writes, sync_stalls = runs["sync"]
    assert all(thread == threading.main_thread().name for thread, _, _ in sync_writes)
    for (_, _, write_ms), (step, stall_ms) in zip(sync_writes, sync_stalls):
        assert stall_ms >= write_ms, f"step {step}: a synchronous save's stall holds its whole write"


def test_a_stop_during_a_persist_exits_only_once_the_file_holds_the_stopped_step(sample_root, tmp_path):
    args = run_args(sample_root, tmp_path, "--epochs", "2", "--save_every_steps", "1")
    process = subprocess.Popen(
        [sys.executable, str(WORKERS / "slow_persist.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wait_for_step(process, 3)
    process.send_signal(signal.SIGTERM)
    status, out = finish(process)
    saved = load(tmp_path / "ckpt" / LAST)  # read the moment the process is gone
    on_disk, epoch = saved["global_step"], saved["data_state"]["epoch"]
    assert status == 143, out
    assert f"step {on_disk} (sample" in out and f"Stopped by SIGTERM at epoch {epoch}, step {on_disk} " in out


def test_a_signal_during_the_first_image_cache_build_stops_cleanly(sample_root, tmp_path):
    for signum in (signal.SIGTERM, signal.SIGINT):
        run_dir = tmp_path / signal.Signals(signum).name
        args = run_args(sample_root, run_dir, "--epochs", "1")
        process = subprocess.Popen(
            [sys.executable, str(WORKERS / "slow_decode.py"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for line in process.stdout:
            if line.startswith("decoding"):
                break
        process.send_signal(signum)
        status, out = finish(process)
        assert status == 128 + signum, out
        assert f"Stopped by {signal.Signals(signum).name} during the image cache build; nothing to save yet" in out
        assert "Traceback" not in out and not list((run_dir / "cache").rglob("pixels.u8"))


DiskUsage = collections.namedtuple("DiskUsage", "total used free")  # what shutil.disk_usage returns


def test_a_disk_that_fills_up_mid_save_is_one_line_and_the_previous_checkpoint_stays(
    sample_root, tmp_path, capsys, monkeypatch
):
    # One checkpoint of the tiny model is ~12 MB: the first save fits in 20 MB, the second (written beside it) not.
    with small_disk(tmp_path / "ckpt", "size=20m") as mounted:
        if not mounted:  # this machine refuses mounts: the same failure, injected where torch raises it
            real_save, calls = torch.save, []

            def fills_up(obj, file, *args, **kwargs):
                calls.append(file)
                if len(calls) >= 2:
                    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4352")
                real_save(obj, file, *args, **kwargs)

            monkeypatch.setattr(torch, "save", fills_up)
            monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(20 * 2**20, 12 * 2**20, 0))
        status, _, err = run(capsys, *run_args(sample_root, tmp_path, "--epochs", "1", "--save_every_steps", "2"))
        monkeypatch.undo()
        assert status == 2 and err.count("\n") == 1
        assert err.startswith(f"Error: could not write {tmp_path / 'ckpt' / LAST}: No space left on device")
        assert err.endswith(f"the previous {LAST} is intact; free some space or choose another --savedir\n")
        assert load(tmp_path / "ckpt" / LAST)["global_step"] == 2
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".brain_run.lock", LAST]


def test_a_read_only_checkpoint_folder_is_one_line_before_any_training(sample_root, tmp_path, capsys, monkeypatch):
    with small_disk(tmp_path / "ckpt", "ro,size=1m") as mounted:
        if not mounted:  # this machine refuses mounts: the file system's answer to a new file there, injected
            real_create = storage._create_exclusively

            def read_only(path):
                if Path(path).parent == tmp_path / "ckpt":
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
                return real_create(path)

            monkeypatch.setattr(storage, "_create_exclusively", read_only)
        status, out, err = run(capsys, *run_args(sample_root, tmp_path, "--epochs", "1"))
        assert status == 2 and "Train samples" not in out
        assert err.startswith(f"Error: --savedir {tmp_path / 'ckpt'}: cannot be written (") and err.count("\n") == 1
        assert err.endswith("); choose a folder this user can write\n")


def png_bomb(path: Path, side: int = 20000) -> None:
    """A PNG header claiming side x side pixels in a few bytes: PIL refuses it as a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("cache", ["--cache_images", "--no-cache_images"])
def test_a_decompression_bomb_is_an_unreadable_image_warned_and_substituted(fresh_root, tmp_path, capsys, cache):
    train_names = (fresh_root / "Flickr8k_text" / "Flickr_8k.trainImages.txt").read_text().split()
    bomb = fresh_root / "Flicker8k_Dataset" / train_names[0]
    png_bomb(bomb)
    status, out, err = run(capsys, *run_args(fresh_root, tmp_path, "--epochs", "1", cache))
    assert status == 0, err
    assert out.count(f"⚠ Could not read image {bomb.name}") == 1 and "Traceback" not in out + err
    assert events(tmp_path / "runs").Scalars("train/skipped_images")[-1].value >= 1


def test_a_karpathy_file_with_malformed_entries_skips_them_into_one_warning(tmp_path, capsys):
    root = write_sample_dataset(tmp_path / "karpathy", "karpathy", images=12, val=2, test=1, size=(32, 24))
    annotations = root / "dataset_flickr8k.json"
    content = json.loads(annotations.read_text())
    content["images"][0]["sentences"][0]["raw"] = 5
    content["images"][1]["filename"] = 12345
    annotations.write_text(json.dumps(content))
    status, out, err = run(capsys, *run_args(root, tmp_path, "--batch_size", "1000"))  # stops after the data is read
    assert (
        f"⚠ {annotations}: skipped" in out and "2 malformed entries (first: images[0]: a sentence's 'raw' is 5" in out
    )
    assert status == 2 and err.startswith("Error: the train split has ") and err.count("\n") == 1


def test_a_finished_run_ends_with_where_its_files_are_how_to_view_them_and_how_long_it_took(trained):
    out = (trained / "out.txt").read_text()
    summary = out[out.rindex("Finished in ") :].splitlines()
    assert re.fullmatch(r"Finished in (\d+ min )?\d+ s", summary[0])
    assert re.fullmatch(rf"Checkpoints: .*ckpt \({LAST}, {BEST}\)", summary[1])
    assert re.fullmatch(r"TensorBoard: (\S+runs) \(view it with: tensorboard --logdir \1\)", summary[2])


def test_a_val_split_too_small_for_recall_is_one_warning(trained):
    out = (trained / "out.txt").read_text()  # the sample set has 4 val images
    assert out.count("⚠ The val split has 4 images: text -> image R@k is 100 for every k >= 4 whatever the model") == 1


def test_demo_help_lists_every_setting_the_preset_changes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name, value in DEMO_SETTINGS.items():
        assert f"--{name} {value}" in help_text


def test_an_error_while_the_loader_workers_start_ends_the_process(sample_root, tmp_path):
    worker = ROOT / "tests" / "workers" / "loader_start_fails.py"
    args = run_args(sample_root, tmp_path, "--epochs", "1", "--num_workers", "2", "--no-cache_images")
    child = subprocess.run([sys.executable, str(worker), *args], capture_output=True, text=True, timeout=300)
    assert child.returncode == 1, "a program error ends the process (it used to wait for its loader workers)"
    assert "TypeError: ufunc 'right_shift' not supported for the input types (injected)" in child.stderr
