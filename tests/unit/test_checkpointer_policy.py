"""The Checkpointer owns the checkpoint: given the run's parts and the policy, it decides when a save is due,
the names (last, best when the val loss improves, the epoch snapshot when kept), builds the format-3 dict with
every process's RNG, and only the main process writes; a failed persist reaches every process."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from torch import nn

from brain_trainer import checkpointing as ck
from brain_trainer.runtime import Runtime
from brain_trainer.trainer import TrainState

RECORD = ck.RunRecord(
    config={"lr": 0.003},
    tokenizer_json=None,
    fingerprint={"samples": 70, "sha256": "abc"},
    lineage={"id": "run-1", "parent": None, "started_ns": 1},
    data={"root_dir": "/data", "annotations": None},
)


class SecondOfTwo:
    """Process 1 of 2, without a process group: the collectives answer as the main process's would."""

    is_main = False

    def gather_objects(self, value):
        return [value, value]

    def on_main(self, action):
        return 0.0


def checkpointer(folder, runtime=None, **policy) -> tuple[ck.Checkpointer, TrainState]:
    state = TrainState(epoch=1, global_step=8)
    model = nn.Linear(3, 2)
    return ck.Checkpointer(
        storage=ck.LocalStorage(str(folder)),
        runtime=runtime or Runtime(device=torch.device("cpu")),
        model=model,
        optimizer=torch.optim.AdamW(model.parameters()),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        state=state,
        record=RECORD,
        policy=ck.SavePolicy(background=False, **policy),
    ), state


def names(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))


def test_a_save_is_due_every_n_steps_only_when_asked_for(tmp_path):
    every_four, _ = checkpointer(tmp_path, every_steps=4)
    never, _ = checkpointer(tmp_path)
    assert [step for step in range(1, 13) if every_four.due(step)] == [4, 8, 12]
    assert not any(never.due(step) for step in range(1, 13))


def test_a_save_writes_last_as_the_format_3_checkpoint_of_the_run(tmp_path):
    saver, state = checkpointer(tmp_path)
    saved = saver.save()
    saver.close()
    assert saved.location == str(tmp_path / ck.LAST) == saver.last_saved and not saved.improved
    checkpoint = torch.load(tmp_path / ck.LAST, weights_only=True)
    assert checkpoint["format_version"] == ck.FORMAT_VERSION and checkpoint["global_step"] == 8
    assert checkpoint["run"] == RECORD.lineage and checkpoint["config"] == RECORD.config
    assert checkpoint["data_state"]["fingerprint"] == RECORD.fingerprint
    assert checkpoint["world_size"] == 1 and len(checkpoint["rng_state"]) == 1
    assert names(tmp_path) == [ck.LAST]


def test_an_epoch_end_names_best_only_when_the_val_loss_improves_and_keeps_snapshots_when_asked(tmp_path):
    saver, state = checkpointer(tmp_path, keep_last=1)
    first = saver.save_epoch_end(0, val_loss=0.9)
    assert first.improved and state.best_val == 0.9
    assert names(tmp_path) == sorted([ck.LAST, ck.BEST, ck.snapshot_name(0)])
    state.global_step = 16
    second = saver.save_epoch_end(1, val_loss=1.2)
    saver.close()
    assert not second.improved and state.best_val == 0.9, "a worse loss is no new best"
    assert names(tmp_path) == sorted([ck.LAST, ck.BEST, ck.snapshot_name(1)]), "keep_last 1 rotated epoch 0 out"
    assert torch.load(tmp_path / ck.BEST, weights_only=True)["global_step"] == 8
    assert torch.load(tmp_path / ck.LAST, weights_only=True)["best_val"] == 0.9


def test_without_keep_last_an_epoch_end_writes_no_snapshot(tmp_path):
    saver, _ = checkpointer(tmp_path)
    saver.save_epoch_end(0, val_loss=0.5)
    saver.close()
    assert names(tmp_path) == sorted([ck.LAST, ck.BEST])


def test_a_process_other_than_the_main_one_writes_nothing_but_gathers_with_the_others(tmp_path):
    saver, _ = checkpointer(tmp_path, runtime=SecondOfTwo(), keep_last=2)
    saved = saver.save_epoch_end(0, val_loss=0.5)
    saver.close()
    assert names(tmp_path) == [] and saved.stall == 0.0
    assert len(saver.checkpoint(SecondOfTwo().gather_objects({"python": None}))["rng_state"]) == 2


def test_a_failed_background_persist_is_raised_with_its_line_and_the_previous_file_stays(tmp_path, monkeypatch):
    saver, state = checkpointer(tmp_path)
    saver.writer = ck.CheckpointWriter(storage=saver.storage, background=True)
    saver.save()
    saver.wait()
    monkeypatch.setattr(torch, "save", lambda obj, handle: (_ for _ in ()).throw(RuntimeError("unexpected pos 4416")))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    state.global_step = 9
    saver.save()
    for _ in range(200):
        if saver.failed():
            break
        time.sleep(0.05)
    assert saver.failed()
    with pytest.raises(ck.CheckpointError, match=r"could not write .*last_brain_v2.pt: No space left on device"):
        saver.raise_failure()
    monkeypatch.undo()
    saver.close()
    assert torch.load(tmp_path / ck.LAST, weights_only=True)["global_step"] == 8
