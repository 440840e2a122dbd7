"""Exact, preemption-safe resume, tested as a user meets it: the real CLI in a subprocess, stopped with
real signals (SIGTERM, SIGINT, SLURM's SIGUSR1, SIGKILL) at random steps, resumed with --resume auto,
and compared bit for bit with an uninterrupted run: checkpoint tensors and TensorBoard train/loss."""

from __future__ import annotations

import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import STEPS_PER_EPOCH, assert_bitwise_equal, finish, run_args, run_to_end, scalars, start, wait_for_step

from brain_trainer import checkpointing as ck

pytestmark = pytest.mark.slow

EPOCHS = ["--epochs", "2"]
TOTAL_STEPS = 2 * STEPS_PER_EPOCH


def train_losses(logdir: Path) -> list[tuple[int, float]]:
    return scalars(logdir, "train/loss")


def assert_same_as_uninterrupted(run_dir: Path, reference_dir: Path) -> None:
    final = torch.load(run_dir / "ckpt" / ck.LAST, weights_only=True)
    expected = torch.load(reference_dir / "ckpt" / ck.LAST, weights_only=True)
    assert final["global_step"] == expected["global_step"] == TOTAL_STEPS
    assert_bitwise_equal(final["model_state_dict"], expected["model_state_dict"], "model")
    assert_bitwise_equal(final["optimizer_state_dict"], expected["optimizer_state_dict"], "optimizer")
    assert final["best_val"] == expected["best_val"]
    assert train_losses(run_dir / "runs") == train_losses(reference_dir / "runs")


@pytest.fixture(scope="module")
def reference(sample_root, tmp_path_factory) -> Path:
    """The uninterrupted run every stopped-and-resumed run must equal."""
    run_dir = tmp_path_factory.mktemp("reference")
    (run_dir / "out.txt").write_text(run_to_end(run_args(sample_root, run_dir, *EPOCHS)))
    assert [step for step, _ in train_losses(run_dir / "runs")] == list(range(1, TOTAL_STEPS + 1))
    return run_dir


@pytest.mark.parametrize(
    "signum, workers", [(signal.SIGTERM, "0"), (signal.SIGINT, "2")], ids=["SIGTERM-0-workers", "SIGINT-2-workers"]
)
def test_a_run_stopped_mid_epoch_and_resumed_equals_the_uninterrupted_run(
    sample_root, tmp_path, reference, signum, workers
):
    args = run_args(sample_root, tmp_path, *EPOCHS, "--num_workers", workers)
    process = start(args)
    wait_for_step(process, random.Random(signum).randint(2, 12))
    process.send_signal(signum)
    status, out = finish(process)
    assert status == 128 + signum, out
    saved = torch.load(tmp_path / "ckpt" / ck.LAST, weights_only=True)
    stopped_at = saved["global_step"]
    epoch = saved["data_state"]["epoch"]  # a stop on an epoch's last step may land before or after its end
    assert f"Stopped by {signal.Signals(signum).name} at epoch {epoch}, step {stopped_at}" in out
    command = re.search(r"^Resume with: (python train_multimodal_brain_flickr8k\.py .*)$", out, re.M)[1]
    assert command.endswith(f"--resume {tmp_path / 'ckpt' / ck.LAST}")

    resumed = run_to_end(args + ["--resume", "auto"])
    assert f"✓ Global step restored to {stopped_at}" in resumed
    assert_same_as_uninterrupted(tmp_path, reference)
    epoch_lines = lambda out: re.findall(r"^Epoch \d+/2: train loss [\d.]+", out, re.M)
    uninterrupted = epoch_lines((reference / "out.txt").read_text())
    assert epoch_lines(out + resumed) == uninterrupted, "the epoch's mean loss counts the steps before the stop too"


def test_a_run_stopped_twice_with_a_new_batch_size_in_between_continues_at_the_same_sample(sample_root, tmp_path):
    args = run_args(sample_root, tmp_path, *EPOCHS)
    process = start(args)
    wait_for_step(process, 3)
    process.send_signal(signal.SIGTERM)
    assert finish(process)[0] == 128 + signal.SIGTERM
    first = torch.load(tmp_path / "ckpt" / ck.LAST, weights_only=True)["data_state"]
    first_epoch, first_stop = first["epoch"], first["samples_seen"]  # a late stop may land past the epoch's end

    process = start(args + ["--batch_size", "5", "--resume", "auto"])
    lines = wait_for_step(process, first_stop // 8 + 1)
    process.send_signal(signal.SIGUSR1)  # what SLURM sends before preemption
    status, out = finish(process)
    assert status == 128 + signal.SIGUSR1, out
    where = f", sample {first_stop} (mid-epoch)" if first_stop else ""
    assert f"✓ Starting from epoch {first_epoch}{where}" in "".join(lines)
    second = torch.load(tmp_path / "ckpt" / ck.LAST, weights_only=True)
    in_the_same_epoch = second["data_state"]["epoch"] == first_epoch
    starts = first_stop if in_the_same_epoch else 0  # the next epoch starts at its first sample
    assert second["data_state"]["samples_seen"] in (starts + 5 * k for k in range(int(in_the_same_epoch), 14))
    assert second["config"]["batch_size"] == 5

    run_to_end(args + ["--batch_size", "5", "--resume", "auto"])
    final = torch.load(tmp_path / "ckpt" / ck.LAST, weights_only=True)
    assert final["epoch"] == 1
    assert (final["data_state"]["epoch"], final["data_state"]["samples_seen"]) == (2, 0)


def test_stopped_twice_with_the_same_settings_still_equals_the_uninterrupted_run(sample_root, tmp_path, reference):
    args = run_args(sample_root, tmp_path, *EPOCHS)
    for stop_at, signum in ((5, signal.SIGTERM), (11, signal.SIGINT)):
        process = start(args + ["--resume", "auto"])
        wait_for_step(process, stop_at)
        process.send_signal(signum)
        assert finish(process)[0] == 128 + signum
    run_to_end(args + ["--resume", "auto"])
    assert_same_as_uninterrupted(tmp_path, reference)


def test_sigkill_at_random_moments_always_leaves_a_loadable_last_and_no_duplicate_steps(
    sample_root, tmp_path, reference
):
    args = run_args(sample_root, tmp_path, *EPOCHS, "--save_every_steps", "1")
    rng = random.Random(7)
    for kill in range(3):
        process = start(args + ["--resume", "auto"])
        wait_for_step(process, 3 + 4 * kill)
        time.sleep(rng.uniform(0.0, 0.2))
        process.kill()
        process.wait()
        process.stdout.close()
        assert ck.load_checkpoint(tmp_path / "ckpt" / ck.LAST)["global_step"] >= 1
    run_to_end(args + ["--resume", "auto"])
    steps = [step for step, _ in train_losses(tmp_path / "runs")]
    assert steps == list(range(1, TOTAL_STEPS + 1)), "TensorBoard must show each step once, in order"
    assert_same_as_uninterrupted(tmp_path, reference)


def test_a_second_ctrl_c_during_a_run_exits_130_and_leaves_no_torn_checkpoint(sample_root, tmp_path):
    process = start(run_args(sample_root, tmp_path, *EPOCHS, "--save_every_steps", "1"))
    wait_for_step(process, 2)
    process.send_signal(signal.SIGINT)
    for line in process.stdout:  # the first Ctrl-C is acknowledged before the second is sent
        if line.startswith("SIGINT received"):
            break
    process.send_signal(signal.SIGINT)
    status, _ = finish(process)
    assert status == 130
    assert ck.load_checkpoint(tmp_path / "ckpt" / ck.LAST)["global_step"] >= 1
    ck.LocalStorage(tmp_path / "ckpt").clean_up()  # what the next start does with a save cut short
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [ck.LOCK_NAME, ck.LAST]


def test_resume_auto_skips_a_truncated_newest_checkpoint_and_names_it(sample_root, tmp_path):
    args = run_args(sample_root, tmp_path, "--epochs", "1", "--keep_last", "2")
    run_to_end(args)
    last = tmp_path / "ckpt" / ck.LAST
    torn = last.read_bytes()[:1000]
    last.unlink()  # best and the snapshot are hard links to last: tear this name only
    last.write_bytes(torn)
    out = run_to_end(run_args(sample_root, tmp_path, "--epochs", "2", "--resume", "auto"))
    assert f"⚠ Skipping {last}: truncated or not a PyTorch checkpoint" in out
    assert "Resuming from checkpoint: " in out and "✓ Starting from epoch 1" in out
    kept = list((tmp_path / "ckpt").glob("last_brain_v2.pt.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == torn, "an unreadable file is moved aside, never overwritten"
    assert f"⚠ Moved {last} aside to {kept[0].name}" in out


def test_resume_auto_with_nothing_to_resume_says_so_and_starts_fresh(sample_root, tmp_path):
    out = run_to_end(run_args(sample_root, tmp_path, "--epochs", "1", "--resume", "auto"))
    assert f"--resume auto: no loadable checkpoint in {tmp_path / 'ckpt'}; starting a fresh run" in out
    assert "Training epochs: 0 -> 1" in out


def test_resuming_on_different_data_warns_with_both_fingerprints(sample_root, fresh_root, tmp_path):
    run_to_end(run_args(sample_root, tmp_path, "--epochs", "1"))
    token = fresh_root / "Flickr8k_text" / "Flickr8k.token.txt"
    token.write_text(token.read_text().replace(" .", " !", 1))
    out = run_to_end(run_args(fresh_root, tmp_path, "--epochs", "2", "--resume", "auto"))
    assert re.search(r"⚠ Training data differs from the checkpoint's: 70 samples \(\w+\) -> 70 samples \(\w+\)", out)
