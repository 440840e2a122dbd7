"""Checkpoints on an object store, against a real S3 server (moto's, on 127.0.0.1) through the real s3fs
client: every promise of the local folder that a store can keep, tested as a user meets it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, assert_bitwise_equal, finish, run_args, run_to_end, start, wait_for_step

from brain_trainer import train as cli
from brain_trainer.checkpointing import BEST, LAST, CheckpointError, open_storage

WORKERS = ROOT / "tests" / "workers"


def s3_args(root: Path, run_dir: Path, url: str, *extra: str) -> list[str]:
    args = run_args(root, run_dir, *extra)
    args[args.index("--savedir") + 1] = url
    return args


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ----------------------------------------------------------------------------- the storage itself


def test_an_object_appears_whole_or_not_at_all_and_a_failed_upload_leaves_the_previous_one(s3):
    storage = open_storage(s3.url)
    storage.write(LAST, lambda handle: torch.save({"step": 1}, handle))

    def fails_midway(handle):
        handle.write(b"x" * 1000)
        raise OSError("the network went away")

    with pytest.raises(CheckpointError, match=f"could not write {s3.url}/{LAST}: the network went away"):
        storage.write(LAST, fails_midway)
    assert s3.read(f"{s3.url}/{LAST}") == {"step": 1}
    assert list(s3.objects(s3.url)) == [LAST]


def test_other_names_are_server_side_copies_of_the_complete_object(s3):
    storage = open_storage(s3.url)
    storage.write(LAST, lambda handle: torch.save({"step": 7}, handle))
    storage.publish(LAST, BEST)
    assert s3.read(f"{s3.url}/{BEST}") == {"step": 7} and storage.names() == [BEST, LAST]


def test_a_prefix_is_locked_by_an_object_created_only_if_absent(s3):
    first = open_storage(s3.url).lock("first run")
    try:
        with pytest.raises(CheckpointError, match=r"another run \(first run\) holds this prefix's lock until"):
            open_storage(s3.url).lock("second run")
    finally:
        first.release()
    open_storage(s3.url).lock("second run").release()  # released: free again


def test_an_expired_lock_is_taken_over_and_the_old_holder_learns_it_lost_the_lock(s3):
    stalled = open_storage(s3.url, lock_expiry=3).lock("stalled run")
    stalled._stop.set()  # a run that stopped renewing (killed, or frozen)
    stalled._renewer.join()
    time.sleep(3.5)
    taker = open_storage(s3.url, lock_expiry=3)
    lock = taker.lock("new run")
    assert taker.notes and "Took over the lock" in taker.notes[0] and "stalled run" in taker.notes[0]
    lock.release()


def test_a_missing_bucket_and_an_endpoint_that_does_not_answer_are_one_line_each(s3, monkeypatch):
    with pytest.raises(CheckpointError, match="bucket 'no-such-bucket' does not exist; create it"):
        open_storage("s3://no-such-bucket/run").check_writable("savedir")
    s3.relay.cut()
    with pytest.raises(CheckpointError, match="cannot be reached .*the endpoint did not answer"):
        open_storage(s3.url).check_writable("savedir")


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_a_run_on_s3_stopped_by_sigterm_resumes_bitwise_equal_to_the_uninterrupted_run(sample_root, tmp_path, s3):
    reference = tmp_path / "reference"
    run_to_end(run_args(sample_root, reference, "--epochs", "2"))
    args = s3_args(sample_root, tmp_path / "s3run", s3.url, "--epochs", "2", "--save_every_steps", "3")
    process = start(args)
    wait_for_step(process, 5)
    process.send_signal(signal.SIGTERM)
    status, out = finish(process)
    assert status == 143, out
    assert "Resume with: python train_multimodal_brain_flickr8k.py" in out and f"--resume {s3.url}/{LAST}" in out
    run_to_end(args + ["--resume", "auto"])

    final, expected = s3.read(f"{s3.url}/{LAST}"), torch.load(reference / "ckpt" / LAST, weights_only=True)
    assert final["global_step"] == expected["global_step"] == 16
    assert_bitwise_equal(final["model_state_dict"], expected["model_state_dict"], "model")
    assert_bitwise_equal(final["optimizer_state_dict"], expected["optimizer_state_dict"], "optimizer")
    assert sorted(p.name for p in (tmp_path / "s3run").iterdir()) == ["cache", "runs"], "no checkpoint on local disk"


@pytest.mark.slow
def test_sigkill_during_an_upload_leaves_no_partial_object_and_resume_auto_continues_from_the_previous(
    sample_root, tmp_path, s3
):
    args = s3_args(sample_root, tmp_path, s3.url, "--epochs", "2", "--save_every_steps", "2", "--lock_expiry", "3")
    process = subprocess.Popen(
        [sys.executable, str(WORKERS / "slow_upload.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("uploading slowly"):
            break
    process.kill()
    process.wait()
    assert s3.read(f"{s3.url}/{LAST}")["global_step"] == 2, "".join(seen)
    assert sorted(s3.objects(s3.url)) == [".brain_run.lock", LAST], "no partial object under any name"

    time.sleep(3.5)  # a SIGKILLed run cannot release its lock: the next one takes it over once it has lapsed
    resumed = run_to_end(args + ["--resume", "auto"])
    assert "⚠ Took over the lock" in resumed and "✓ Global step restored to 2" in resumed
    assert s3.read(f"{s3.url}/{LAST}")["global_step"] == 16


@pytest.mark.slow
def test_a_second_run_on_the_same_prefix_exits_2_naming_the_first(sample_root, tmp_path, s3, capsys):
    first = start(s3_args(sample_root, tmp_path / "a", s3.url, "--epochs", "500"))  # still running when B starts
    try:
        wait_for_step(first, 1)
        status, _, err = run(capsys, *s3_args(sample_root, tmp_path / "b", s3.url, "--epochs", "3", "--resume", "auto"))
        assert status == 2 and err.count("\n") == 1
        assert f"Error: --savedir {s3.url}: another run (" in err and "holds this prefix's lock" in err
    finally:
        first.send_signal(signal.SIGTERM)
        finish(first)


@pytest.mark.slow
def test_a_store_that_stops_answering_mid_run_is_one_line_exit_2_and_the_previous_object_stays(
    sample_root, tmp_path, s3, s3_server
):
    args = s3_args(sample_root, tmp_path, s3.url, "--epochs", "2", "--save_every_steps", "2", "--sync_saves")
    process = start(args)
    wait_for_step(process, 3)
    s3.relay.cut()
    status, out = finish(process)
    assert status == 2, out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in out
    assert f"could not write {s3.url}/{LAST}" in errors[0] and "the endpoint did not answer" in errors[0]
    direct = s3_server.__class__(s3_server.endpoint, s3_server.env, None)
    assert direct.read(f"{s3.url}/{LAST}")["global_step"] == 2


@pytest.mark.slow
def test_consent_and_unreadable_objects_work_as_in_a_local_folder(sample_root, tmp_path, s3, capsys):
    args = s3_args(sample_root, tmp_path, s3.url, "--epochs", "1")
    assert run(capsys, *args)[0] == 0
    status, _, err = run(capsys, *args)
    assert status == 2 and f"--savedir {s3.url} already holds a run's checkpoints ({LAST}, {BEST}" in err

    import s3fs

    s3fs.S3FileSystem(endpoint_url=s3.endpoint).pipe_file(f"{s3.url}/{BEST}", b"not a checkpoint")
    status, out, _ = run(capsys, *args[:-1], "2", "--resume", "auto")
    assert status == 0, out
    aside = [name for name in s3.objects(s3.url) if name.startswith(f"{BEST}.unreadable-")]
    assert len(aside) == 1 and s3.objects(s3.url)[aside[0]] == len(b"not a checkpoint"), "moved aside, not deleted"
    assert f"⚠ Moved {s3.url}/{BEST} aside to {aside[0]}" in out


def test_startup_refuses_a_missing_bucket_and_missing_credentials_before_any_training(
    sample_root, tmp_path, s3, capsys, monkeypatch
):
    status, out, err = run(capsys, *s3_args(sample_root, tmp_path, "s3://no-such-bucket/run", "--epochs", "1"))
    assert status == 2 and "Train samples" not in out
    assert err == (
        "Error: --savedir s3://no-such-bucket/run: bucket 'no-such-bucket' does not exist; create it, or fix the URL\n"
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    status, out, err = run(capsys, *s3_args(sample_root, tmp_path, s3.url, "--epochs", "1"))
    assert status == 2 and "Train samples" not in out and err.count("\n") == 1
    assert "no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)" in err
    assert s3.objects(s3.url) == {}, "nothing created"


def test_without_s3fs_an_s3_savedir_is_one_line_naming_the_extra(sample_root, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(WORKERS / "without_s3fs.py"),
            *s3_args(sample_root, tmp_path, "s3://bucket/run", "--epochs", "1"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == (
        "Error: s3://bucket/run: needs s3fs: pip install 'brain-trainer[s3]' (or pip install s3fs)\n"
    )


def test_resume_auto_on_a_store_chooses_by_the_lineage_kept_in_metadata_without_downloading(s3, monkeypatch):
    from brain_trainer.checkpointing import find_latest_checkpoint, save_checkpoint

    older_run = {"format_version": 3, "epoch": 5, "global_step": 900, "run": {"started_ns": 1}}
    newer_run = {"format_version": 3, "epoch": 0, "global_step": 40, "run": {"started_ns": 2}}
    save_checkpoint(older_run, f"{s3.url}/epoch_005_brain_v2.pt")
    save_checkpoint(newer_run, f"{s3.url}/{LAST}")
    storage = open_storage(s3.url)
    monkeypatch.setattr(type(storage), "local_copy", lambda *args: pytest.fail("downloaded a checkpoint"))
    assert find_latest_checkpoint(storage).location == f"{s3.url}/{LAST}", "the newest run, not the higher step"
