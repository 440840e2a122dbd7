"""The CheckpointWriter: a snapshot at the step boundary, the persist behind it (write once, publish the other
names, rotate), failures reported, and SIGKILL at any instant of a background persist."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch
from checkpoint_helpers import assert_bitwise_equal, checkpoint_of, listing, small_model, train_briefly

from brain_trainer import checkpointing as ck


def held_storage(folder) -> tuple[ck.LocalStorage, threading.Event]:
    """A storage whose writes wait at their start until the returned event is set."""
    storage, release = ck.LocalStorage(str(folder)), threading.Event()
    real_write = storage.write

    def held(name, save, **options):
        assert release.wait(timeout=30), "the test never released the writer"
        real_write(name, save, **options)

    storage.write = held
    return storage, release


def test_changes_after_the_snapshot_never_reach_the_file(tmp_path):
    model = small_model()
    optimizer, scaler = train_briefly(model)
    checkpoint = checkpoint_of(model, optimizer, scaler)
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    storage, release = held_storage(tmp_path)
    checkpointer = ck.CheckpointWriter(storage=storage, background=True)
    try:
        blocked = checkpointer.save(checkpoint, [ck.LAST])
        assert blocked < 25 and not (tmp_path / ck.LAST).exists(), "save returned before the write"
        for _ in range(2):  # training goes on while the writer waits: weights and Adam moments change in place
            optimizer.zero_grad()
            model(torch.randn(5, 4)).square().mean().backward()
            optimizer.step()
        assert not torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], expected_moments)
    finally:
        release.set()
        checkpointer.close()
    saved = ck.load_checkpoint(checkpointer.location(ck.LAST))
    assert_bitwise_equal(saved["model_state_dict"], expected_model)
    assert torch.equal(saved["optimizer_state_dict"]["state"][0]["exp_avg"], expected_moments)


def test_an_epoch_end_is_written_once_and_the_other_names_are_links_to_it(tmp_path):
    model = small_model()
    optimizer, scaler = train_briefly(model)
    checkpointer = ck.CheckpointWriter(storage=ck.LocalStorage(str(tmp_path)), keep_last=1, background=True)
    try:
        checkpointer.save(checkpoint_of(model, optimizer, scaler, epoch=0), [ck.LAST, ck.BEST, ck.snapshot_name(0)])
        checkpointer.save(checkpoint_of(model, optimizer, scaler, epoch=1), [ck.LAST, ck.snapshot_name(1)])
    finally:
        checkpointer.close()
    assert listing(tmp_path) == [ck.BEST, ck.snapshot_name(1), ck.LAST], "rotation kept the newest snapshot only"
    assert (tmp_path / ck.LAST).stat().st_ino == (tmp_path / ck.snapshot_name(1)).stat().st_ino
    assert (tmp_path / ck.BEST).stat().st_ino != (tmp_path / ck.LAST).stat().st_ino
    assert ck.load_checkpoint(str(tmp_path / ck.BEST))["epoch"] == 0
    assert ck.load_checkpoint(checkpointer.location(ck.LAST))["epoch"] == 1


def test_a_failed_background_write_is_reported_and_the_previous_file_stays(tmp_path, monkeypatch):
    checkpointer = ck.CheckpointWriter(storage=ck.LocalStorage(str(tmp_path)), background=True)
    try:
        checkpointer.save({"global_step": 1, "w": torch.ones(3)}, [ck.LAST])
        checkpointer.wait()

        def disk_full(obj, handle):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4352")

        monkeypatch.setattr(torch, "save", disk_full)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
        checkpointer.save({"global_step": 2, "w": torch.ones(3)}, [ck.LAST])
        for _ in range(200):
            if checkpointer.failed():
                break
            time.sleep(0.05)
        assert checkpointer.failed()
        with pytest.raises(
            ck.CheckpointError,
            match=r"could not write .*last_brain_v2.pt: No space left on device \(.*\); "
            r"the previous last_brain_v2.pt is intact; free some space",
        ):
            checkpointer.wait()
        assert not checkpointer.failed(), "a failure is raised once"
    finally:
        monkeypatch.undo()
        checkpointer.close()
    assert ck.load_checkpoint(str(tmp_path / ck.LAST))["global_step"] == 1
    assert listing(tmp_path) == [ck.LAST]


def test_a_foreground_checkpointer_has_written_the_file_when_save_returns(tmp_path):
    checkpointer = ck.CheckpointWriter(storage=ck.LocalStorage(str(tmp_path)), background=False)
    checkpointer.save({"global_step": 4}, [ck.LAST, ck.BEST])
    assert ck.load_checkpoint(str(tmp_path / ck.BEST))["global_step"] == 4
    checkpointer.close()


def test_a_snapshot_keeps_the_strides_of_channels_last_tensors(tmp_path):
    weight = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    checkpointer = ck.CheckpointWriter(storage=ck.LocalStorage(str(tmp_path)), background=True)
    try:
        checkpointer.save({"w": weight}, [ck.LAST])
    finally:
        checkpointer.close()
    saved = ck.load_checkpoint(str(tmp_path / ck.LAST))["w"]
    assert not weight.is_contiguous() and saved.stride() == weight.stride() and torch.equal(saved, weight)
