"""BatchNorm on several CPU processes (gloo, where SyncBatchNorm cannot run): each process trains on its own
batch statistics, and the running statistics are averaged over the processes at each epoch's end, before its
evaluation and save, so the file holds the statistics the evaluation used, and a run stopped at an epoch boundary
evaluates that epoch, after its resume, as the uninterrupted run did."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ROOT, STEPS_PER_EPOCH, assert_bitwise_equal, load, run_args, run_to_end, scalars

from brain_trainer import checkpointing as ck

pytestmark = pytest.mark.slow

TWO_EPOCHS = ["--epochs", "2"]  # the tiny model's encoder (mobilenet_v3_small) has BatchNorm


def stopped_after_step(args: list[str], step: int) -> str:
    """Two processes under torchrun, the main one signalled (SIGTERM) during `step`: all stop after it."""
    worker = ROOT / "tests" / "workers" / "stop_at_step.py"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "STOP_AT_STEP": str(step)}
    done = subprocess.run([*launcher, str(worker), *args], capture_output=True, text=True, timeout=600, env=env)
    return done.stdout + done.stderr


def test_two_processes_stopped_at_an_epoch_boundary_evaluate_that_epoch_as_the_uninterrupted_run(sample_root, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    out = run_to_end(run_args(sample_root, uninterrupted, *TWO_EPOCHS), processes=2)
    assert out.count("⚠ BatchNorm statistics stay per process on the CPU while training") == 1

    args = run_args(sample_root, tmp_path / "stopped", *TWO_EPOCHS)
    out = stopped_after_step(args, STEPS_PER_EPOCH)  # the last step of epoch 0: stopped before its evaluation
    assert out.count(f"Stopped by SIGTERM at epoch 0, step {STEPS_PER_EPOCH} ") == 1, out
    run_to_end(args + ["--resume", "auto"], processes=2)

    expected = scalars(uninterrupted / "runs", "val/loss")
    assert [step for step, _ in expected] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert scalars(tmp_path / "stopped" / "runs", "val/loss") == expected, "each epoch evaluates to the same loss"
    final, reference = load(tmp_path / "stopped" / "ckpt" / ck.LAST), load(uninterrupted / "ckpt" / ck.LAST)
    assert_bitwise_equal(final["model_state_dict"], reference["model_state_dict"], "model and BatchNorm statistics")
    assert final["val_loss"] == reference["val_loss"] and final["best_val"] == reference["best_val"]
