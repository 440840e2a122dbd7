"""Many processes on the CPU (gloo), started as users start them: torchrun, and srun's task variables. The loss
is the exact global-batch loss, two processes train the one-process run, a stop on any process stops all of them
at one step, and a checkpoint resumes at the same or at another number of processes."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch
from helpers import (
    DATA,
    ROOT,
    STEPS_PER_EPOCH,
    assert_bitwise_equal,
    finish,
    load,
    run_args,
    run_to_end,
    scalars,
    small_disk,
    start,
    wait_for_step,
)

from brain_trainer import checkpointing as ck

pytestmark = pytest.mark.slow

# No BatchNorm (torch's SyncBatchNorm needs GPUs), no dropout, no stochastic depth: the same run at any world size.
SAME_AT_ANY_WORLD_SIZE = ["--image_encoder", "alexnet", "--image_size", "64", "--dropout", "0", "--epochs", "2"]
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
LOSS_TOLERANCE = 1e-4  # relative, per logged step; measured: at most 3.5e-5 over 16 steps
WEIGHTS_TOLERANCE = 1e-2  # relative L2 distance of all weights at the end; measured: 2.5e-3


def test_the_global_batch_gradient_on_two_processes_equals_the_one_process_gradient():
    worker = ROOT / "tests" / "workers" / "global_batch_gradient.py"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["with_gradient"] < 1e-10, "gathered with gradient: the one-process gradient, to float64 rounding"
    assert results["without_gradient"] > 0.1, "a gather without gradient loses most of it"
    assert results["with_gradient_loss"] == pytest.approx(results["reference_loss"], rel=1e-12)


@pytest.fixture(scope="module")
def runs(sample_root, tmp_path_factory) -> dict:
    """The same run on one process and on two (torchrun), uninterrupted."""
    results = {}
    for processes in (0, 2):
        run_dir = tmp_path_factory.mktemp(f"processes{processes}")
        results[processes] = run_dir, run_to_end(run_args(sample_root, run_dir, *SAME_AT_ANY_WORLD_SIZE), processes)
    return results


def all_weights(run_dir) -> torch.Tensor:
    weights = load(run_dir / "ckpt" / ck.LAST)["model_state_dict"]
    return torch.cat([value.flatten().double() for value in weights.values() if value.is_floating_point()])


def test_two_processes_train_the_one_process_run(runs):
    (one, _), (two, out) = runs[0], runs[2]
    one_losses, two_losses = scalars(one / "runs", "train/loss"), scalars(two / "runs", "train/loss")
    assert [step for step, _ in two_losses] == list(range(1, TOTAL_STEPS + 1))
    for (step, expected), (_, got) in zip(one_losses, two_losses):
        assert got == pytest.approx(expected, rel=LOSS_TOLERANCE), f"step {step}"
    distance = (all_weights(two) - all_weights(one)).norm() / all_weights(one).norm()
    assert distance < WEIGHTS_TOLERANCE
    for tag in ("val/loss", "val/i2t_R@5", "val/t2i_R@5"):
        for (_, expected), (_, got) in zip(scalars(one / "runs", tag), scalars(two / "runs", tag)):
            assert got == pytest.approx(expected, rel=LOSS_TOLERANCE), tag
    samples_per_step = [value for _, value in scalars(two / "runs", "train/samples_per_sec")]
    assert all(value > 0 for value in samples_per_step)
    assert out.count("Train samples: 70") == 1 and out.count("Device: cpu (2 processes)") == 1
    assert out.count("Batch size: 8 (4 per process)") == 1
    saved = load(two / "ckpt" / ck.LAST)
    assert saved["world_size"] == 2 and len(saved["rng_state"]) == 2
    assert not any(key.startswith("module.") for key in saved["model_state_dict"]), (
        "checkpoints never hold DDP's prefix"
    )


def test_a_run_stopped_under_torchrun_resumes_bitwise_at_two_processes_and_at_the_same_sample_on_one(
    sample_root, tmp_path, runs
):
    reference, _ = runs[2]
    args = run_args(sample_root, tmp_path, *SAME_AT_ANY_WORLD_SIZE)
    process = start(args, processes=2)
    wait_for_step(process, random.Random(5).randint(3, 11))
    process.send_signal(signal.SIGTERM)
    _, out = finish(process)
    stopped = load(tmp_path / "ckpt" / ck.LAST)
    step = stopped["global_step"]
    epoch = stopped["data_state"]["epoch"]  # a stop on an epoch's last step may land before or after its end
    assert out.count(f"Stopped by SIGTERM at epoch {epoch}, step {step}") == 1
    command = re.search(r"^Resume with: (torchrun .*)$", out, re.M)[1]
    assert "--standalone --nproc_per_node 2" in command and command.endswith(f"--resume {tmp_path / 'ckpt' / ck.LAST}")
    one_process = tmp_path / "one"
    one_process.mkdir()
    (one_process / "last.pt").write_bytes((tmp_path / "ckpt" / ck.LAST).read_bytes())

    resumed = run_to_end(args + ["--resume", "auto"], processes=2)
    assert resumed.count(f"✓ Global step restored to {step}") == 1 and "⚠ RNG" not in resumed
    final, expected = load(tmp_path / "ckpt" / ck.LAST), load(reference / "ckpt" / ck.LAST)
    assert_bitwise_equal(final["model_state_dict"], expected["model_state_dict"], "model")
    assert_bitwise_equal(final["optimizer_state_dict"], expected["optimizer_state_dict"], "optimizer")
    assert scalars(tmp_path / "runs", "train/loss") == scalars(reference / "runs", "train/loss")

    moved = run_to_end(
        run_args(sample_root, one_process, *SAME_AT_ANY_WORLD_SIZE, "--resume", str(one_process / "last.pt"))
    )
    samples = stopped["data_state"]["samples_seen"]
    where = f", sample {samples} (mid-epoch)" if samples else ""
    assert f"✓ Starting from epoch {stopped['data_state']['epoch']}{where}" in moved
    assert "⚠ RNG derived from (seed, step, rank): the checkpoint was written by 2 process(es), this run has 1" in moved
    assert load(one_process / "ckpt" / ck.LAST)["global_step"] == TOTAL_STEPS


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_tasks(args: list[str], tasks: int) -> list[subprocess.Popen]:
    """The processes as srun starts them: one per task, told their place by SLURM's variables alone."""
    port = str(free_port())
    return [
        start(
            args,
            extra_env={
                "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank),
                "SLURM_NTASKS": str(tasks),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for rank in range(tasks)
    ]


def test_a_signal_to_one_task_stops_every_task_at_the_same_step_with_one_save(sample_root, tmp_path):
    main, other = start_tasks(run_args(sample_root, tmp_path, "--epochs", "3"), tasks=2)
    wait_for_step(main, 4)
    other.send_signal(signal.SIGTERM)  # the main process never sees this signal
    (main_status, out), (other_status, other_out) = finish(main), finish(other)
    assert main_status == other_status == 128 + signal.SIGTERM, out + other_out
    stopped = load(tmp_path / "ckpt" / ck.LAST)
    step, epoch = stopped["global_step"], stopped["data_state"]["epoch"]
    assert f"step {step} " in out and f"Stopped by SIGTERM at epoch {epoch}, step {step}" in out
    assert other_out.strip() == "", "only the main process speaks"


def test_a_batch_size_that_does_not_divide_is_one_error_line_and_status_2_on_every_process(sample_root, tmp_path):
    tasks = start_tasks(run_args(sample_root, tmp_path, "--batch_size", "7"), tasks=2)
    (main_status, out), (other_status, other_out) = (finish(task) for task in tasks)
    assert main_status == other_status == 2
    assert out == "Error: --batch_size 7: the global batch must divide by the 2 processes; use a multiple of 2\n"
    assert other_out == "" and not (tmp_path / "ckpt").exists()


def test_a_checkpoint_of_the_single_process_version_resumes_on_two_processes(sample_root, tmp_path):
    old = DATA / "main_c80bc36_step11.pt"  # format 2, one process, stopped at step 11 of 16
    out = run_to_end(
        [
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
        ],
        processes=2,
    )
    for line in (
        "✓ Starting from epoch 1, sample 24 (mid-epoch)",
        "✓ Global step restored to 11",
        "⚠ RNG derived from (seed, step, rank): the checkpoint was written by 1 process(es), this run has 2",
        "⚠ BatchNorm statistics stay per process on the CPU",
    ):
        assert out.count(line) == 1, line
    resumed = load(tmp_path / "ckpt" / ck.LAST)
    assert resumed["global_step"] == TOTAL_STEPS and resumed["world_size"] == 2


@pytest.mark.parametrize("saves", [["--sync_saves"], []], ids=["sync-saves", "background-saves"])
def test_a_full_disk_on_the_main_process_ends_every_process_with_status_2_and_one_line(sample_root, tmp_path, saves):
    # One checkpoint of the tiny model is ~12 MB: the first save fits in 20 MB, the second (written beside it) not.
    # With --sync_saves the main process fails inside the save, where the others are already on their way to the
    # next step's collective; with the background writer the failure is seen at a step boundary or the next save.
    with small_disk(tmp_path / "ckpt", "size=20m") as mounted:
        if not mounted:
            pytest.skip("this machine refuses tmpfs mounts (the one-process test injects the failure instead)")
        tasks = start_tasks(
            run_args(sample_root, tmp_path, "--epochs", "2", "--save_every_steps", "2", *saves), tasks=2
        )
        (main_status, out), (other_status, other_out) = (finish(task) for task in tasks)
    assert main_status == other_status == 2, out + other_out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"Error: could not write {tmp_path / 'ckpt' / ck.LAST}: No space left on device"
    )
    assert "Traceback" not in out + other_out and other_out == "", "only the main process speaks"


def test_a_process_killed_outright_leaves_the_survivor_one_line_and_status_2(sample_root, tmp_path):
    main, other = start_tasks(run_args(sample_root, tmp_path, "--epochs", "3"), tasks=2)
    wait_for_step(main, 3)
    main.kill()  # SIGKILL: the main process says nothing more, the survivor must
    finish(main)
    other_status, other_out = finish(other)
    assert other_status == 2, other_out
    assert re.fullmatch(r"Error: process 1 lost contact with the others \(.+\); resume with --resume auto\n", other_out)


def test_workers_whose_torchrun_dies_of_an_unhandled_signal_stop_and_save_cleanly(sample_root, tmp_path):
    launcher = start(run_args(sample_root, tmp_path, "--epochs", "3"), processes=2, signals=())
    wait_for_step(launcher, 3)
    launcher.send_signal(signal.SIGUSR1)  # torchrun does not handle SIGUSR1 by default: its agent dies of it
    _, out = finish(launcher)  # the pipe closes when the last worker has exited
    stopped = load(tmp_path / "ckpt" / ck.LAST)
    step = stopped["global_step"]
    assert 3 <= step < 3 * STEPS_PER_EPOCH, "the workers trained on after their launcher died"
    assert "is gone: stopping at the next step boundary as on SIGTERM" in out
    assert f"Stopped by SIGTERM at epoch {stopped['data_state']['epoch']}, step {step}" in out
