"""LocalStorage against a real folder: whole-or-nothing writes, one clear line for a failed write, publishing,
temporaries, the startup probes, and names an attacker planted (never written through)."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch
from checkpoint_helpers import listing

from brain_trainer import checkpointing as ck


def saver(value):
    return lambda handle: torch.save(value, handle)


# ----------------------------------------------------------------------------- whole or not at all


def test_a_save_that_fails_midway_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / ck.LAST)
    ck.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def torn_save(obj, handle):
        handle.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["global_step"] == 1
    assert listing(tmp_path) == [ck.LAST]


def test_a_full_disk_is_one_clear_error_and_the_old_file_stays(tmp_path, monkeypatch):
    path = str(tmp_path / ck.LAST)
    ck.save_checkpoint({"global_step": 1}, path)

    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(ck.CheckpointError) as refusal:
        ck.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert str(refusal.value) == (
        f"could not write {path}: No space left on device; the previous last_brain_v2.pt is "
        f"intact; free some space or choose another --savedir"
    )
    assert ck.load_checkpoint(path)["global_step"] == 1
    assert listing(tmp_path) == [ck.LAST]


def test_a_failed_first_write_does_not_claim_a_previous_file_and_a_permission_error_asks_for_no_space(
    tmp_path, monkeypatch
):
    def refused(descriptor):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", refused)
    with pytest.raises(ck.CheckpointError) as refusal:
        ck.LocalStorage(str(tmp_path)).write(ck.LAST, saver({"global_step": 1}))
    monkeypatch.undo()
    message = str(refusal.value)
    assert "Input/output error; no last_brain_v2.pt was there before; check the folder's permissions" in message
    assert "intact" not in message and "free some space" not in message
    assert listing(tmp_path) == []


# ----------------------------------------------------------------------------- publish


def test_publish_links_the_durable_file_under_the_other_name(tmp_path):
    storage = ck.LocalStorage(str(tmp_path))
    storage.write(ck.LAST, saver({"global_step": 3}))
    storage.publish(ck.LAST, ck.BEST)
    assert (tmp_path / ck.BEST).stat().st_ino == (tmp_path / ck.LAST).stat().st_ino
    assert listing(tmp_path) == [ck.BEST, ck.LAST]


def test_a_link_refused_by_the_file_system_falls_back_to_a_durable_copy(tmp_path, monkeypatch):
    storage = ck.LocalStorage(str(tmp_path))
    storage.write(ck.LAST, saver({"global_step": 3}))

    def no_links(source, target, **options):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    storage.publish(ck.LAST, ck.BEST)
    monkeypatch.undo()
    assert ck.read_checkpoint(storage, ck.BEST)["global_step"] == 3
    assert (tmp_path / ck.BEST).stat().st_ino != (tmp_path / ck.LAST).stat().st_ino
    assert listing(tmp_path) == [ck.BEST, ck.LAST]


# ----------------------------------------------------------------------------- startup probes


def test_a_folder_that_cannot_be_written_is_found_at_startup_without_creating_anything(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    storage = ck.LocalStorage(str(blocker / "ckpt"))
    with pytest.raises(
        ck.CheckpointError,
        match=r"^--savedir .*a_file/ckpt: cannot be written \(.*a file is in the "
        r"way\); choose a folder",
    ):
        storage.check_writable("savedir")
    with pytest.raises(
        ck.CheckpointError, match=r"^--savedir .*a_file/ckpt: cannot be written \(.*\); choose a folder"
    ):
        storage.prepare("savedir")
    assert listing(tmp_path) == ["a_file"]


def test_prepare_creates_the_folder_and_leaves_no_probe(tmp_path):
    storage = ck.LocalStorage(str(tmp_path / "new" / "ckpt"))
    storage.check_writable("savedir")
    assert not (tmp_path / "new").exists(), "check_writable creates nothing"
    storage.prepare("savedir")
    assert listing(tmp_path / "new" / "ckpt") == []


def test_names_lists_regular_files_and_kind_says_what_each_name_is(tmp_path):
    (tmp_path / ck.LAST).write_bytes(b"x")
    (tmp_path / ck.BEST).mkdir()
    (tmp_path / "epoch_001_brain_v2.pt").symlink_to(tmp_path / ck.LAST)
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "gone.pt")
    storage = ck.LocalStorage(str(tmp_path))
    assert storage.names() == [ck.LAST]
    kinds = {name: storage.kind(name) for name in (ck.LAST, ck.BEST, "epoch_001_brain_v2.pt", "dangling.pt", "no.pt")}
    assert kinds == {
        ck.LAST: "file",
        ck.BEST: "folder",
        "epoch_001_brain_v2.pt": "link",
        "dangling.pt": "link",
        "no.pt": None,
    }


def test_locate_and_open_storage_take_paths_as_strings(tmp_path):
    storage, name = ck.locate(str(tmp_path / ck.LAST))
    assert isinstance(storage, ck.LocalStorage) and storage.url == str(tmp_path) and name == ck.LAST
    assert storage.location(name) == str(tmp_path / ck.LAST)
    assert ck.open_storage(f"file://{tmp_path}").location(ck.BEST) == str(tmp_path / ck.BEST)
    assert not ck.is_url(f"file://{tmp_path}") and ck.is_url("s3://bucket/run")


# ----------------------------------------------------------------------------- planted names (attacker style)


@pytest.fixture
def victim(tmp_path):
    """A file outside the checkpoint folder that a planted link points at; it must never change."""
    path = tmp_path / "victim.txt"
    path.write_bytes(b"the user's precious file\n")
    return path


def test_a_symlink_planted_at_the_temporary_is_never_written_through(tmp_path, victim):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    planted = folder / f".{ck.LAST}.tmp-{os.getpid()}"
    planted.symlink_to(victim)
    ck.save_checkpoint({"global_step": 5}, str(folder / ck.LAST))
    assert victim.read_bytes() == b"the user's precious file\n"
    assert ck.load_checkpoint(str(folder / ck.LAST))["global_step"] == 5
    assert listing(folder) == [ck.LAST] and not (folder / ck.LAST).is_symlink()


def test_a_symlink_planted_at_the_probe_is_never_written_through(tmp_path, victim):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / f".probe-{os.getpid()}").symlink_to(victim)
    ck.LocalStorage(str(folder)).prepare("savedir")
    assert victim.read_bytes() == b"the user's precious file\n"
    assert listing(folder) == []


def test_a_published_name_that_is_a_symlink_is_replaced_not_written_through(tmp_path, victim):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / ck.BEST).symlink_to(victim)
    (folder / ck.LAST).symlink_to(victim)
    storage = ck.LocalStorage(str(folder))
    storage.write(ck.LAST, saver({"global_step": 9}))
    storage.publish(ck.LAST, ck.BEST)
    assert victim.read_bytes() == b"the user's precious file\n"
    assert storage.kind(ck.LAST) == storage.kind(ck.BEST) == "file"
    assert ck.read_checkpoint(storage, ck.BEST)["global_step"] == 9


def test_a_savedir_deleted_after_the_lock_was_taken_is_not_recreated(tmp_path):
    folder = tmp_path / "ckpt"
    storage = ck.LocalStorage(str(folder))
    storage.prepare("savedir")
    lock = storage.lock("test")
    try:
        storage.write(ck.LAST, saver({"global_step": 1}))
        shutil.rmtree(folder)
        with pytest.raises(ck.CheckpointError, match=r"the folder was deleted or replaced while this run held it"):
            storage.write(ck.LAST, saver({"global_step": 2}))
        assert not folder.exists()
        folder.mkdir()  # a new folder of the same name (another user's, a remount): still not this run's
        (folder / ck.LAST).write_bytes(b"someone else's")
        with pytest.raises(ck.CheckpointError, match="deleted or replaced"):
            storage.publish(ck.LAST, ck.BEST)
        assert listing(folder) == [ck.LAST] and (folder / ck.LAST).read_bytes() == b"someone else's"
    finally:
        lock.release()
