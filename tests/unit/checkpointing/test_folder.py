"""The folder's policy: rotation of epoch snapshots, --resume auto's discovery, one run per folder, consent
before replacing another run's checkpoints, unreadable files set aside, names that are not files refused."""

from __future__ import annotations

import os

import pytest
import torch
from checkpoint_helpers import full, listing, write_at

from brain_trainer import checkpointing as ck


def local(folder) -> ck.LocalStorage:
    return ck.LocalStorage(str(folder))


def save(checkpoint: dict, path) -> None:
    ck.save_checkpoint(checkpoint, str(path))


def quiet(line: str) -> None:
    pass


# ----------------------------------------------------------------------------- rotation


def test_rotation_keeps_the_most_recently_written_snapshots_and_never_touches_best_or_last(tmp_path):
    for name in (ck.LAST, ck.BEST):
        write_at(tmp_path / name, 1)
    for seconds, epoch in enumerate((1, 2, 3, 10), start=10):
        write_at(tmp_path / ck.snapshot_name(epoch), seconds)
    removed = ck.rotate_snapshots(local(tmp_path), keep_last=2)
    assert sorted(removed) == ["epoch_001_brain_v2.pt", "epoch_002_brain_v2.pt"]
    assert listing(tmp_path) == sorted([ck.BEST, ck.LAST, "epoch_003_brain_v2.pt", "epoch_010_brain_v2.pt"])


def test_rotation_after_a_resume_from_an_older_epoch_keeps_the_new_snapshot_not_the_abandoned_ones(tmp_path):
    for seconds, epoch in enumerate((0, 1, 2), start=10):  # the abandoned run's epochs 0..2
        write_at(tmp_path / ck.snapshot_name(epoch), seconds)
    write_at(tmp_path / ck.snapshot_name(1), 20)  # the new continuation (resumed at epoch 0) just wrote epoch 1
    removed = ck.rotate_snapshots(local(tmp_path), keep_last=1, keep=ck.snapshot_name(1))
    assert listing(tmp_path) == [ck.snapshot_name(1)]
    assert sorted(removed) == [ck.snapshot_name(0), ck.snapshot_name(2)]


def test_rotation_never_removes_the_snapshot_just_written_even_when_its_clock_is_older(tmp_path):
    write_at(tmp_path / ck.snapshot_name(5), 30)
    write_at(tmp_path / ck.snapshot_name(6), 10)  # just written, on a file system whose clock went back
    assert ck.rotate_snapshots(local(tmp_path), keep_last=1, keep=ck.snapshot_name(6)) == []
    assert listing(tmp_path) == [ck.snapshot_name(5), ck.snapshot_name(6)]


def test_rotation_rotates_only_regular_files_past_a_dangling_link_and_a_folder_named_like_a_snapshot(tmp_path):
    write_at(tmp_path / ck.snapshot_name(3), 10)
    write_at(tmp_path / ck.snapshot_name(4), 20)
    (tmp_path / ck.snapshot_name(1)).symlink_to(tmp_path / "gone.pt")  # dangling
    (tmp_path / ck.snapshot_name(2)).mkdir()
    (tmp_path / ck.snapshot_name(2) / "inside").write_bytes(b"kept")
    removed = ck.rotate_snapshots(local(tmp_path), keep_last=1, keep=ck.snapshot_name(4))
    assert removed == [ck.snapshot_name(3)]
    assert listing(tmp_path) == [ck.snapshot_name(1), ck.snapshot_name(2), ck.snapshot_name(4)]
    assert (tmp_path / ck.snapshot_name(1)).is_symlink() and (tmp_path / ck.snapshot_name(2) / "inside").exists()


# ----------------------------------------------------------------------------- --resume auto and folders


def test_resume_auto_picks_the_furthest_step_of_the_newest_run_and_names_an_unreadable_file(tmp_path):
    save(full(30), tmp_path / ck.BEST)
    save(full(20), tmp_path / ck.snapshot_name(1))
    save(full(40), tmp_path / ck.LAST)
    assert ck.find_latest_checkpoint(local(tmp_path), log=quiet).location == str(tmp_path / ck.LAST)
    (tmp_path / ck.LAST).write_bytes((tmp_path / ck.LAST).read_bytes()[:100])
    lines: list[str] = []
    found = ck.find_latest_checkpoint(local(tmp_path), log=lines.append)
    assert found.location == str(tmp_path / ck.BEST)
    assert len(lines) == 1 and lines[0].startswith("⚠ Skipping ") and "last_brain_v2.pt" in lines[0]
    assert [name for name, _ in found.unreadable] == [ck.LAST]
    assert found.unreadable[0][1].startswith("truncated or not a PyTorch checkpoint")


def test_resume_auto_follows_the_newest_run_not_the_abandoned_one_with_more_steps(tmp_path):
    save(full(24, started_ns=1), tmp_path / ck.BEST)  # the old run went further...
    save(full(16, started_ns=2), tmp_path / ck.LAST)  # ...but this run resumed from its step 8
    assert ck.find_latest_checkpoint(local(tmp_path), log=quiet).location == str(tmp_path / ck.LAST)
    save(full(16, started_ns=2), tmp_path / ck.BEST)  # a tie on run and step: last beats best
    save(full(24, started_ns=1), tmp_path / ck.LAST)  # and the order of the files is not what decides
    assert ck.find_latest_checkpoint(local(tmp_path), log=quiet).location == str(tmp_path / ck.BEST)


def test_resume_auto_reads_a_file_of_the_old_serialisation_as_an_explicit_resume_does(tmp_path):
    torch.save(full(7), tmp_path / ck.LAST, _use_new_zipfile_serialization=False)
    found = ck.find_latest_checkpoint(local(tmp_path), log=quiet)
    assert found.location == str(tmp_path / ck.LAST) and found.unreadable == []


def test_resume_auto_in_an_empty_folder_finds_nothing(tmp_path):
    assert ck.find_latest_checkpoint(local(tmp_path), log=quiet) == ck.Discovery(None, [])


def test_resume_from_a_folder_takes_its_newest_checkpoint(tmp_path):
    save(full(5), tmp_path / ck.LAST)
    save(full(9), tmp_path / ck.BEST)
    assert ck.checkpoint_in_folder(local(tmp_path)) == str(tmp_path / ck.BEST)


def test_a_folder_without_a_checkpoint_is_named(tmp_path):
    with pytest.raises(
        ck.CheckpointError,
        match=r"^.*: folder holds no last_brain_v2.pt, best_brain_v2.pt or epoch "
        r"snapshot; pass a checkpoint file",
    ):
        ck.checkpoint_in_folder(local(tmp_path))
    (tmp_path / ck.LAST).write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match=r"epoch snapshot it can read \(empty file"):
        ck.checkpoint_in_folder(local(tmp_path))


# ----------------------------------------------------------------------------- one run per folder


def test_a_fresh_run_into_a_folder_with_checkpoints_needs_consent(tmp_path):
    save(full(12), tmp_path / ck.LAST)
    with pytest.raises(
        ck.CheckpointError,
        match=r"already holds a run's checkpoints \(last_brain_v2.pt; newest at step "
        r"12\); continue it with --resume auto .*or pass --overwrite",
    ):
        ck.claim_savedir(local(tmp_path), resume=None, overwrite=False, unreadable=[])
    outside = str(tmp_path.parent / "elsewhere.pt")
    with pytest.raises(
        ck.CheckpointError,
        match=r"holds another run's checkpoints \(last_brain_v2.pt\), which this run "
        r"would replace as it saves; pass --overwrite",
    ):
        ck.claim_savedir(local(tmp_path), resume=outside, overwrite=False, unreadable=[])
    ck.claim_savedir(local(tmp_path), resume=str(tmp_path / ck.LAST), overwrite=False, unreadable=[]).release()
    ck.claim_savedir(local(tmp_path), resume=None, overwrite=True, unreadable=[]).release()
    assert ck.load_checkpoint(str(tmp_path / ck.LAST))["global_step"] == 12, "claiming writes nothing over a checkpoint"


def test_a_refused_claim_releases_the_lock(tmp_path):
    save(full(12), tmp_path / ck.LAST)
    with pytest.raises(ck.CheckpointError, match="already holds"):
        ck.claim_savedir(local(tmp_path), resume=None, overwrite=False, unreadable=[])
    ck.claim_savedir(local(tmp_path), resume=None, overwrite=True, unreadable=[]).release()


def test_claiming_sets_an_unreadable_file_aside_and_clears_dead_writers_temporaries(tmp_path):
    (tmp_path / ck.LAST).write_bytes(b"garbage")
    stale = tmp_path / f".{ck.BEST}.tmp-999999999"  # above any PID the kernel hands out
    stale.write_bytes(b"left by a crash")
    lines: list[str] = []
    lock = ck.claim_savedir(
        local(tmp_path), resume=None, overwrite=False, unreadable=[(ck.LAST, "not a checkpoint")], log=lines.append
    )
    lock.release()
    aside = [name for name in listing(tmp_path) if name.startswith(f"{ck.LAST}.unreadable-")]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == b"garbage"
    assert not (tmp_path / ck.LAST).exists() and not stale.exists()
    assert len(lines) == 1 and lines[0].startswith(
        f"⚠ Moved {tmp_path / ck.LAST} aside to {aside[0]} (not a checkpoint)"
    )


@pytest.mark.parametrize("name", [ck.LAST, ck.BEST])
def test_a_checkpoint_name_taken_by_a_folder_is_refused_at_claim_time(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(
        ck.CheckpointError,
        match=rf"^--savedir {tmp_path}: {name} is a folder, not a checkpoint file; "
        rf"move it away, or choose another --savedir$",
    ):
        ck.claim_savedir(local(tmp_path), resume=None, overwrite=True, unreadable=[])
    ck.LocalStorage(str(tmp_path)).lock("test").release()  # the refusal released the lock


def test_a_checkpoint_name_taken_by_a_link_is_refused_at_claim_time(tmp_path):
    save(full(3), tmp_path / "mine.pt")
    (tmp_path / ck.BEST).symlink_to(tmp_path / "mine.pt")
    with pytest.raises(ck.CheckpointError, match=rf"{ck.BEST} is a link, not a checkpoint file"):
        ck.claim_savedir(local(tmp_path), resume=None, overwrite=True, unreadable=[])


def test_a_checkpoint_name_taken_by_a_pipe_is_refused_at_claim_time(tmp_path):
    os.mkfifo(tmp_path / ck.LAST)
    with pytest.raises(
        ck.CheckpointError,
        match=rf"{ck.LAST} is a special file \(a pipe, socket or device\), not a "
        rf"checkpoint file",
    ):
        ck.claim_savedir(local(tmp_path), resume=None, overwrite=True, unreadable=[])
    with pytest.raises(ck.CheckpointError, match=r"empty file"):  # an explicit --resume of it never blocks reading
        ck.load_checkpoint(str(tmp_path / ck.LAST))


def test_a_lock_file_planted_as_a_symlink_to_best_is_refused_and_best_is_unchanged(tmp_path):
    save(full(21), tmp_path / ck.BEST)
    before = (tmp_path / ck.BEST).read_bytes()
    (tmp_path / ck.LOCK_NAME).symlink_to(tmp_path / ck.BEST)
    with pytest.raises(ck.CheckpointError) as refusal:
        ck.claim_savedir(local(tmp_path), resume=str(tmp_path / ck.BEST), overwrite=True, unreadable=[])
    message = str(refusal.value)
    assert "\n" not in message and message == (
        f"--savedir {tmp_path}: {ck.LOCK_NAME} is a symbolic link; remove it, or choose another --savedir"
    )
    assert (tmp_path / ck.BEST).read_bytes() == before
    assert ck.load_checkpoint(str(tmp_path / ck.BEST))["global_step"] == 21


def test_a_lock_file_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / ck.LOCK_NAME).mkdir()
    with pytest.raises(
        ck.CheckpointError,
        match=rf"^--savedir {tmp_path}: {ck.LOCK_NAME} is a folder; remove it, or "
        rf"choose another --savedir$",
    ):
        ck.claim_savedir(local(tmp_path), resume=None, overwrite=False, unreadable=[])
