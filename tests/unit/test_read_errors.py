"""A read that fails (EIO, ESTALE, a permission, no memory) is an I/O error said as such, never a verdict on the
file: `--resume auto` stops with the line (exit 2) and moves nothing aside. A damaged file is still named
truncated and set aside. A store fsspec reaches but that lacks S3's API is refused in one line."""

from __future__ import annotations

import errno

import pytest
import torch

from brain_trainer import checkpointing as ck
from brain_trainer.checkpointing import loading


def saved(folder, name: str = ck.LAST, step: int = 1):
    ck.save_checkpoint({"global_step": step, "w": torch.ones(4)}, str(folder / name))
    return folder / name


def failing_load(error: BaseException):
    def load(*args, **kwargs):
        raise error

    return load


@pytest.mark.parametrize(
    "error, said",
    [
        (OSError(errno.EIO, "Input/output error"), r"could not be read \(Input/output error\): an I/O error"),
        (OSError(errno.ESTALE, "Stale file handle"), r"could not be read \(Stale file handle\): an I/O error"),
        (PermissionError(errno.EACCES, "Permission denied"), r"could not be read \(Permission denied\)"),
        (MemoryError(), r"not enough memory to load it"),
    ],
)
def test_a_failed_read_is_an_io_error_naming_the_file(tmp_path, monkeypatch, error, said):
    path = saved(tmp_path)
    monkeypatch.setattr(loading.torch, "load", failing_load(error))
    with pytest.raises(ck.ReadError, match=rf"^{path}: {said}"):
        ck.load_checkpoint(str(path))


def test_resume_auto_stops_on_an_io_error_and_moves_nothing_aside(tmp_path, monkeypatch):
    saved(tmp_path, ck.LAST, step=2)
    saved(tmp_path, ck.BEST, step=1)
    monkeypatch.setattr(loading.torch, "load", failing_load(OSError(errno.EIO, "Input/output error")))
    lines = []
    with pytest.raises(ck.ReadError, match="an I/O error"):
        ck.find_latest_checkpoint(ck.LocalStorage(str(tmp_path)), log=lines.append)
    assert lines == [] and sorted(p.name for p in tmp_path.iterdir()) == sorted([ck.BEST, ck.LAST])
    monkeypatch.undo()
    assert ck.find_latest_checkpoint(ck.LocalStorage(str(tmp_path))).location == str(tmp_path / ck.LAST)


def test_a_truncated_file_is_still_damaged_and_skipped_by_resume_auto(tmp_path):
    saved(tmp_path, ck.BEST, step=1)
    last = saved(tmp_path, ck.LAST, step=2)
    last.write_bytes(last.read_bytes()[:-200])
    lines = []
    found = ck.find_latest_checkpoint(ck.LocalStorage(str(tmp_path)), log=lines.append)
    assert found.location == str(tmp_path / ck.BEST)
    assert [name for name, _ in found.unreadable] == [ck.LAST]
    assert "truncated or not a PyTorch checkpoint" in lines[0]


def test_an_fsspec_store_without_s3s_api_is_refused_in_one_line_naming_what_is_missing():
    with pytest.raises(ck.CheckpointError) as refused:
        ck.open_storage("memory://bucket/run")
    line = str(refused.value)
    assert "\n" not in line and line.startswith("memory://bucket/run: memory:// is not supported")
    assert "conditional writes" in line and "MemoryFileSystem" in line and "s3://" in line
