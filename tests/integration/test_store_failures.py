"""Nothing lost, nobody in, on an object store (a real moto S3 server, the real s3fs client): a run that lost
its lock never completes a write, copies keep their metadata, a failed download is the store's fault and not
the file's, URLs that fsspec would read as patterns are refused, and a store that falls silent ends the run."""

from __future__ import annotations

import signal
import tempfile
import threading
import time
import uuid

import pytest
import torch
from helpers import finish, run_args, run_cli, small_disk, start, wait_for_step

from brain_trainer.checkpointing import (
    LAST,
    CheckpointError,
    find_latest_checkpoint,
    object_store,
    open_storage,
    save_checkpoint,
)
from brain_trainer.checkpointing.base import ReadError
from brain_trainer.testing import S3Server, local_s3_server, s3_env

MIB = 2**20


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3Server:
    """The session's server, reached directly, with a bucket of this test's own (conftest's `s3` names its
    bucket after the test, which parametrized variants share) and its credentials in the environment."""
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    for name, value in s3_env(port).items():
        monkeypatch.setenv(name, value)
    server = S3Server(s3_server.endpoint, s3_env(port), relay=None)
    server.url = f"s3://{server.bucket(f'store-failures-{uuid.uuid4().hex[:12]}')}/run"
    return server


@pytest.fixture
def url(s3) -> str:
    return s3.url


def save_step(step: int, size: int = 0):
    return lambda handle: torch.save({"global_step": step, "padding": torch.zeros(size, dtype=torch.uint8)}, handle)


def take_over_after_expiry(url: str, holder: str) -> object:
    """Another run, started once the first one's lock has lapsed: it takes the prefix over."""
    time.sleep(3.5)
    storage = open_storage(url, lock_expiry=3)
    storage.lock(holder)
    return storage


# ----------------------------------------------------------------------------- a lost lock


@pytest.mark.parametrize("size", [0, 6 * MIB], ids=["one-shot PUT", "multipart upload"])
def test_a_run_that_lost_its_lock_mid_upload_never_replaces_the_newer_runs_checkpoint(s3, url, monkeypatch, size):
    monkeypatch.setattr(object_store, "UPLOAD_BLOCK", 5 * MIB)  # 6 MiB is two parts
    stalled = open_storage(url, lock_expiry=3)
    stalled.lock("stalled run")
    stalled._lock._stop.set()  # frozen: it stops renewing (a stopped VM, a long GC pause)
    stalled._lock._renewer.join()
    newer = {}

    def upload_in_flight_while_another_run_takes_over(handle):
        save_step(2, size)(handle)  # the bytes are on their way (a part already uploaded when multipart)
        newer["storage"] = take_over_after_expiry(url, "newer run")
        newer["storage"].write(LAST, save_step(4))

    with pytest.raises(CheckpointError, match="this run lost its lock"):
        stalled.write(LAST, upload_in_flight_while_another_run_takes_over)

    assert s3.read(f"{url}/{LAST}")["global_step"] == 4, "the newer run's checkpoint stays"
    bucket = url.split("/")[2]
    assert not newer["storage"].fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads"), "aborted"
    newer["storage"]._lock.release()


def test_a_run_whose_lock_was_taken_over_cannot_publish_either(s3, url):
    stalled = open_storage(url, lock_expiry=3)
    stalled.lock("stalled run")
    stalled.write(LAST, save_step(2))
    stalled._lock._stop.set()
    stalled._lock._renewer.join()
    take_over_after_expiry(url, "newer run").write("best_brain_v2.pt", save_step(4))

    with pytest.raises(CheckpointError, match="this run lost its lock"):
        stalled.publish(LAST, "best_brain_v2.pt")
    assert s3.read(f"{url}/best_brain_v2.pt")["global_step"] == 4


# ----------------------------------------------------------------------------- copies and downloads


@pytest.mark.parametrize("multipart", [False, True], ids=["one copy", "multipart copy"])
def test_a_published_copy_keeps_the_summary_metadata_at_every_size(s3, url, monkeypatch, multipart):
    if multipart:  # what a copy over 5 GiB does, at a size a test can afford
        monkeypatch.setattr(object_store, "SINGLE_COPY_LIMIT", 0)
        monkeypatch.setattr(object_store, "COPY_BLOCK", 5 * MIB)
    storage = open_storage(url)
    storage.write(LAST, save_step(7, 6 * MIB), summary={"step": "7", "run": "abc"})
    storage.publish(LAST, "best_brain_v2.pt")

    assert storage.summary("best_brain_v2.pt") == storage.summary(LAST) == {"step": "7", "run": "abc"}
    assert s3.read(f"{url}/best_brain_v2.pt")["global_step"] == 7


def test_a_download_into_a_full_tmpdir_is_an_io_error_and_nothing_is_moved_aside(s3, url, tmp_path, monkeypatch):
    save_checkpoint({"global_step": 3, "padding": torch.zeros(2 * MIB, dtype=torch.uint8)}, f"{url}/{LAST}")
    storage = open_storage(url)
    monkeypatch.setattr(type(storage), "summary", lambda *args: None)  # discovery has to download it
    with small_disk(tmp_path / "tmp", "size=256k") as mounted:
        if not mounted:
            pytest.skip("mounting a small tmpfs needs root")  # CI runs as root
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
        with pytest.raises(ReadError, match="could not download .*No space left on device"):
            find_latest_checkpoint(storage, log=lambda line: pytest.fail(f"taken for unreadable: {line}"))
    assert list(s3.objects(url)) == [LAST], "nothing moved aside"


# ----------------------------------------------------------------------------- URLs


@pytest.mark.parametrize("prefix", ["run?x", "run*", "run[12]", "runs//a", "/run"])
def test_a_prefix_fsspec_would_read_as_a_pattern_or_collapse_is_refused_in_one_line(s3, url, prefix, capsys):
    bucket = url.split("/")[2]
    url = f"s3://{bucket}/{prefix}"
    with pytest.raises(CheckpointError, match="would misplace the checkpoints"):
        open_storage(url)
    status, _, err = run_cli(capsys, "ckpt", "inspect", f"{url}/{LAST}")
    assert status == 2 and err.count("\n") == 1 and "would misplace the checkpoints" in err
    assert not s3.objects(f"s3://{bucket}")


# ----------------------------------------------------------------------------- a store that falls silent


@pytest.fixture
def freezable_s3():
    """A moto server of this test's own, which the test can freeze (SIGSTOP: connections are accepted, nothing
    answers) and which is always thawed at the end."""
    with local_s3_server() as s3:
        try:
            s3.url = f"s3://{s3.bucket('frozen')}/run"
            yield s3, s3.process
        finally:
            s3.process.send_signal(signal.SIGCONT)


QUICK_TIMEOUTS = '{"config_kwargs": {"connect_timeout": 2, "read_timeout": 2}}'


def test_a_write_to_a_frozen_store_ends_in_one_error_instead_of_hanging(freezable_s3, monkeypatch):
    s3, server = freezable_s3
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    storage = open_storage(s3.url, {"config_kwargs": {"connect_timeout": 2, "read_timeout": 2}})
    storage.write(LAST, save_step(1))
    server.send_signal(signal.SIGSTOP)
    outcome = []
    writer = threading.Thread(target=lambda: outcome.append(_attempt(storage.write, LAST, save_step(2))))
    writer.start()
    writer.join(600)  # a bound for a broken build, not a measurement: the timeouts end it in seconds
    assert outcome and isinstance(outcome[0], CheckpointError), outcome
    assert "the endpoint did not answer" in str(outcome[0]) or "timeout" in str(outcome[0]).lower()


def _attempt(action, *args):
    try:
        action(*args)
    except Exception as error:
        return error
    return None


@pytest.mark.slow
def test_a_run_whose_store_freezes_stops_at_a_step_boundary_with_one_line_and_sigterm_still_works(
    freezable_s3, sample_root, tmp_path
):
    s3, server = freezable_s3
    args = run_args(sample_root, tmp_path, "--epochs", "3", "--save_every_steps", "2")
    args[args.index("--savedir") + 1] = s3.url
    process = start([*args, "--storage_options", QUICK_TIMEOUTS], extra_env=s3.env)
    wait_for_step(process, 3)
    server.send_signal(signal.SIGSTOP)
    process.send_signal(signal.SIGTERM)  # while an upload waits on the silent store
    status, out = finish(process, timeout=300)

    assert status == 2, out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in out, out
    assert s3.url in errors[0] and "the endpoint did not answer" in errors[0]
    server.send_signal(signal.SIGCONT)
    for name in s3.objects(s3.url):  # whatever upload the freeze cut short left no partial object
        if name.endswith("_brain_v2.pt"):
            assert s3.read(f"{s3.url}/{name}")["global_step"] in (2, 4)
