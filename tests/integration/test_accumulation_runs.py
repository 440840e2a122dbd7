"""`--accum_steps`: the global batch's InfoNCE taken in micro-batches (GradientCache) gives the one-big-batch
gradient in float64 (one process here, two under torchrun); each micro-batch's re-run forward draws the same
random numbers as its first; BatchNorm's running statistics are updated once per micro-batch; the setting is
checked; and a run with it stops and resumes bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
from helpers import (
    ROOT,
    STEPS_PER_EPOCH,
    assert_bitwise_equal,
    finish,
    load,
    run_args,
    run_to_end,
    scalars,
    start,
    wait_for_step,
)

from brain_trainer import checkpointing as ck

ACCUMULATED = ["--epochs", "2", "--accum_steps", "2"]


@pytest.mark.slow
def test_two_processes_in_micro_batches_give_the_one_process_whole_batch_gradient():
    worker = ROOT / "tests" / "workers" / "accumulated_gradient.py"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for steps in (1, 2, 4):
        assert results[f"error_{steps}"] < 1e-10, steps
        assert results[f"loss_{steps}"] == pytest.approx(results["reference_loss"], rel=1e-12)


@pytest.mark.slow
def test_a_run_in_micro_batches_stops_and_resumes_bitwise_and_may_change_accum_steps(sample_root, tmp_path):
    reference = tmp_path / "reference"
    out = run_to_end(run_args(sample_root, reference, *ACCUMULATED))
    assert "⚠ --accum_steps 2: BatchNorm" in out
    args = run_args(sample_root, tmp_path / "stopped", *ACCUMULATED)
    process = start(args)
    wait_for_step(process, random.Random(7).randint(2, 2 * STEPS_PER_EPOCH - 3))
    process.send_signal(signal.SIGTERM)
    status, _ = finish(process)
    assert status == 128 + signal.SIGTERM
    stopped = tmp_path / "stopped" / "ckpt" / ck.LAST
    changed = tmp_path / "changed"
    (changed / "ckpt").mkdir(parents=True)
    (changed / "ckpt" / ck.LAST).write_bytes(stopped.read_bytes())
    run_to_end(args + ["--resume", "auto"])
    final, expected = load(stopped), load(reference / "ckpt" / ck.LAST)
    assert final["global_step"] == 2 * STEPS_PER_EPOCH and final["config"]["accum_steps"] == 2
    assert_bitwise_equal(final["model_state_dict"], expected["model_state_dict"], "model")
    assert_bitwise_equal(final["optimizer_state_dict"], expected["optimizer_state_dict"], "optimizer")
    assert scalars(tmp_path / "stopped" / "runs", "train/loss") == scalars(reference / "runs", "train/loss")

    moved = run_to_end(run_args(sample_root, changed, "--epochs", "2", "--accum_steps", "4", "--resume", "auto"))
    assert "accum_steps 2 -> 4" in moved
    assert load(changed / "ckpt" / ck.LAST)["global_step"] == 2 * STEPS_PER_EPOCH
