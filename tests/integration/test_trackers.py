"""MLflow, W&B and metrics.jsonl as a user meets them: the real CLI in a subprocess with the real libraries,
offline (an MLflow sqlite store read back with MlflowClient; W&B in offline mode, read back from its run
folders), stopped by SIGTERM or killed, resumed with --resume auto, and compared with one uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest
from helpers import (
    STEPS_PER_EPOCH,
    assert_one_error_line,
    finish,
    load,
    run_args,
    run_cli,
    small_disk,
    start,
    wait_for_step,
)

from brain_trainer.checkpointing import LAST
from brain_trainer.tracking.files import METRICS_FILE

pytestmark = pytest.mark.slow

EPOCHS = ["--epochs", "2"]
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
TRACKED = ["--report_to", "tensorboard,jsonl,mlflow,wandb"]
TIMED = ("train/samples_per_sec", "train/data_wait", "train/ckpt_stall_ms")  # wall-clock: differ run to run


@pytest.fixture(scope="module", autouse=True)
def own_tracker_settings():
    """The trackers see only the settings these tests give, none of the machine's."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith(("MLFLOW_", "WANDB_"))]:
            patch.delenv(name)
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One MLflow sqlite store for the module (making one takes seconds); each test has its own experiment."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    client(path).search_experiments()  # makes the store's tables
    return path


def tracker_env(store: Path, run_dir: Path, experiment: str | None = None) -> dict:
    named = {"MLFLOW_EXPERIMENT_NAME": experiment} if experiment else {}
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{store}", "WANDB_MODE": "offline", "WANDB_DIR": str(run_dir), **named}


def train(args: list[str], env: dict) -> str:
    status, out = finish(start(args, extra_env=env))
    assert status == 0, out
    return out


@pytest.fixture(scope="module")
def reference(sample_root, store, tmp_path_factory) -> Path:
    """The uninterrupted run every other is compared with; its experiment is named by default (the folder)."""
    run_dir = tmp_path_factory.mktemp("reference")
    (run_dir / "out.txt").write_text(
        train(run_args(sample_root, run_dir, *EPOCHS, *TRACKED), tracker_env(store, run_dir))
    )
    return run_dir


@pytest.fixture(scope="module")
def stopped_and_resumed(sample_root, store, tmp_path_factory) -> tuple[Path, dict]:
    """A run stopped by SIGTERM in its second epoch and resumed with --resume auto; (its folder, the stop's
    checkpoint)."""
    run_dir = tmp_path_factory.mktemp("sigterm")
    args, env = run_args(sample_root, run_dir, *EPOCHS, *TRACKED), tracker_env(store, run_dir, "sigterm")
    process = start(args, extra_env=env)
    wait_for_step(process, 10)
    process.send_signal(signal.SIGTERM)
    status, out = finish(process)
    assert status == 128 + signal.SIGTERM, out
    stopped = load(run_dir / "ckpt" / LAST)
    assert stopped["global_step"] < TOTAL_STEPS
    train(args + ["--resume", "auto"], env)
    return run_dir, stopped


# ----------------------------------------------------------------------------- reading the trackers back


def client(store: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{store}")


def tracker_runs(run_dir: Path) -> dict[str, str]:
    return load(run_dir / "ckpt" / LAST)["run"]["trackers"]


def mlflow_losses(store: Path, run_id: str) -> list[tuple[int, float]]:
    history = client(store).get_metric_history(run_id, "train/loss")
    return [
        (metric.step, metric.value) for metric in sorted(history, key=lambda metric: (metric.timestamp, metric.step))
    ]


def experiment_runs(store: Path, experiment: str) -> list:
    found = client(store).get_experiment_by_name(experiment)
    return client(store).search_runs([found.experiment_id]) if found else []


def metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows without the wall-clock measures."""
    rows = [json.loads(line) for line in (run_dir / "runs" / METRICS_FILE).read_text().splitlines()]
    return [{key: value for key, value in row.items() if key not in TIMED} for row in rows]


def wandb_records(path: Path):
    """The records of a W&B run file: its offline transaction log, in LevelDB's log format (a 7-byte header,
    then 32 KiB blocks of records, each a 7-byte header of checksum, length and kind before its bytes)."""
    from wandb.proto import wandb_internal_pb2

    data, offset, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B", path
    while offset + 7 <= len(data):
        if 32768 - offset % 32768 < 7:  # a block's tail too short for a header is padding
            offset += 32768 - offset % 32768
            continue
        length, kind = int.from_bytes(data[offset + 4 : offset + 6], "little"), data[offset + 6]
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def wandb_losses(run_dir: Path) -> list[tuple[str, int, float]]:
    """(run id, step, train/loss) of every history row, offline run folder by folder, in the order they started."""
    found = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        for record in wandb_records(next(folder.glob("run-*.wandb"))):
            if record.WhichOneof("record_type") == "history":
                values = {  # W&B writes a name holding "/" as its parts
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                found.append((folder.name.rsplit("-", 1)[1], record.history.step.num, values["train/loss"]))
    return found


# ----------------------------------------------------------------------------- one continuous run


def test_the_uninterrupted_run_is_one_mlflow_run_named_after_its_folder_with_its_config_and_summary(store, reference):
    run = client(store).get_run(tracker_runs(reference)["mlflow"])
    assert client(store).get_experiment(run.info.experiment_id).name == "ckpt"  # the checkpoint folder's name
    assert run.info.status == "FINISHED"
    assert [step for step, _ in mlflow_losses(store, run.info.run_id)] == list(range(1, TOTAL_STEPS + 1))
    assert run.data.params["lr"] == "0.001" and run.data.params["image_encoder"] == "mobilenet_v3_small"
    last_epoch = metrics_rows(reference)[-1]
    assert run.data.tags["val/i2t_R_at_5"] == str(last_epoch["val/i2t_R@5"])
    assert run.data.tags[f"checkpoint/{LAST}"] == str(reference / "ckpt" / LAST)
    out = (reference / "out.txt").read_text()
    assert f"MLflow: run {run.info.run_id} of experiment 'ckpt' in sqlite:///{store}" in out


def test_a_run_stopped_by_sigterm_and_resumed_is_one_mlflow_run_with_the_uninterrupted_history(
    store, reference, stopped_and_resumed
):
    run_dir, stopped = stopped_and_resumed
    runs = experiment_runs(store, "sigterm")
    assert (
        [run.info.run_id for run in runs] == [stopped["run"]["trackers"]["mlflow"]] == [tracker_runs(run_dir)["mlflow"]]
    )
    assert runs[0].info.status == "FINISHED"
    losses = mlflow_losses(store, runs[0].info.run_id)
    assert [step for step, _ in losses] == list(range(1, TOTAL_STEPS + 1)), "each step once, in order"
    assert losses == mlflow_losses(store, tracker_runs(reference)["mlflow"])


def test_metrics_jsonl_after_a_stop_and_a_resume_equals_the_uninterrupted_runs_line_for_line(
    reference, stopped_and_resumed
):
    run_dir, _ = stopped_and_resumed
    rows = metrics_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(1, TOTAL_STEPS + 1))
    assert rows == metrics_rows(reference)
    assert rows[STEPS_PER_EPOCH - 1]["epoch"] == 0 and "val/loss" in rows[STEPS_PER_EPOCH - 1]


def test_a_wandb_run_resumed_offline_carries_the_first_runs_id_and_its_steps_keep_increasing(
    reference, stopped_and_resumed
):
    run_dir, stopped = stopped_and_resumed
    run_id = stopped["run"]["trackers"]["wandb"]
    written = wandb_losses(run_dir)
    assert {run for run, _, _ in written} == {run_id} == {tracker_runs(run_dir)["wandb"]}
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # one folder a start, one run
    assert [step for _, step, _ in written] == list(range(1, TOTAL_STEPS + 1))
    assert [loss for _, _, loss in written] == [loss for _, _, loss in wandb_losses(reference)]


def test_a_kill_after_a_step_no_checkpoint_holds_then_a_resume_leaves_each_step_once_with_its_values(
    sample_root, store, reference, tmp_path
):
    args = run_args(sample_root, tmp_path, *EPOCHS, *TRACKED, "--save_every_steps", "3", "--sync_saves")
    env = tracker_env(store, tmp_path, "killed")
    process = start(args, extra_env=env)
    wait_for_step(process, 4)
    process.kill()
    finish(process)
    saved = load(tmp_path / "ckpt" / LAST)["global_step"]
    logged = [row["step"] for row in metrics_rows(tmp_path)]
    assert logged[-1] > saved, "the kill must come after a step the checkpoint does not hold"
    mlflow_run = tracker_runs(tmp_path)["mlflow"]
    assert [step for step, _ in mlflow_losses(store, mlflow_run)] == logged

    train(args + ["--resume", "auto"], env)
    assert metrics_rows(tmp_path) == metrics_rows(reference)
    assert [run.info.run_id for run in experiment_runs(store, "killed")] == [mlflow_run]
    assert mlflow_losses(store, mlflow_run) == mlflow_losses(store, tracker_runs(reference)["mlflow"])


def test_an_overwrite_start_is_a_second_tracker_run(sample_root, store, reference, tmp_path):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)  # the finished run's folders, checkpoints and all
    first = tracker_runs(tmp_path)
    train(run_args(sample_root, tmp_path, "--epochs", "1", *TRACKED, "--overwrite"), tracker_env(store, tmp_path))
    second = tracker_runs(tmp_path)
    assert second["mlflow"] != first["mlflow"] and second["wandb"] != first["wandb"]
    assert {run.info.run_id for run in experiment_runs(store, "ckpt")} == {first["mlflow"], second["mlflow"]}
    assert len(mlflow_losses(store, first["mlflow"])) == TOTAL_STEPS  # the first run's record untouched
    assert [row["step"] for row in metrics_rows(tmp_path)] == list(range(1, STEPS_PER_EPOCH + 1))


# ------------------------------------------------------------------------- a tracker is never a reason to lose training


@contextlib.contextmanager
def a_store_that_stops_taking_writes(folder: Path, store: Path):
    """A copy of the store in `folder`, and the call that stops it taking writes: the folder's file system made
    read-only (a tmpfs remounted read-only) where this machine allows mounting, else its database locked by
    another writer, as a second client holding sqlite's exclusive lock does."""
    with small_disk(folder, "size=50m") as mounted:
        shutil.copy(store, folder / "mlflow.db")
        if mounted:
            yield lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
            return
        holder = sqlite3.connect(folder / "mlflow.db", isolation_level=None)
        try:
            yield lambda: holder.execute("BEGIN EXCLUSIVE")
        finally:
            holder.close()


def test_an_mlflow_store_that_stops_taking_writes_mid_run_is_one_warning_and_the_run_finishes(
    sample_root, store, tmp_path
):
    with a_store_that_stops_taking_writes(tmp_path / "store", store) as stop_writes:
        # each operation opens its own connection (no file held open for writing: the folder can turn read-only)
        env = tracker_env(tmp_path / "store" / "mlflow.db", tmp_path, "unwritable")
        env["MLFLOW_SQLALCHEMYSTORE_POOLCLASS"] = "NullPool"
        process = start(run_args(sample_root, tmp_path, "--epochs", "1", *TRACKED), extra_env=env)
        lines = wait_for_step(process, 3)
        stop_writes()
        status, out = finish(process)
    out = "".join(lines) + out
    warnings = [line for line in out.splitlines() if line.startswith("⚠") and "val split" not in line]
    assert status == 0, out
    assert len(warnings) == 1 and warnings[0].startswith("⚠ MLflow failed ("), out
    assert warnings[0].endswith("): the run goes on without it, logging to TensorBoard, metrics.jsonl, W&B")
    assert load(tmp_path / "ckpt" / LAST)["global_step"] == STEPS_PER_EPOCH
    assert [row["step"] for row in metrics_rows(tmp_path) if "train/loss" in row] == list(range(1, STEPS_PER_EPOCH + 1))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    "tracker, env, says",
    [
        ("mlflow", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
         "Error: --report_to mlflow: cannot use the MLflow store http://127.0.0.1:{port} ("),
        ("wandb", {"WANDB_MODE": "online"},
         "Error: --report_to wandb: could not start a W&B run (No API key configured."),
    ],
)  # fmt: skip
def test_a_tracker_that_cannot_start_is_one_line_and_exit_2_before_any_training(
    sample_root, tmp_path, capsys, monkeypatch, tracker, env, says
):
    port = closed_port()
    monkeypatch.setenv("HOME", str(tmp_path))  # no W&B login from this machine's ~/.netrc
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(port=port))
    status, out, err = run_cli(capsys, "train", *run_args(sample_root, tmp_path, "--report_to", f"jsonl,{tracker}"))
    assert_one_error_line(status, err, says.format(port=port), "out of --report_to")
    assert "Train samples" not in out and not (tmp_path / "ckpt" / LAST).exists()
