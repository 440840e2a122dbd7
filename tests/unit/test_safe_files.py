"""The one way the program writes a file that is not a checkpoint: whole or not at all, never through a link,
with the mode a plain open gives; and the run log's TensorBoard folder held to the same rule."""

from __future__ import annotations

import os
import stat

import pytest

from brain_trainer.run_log import RunLog
from brain_trainer.safe_files import OutputError, output_folder, write_bytes, write_file
from brain_trainer.tracking import TrackedRun


def test_a_link_planted_at_the_name_is_replaced_and_its_target_untouched(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").symlink_to(outside)

    write_bytes(tmp_path / "out" / "config.json", b"{}")

    assert outside.read_text() == "precious"
    assert not (tmp_path / "out" / "config.json").is_symlink()
    assert (tmp_path / "out" / "config.json").read_bytes() == b"{}"


def test_a_new_file_has_the_mode_a_plain_open_gives_under_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write_bytes(tmp_path / "a.txt", b"x")
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    write_bytes(tmp_path / "index.jsonl", b"old\n")

    def fails(handle):
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_file(tmp_path / "index.jsonl", fails)
    assert (tmp_path / "index.jsonl").read_bytes() == b"old\n"
    assert os.listdir(tmp_path) == ["index.jsonl"]


def test_an_output_folder_with_foreign_files_is_refused_and_nothing_is_created(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="did not write .*notes.txt.*--overwrite"):
        output_folder(tmp_path / "out", "--out", ours=lambda name: name == "manifest.json", overwrite=False)
    output_folder(tmp_path / "out", "--out", ours=lambda name: name == "manifest.json", overwrite=True)
    output_folder(tmp_path / "new" / "deeper", "--out", ours=lambda name: False, overwrite=False)
    assert not (tmp_path / "new").exists()


def test_tensorboard_refuses_a_linked_logdir_and_names_its_events_unguessably(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="is a symbolic link"):
        RunLog().open_trackers(("tensorboard",), TrackedRun(str(tmp_path / "runs"), "ckpt", None, purge_step=0))
    assert not os.listdir(tmp_path / "elsewhere")

    names = []
    for run in ("a", "b"):
        log = RunLog()
        log.open_trackers(("tensorboard",), TrackedRun(str(tmp_path / run), "ckpt", None, purge_step=0))
        log.config({"lr": 1}, 0)
        log.close()
        names += os.listdir(tmp_path / run)
    suffixes = [name.rsplit(".", 1)[1] for name in names]
    assert len(set(suffixes)) == 2 and all(len(suffix) == 12 for suffix in suffixes), names


def test_events_that_cannot_be_written_are_one_line_and_ask_the_run_to_stop(tmp_path):
    class Stop:
        signum = None

    log = RunLog(stop=Stop())
    log.open_trackers(("tensorboard",), TrackedRun(str(tmp_path / "runs"), "ckpt", None, purge_step=0))
    events = log.trackers.trackers[0].events  # TensorBoard's, the only tracker

    class Full:
        def add_scalar(self, *args):
            raise OSError(28, "No space left on device")

        def close(self):
            raise OSError(28, "No space left on device")

    events.writer.close()
    events.writer = Full()
    log.scalars({"train/loss": 1.0}, 1, 0)

    assert log.failure.startswith(f"--logdir {tmp_path / 'runs'}: cannot be written (No space left on device")
    assert events.stop.signum is not None and events.writer is None
    log.flush()  # nothing more is attempted
