"""`--resume auto` over a checkpoint the disk cannot read right now: the run stops with one line naming the file
and the I/O error (exit 2); the file is not moved aside and no older checkpoint or fresh start follows."""

from __future__ import annotations

import errno

import torch
from helpers import run_args

from brain_trainer import checkpointing as ck
from brain_trainer import train
from brain_trainer.checkpointing import loading


def test_resume_auto_over_an_unreadable_disk_exits_2_and_keeps_the_file_in_place(
    sample_root, tmp_path, monkeypatch, capsys
):
    savedir = tmp_path / "ckpt"
    savedir.mkdir()
    ck.save_checkpoint({"global_step": 3, "w": torch.ones(4)}, str(savedir / ck.LAST))

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(loading.torch, "load", eio)
    status = train.main(run_args(sample_root, tmp_path, "--resume", "auto"))
    err = capsys.readouterr().err
    assert status == 2
    assert f"Error: {savedir / ck.LAST}: could not be read (Input/output error): an I/O error" in err
    assert "Traceback" not in err
    assert sorted(path.name for path in savedir.iterdir()) == [ck.LAST], "nothing moved aside, nothing written"
