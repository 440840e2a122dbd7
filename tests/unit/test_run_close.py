"""The assembled run releases what it holds in reverse order on every path, and the first error wins: the lock
is released even when the checkpointer's close raises, and the loop's own error is not replaced by the
writer's (which is still said, in a ⚠ line)."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
from helpers import run_args

from brain_trainer import build
from brain_trainer.checkpointing import CheckpointError, LocalStorage, claim_savedir
from brain_trainer.config import parse_args
from brain_trainer.run_log import RunLog
from brain_trainer.runtime import Runtime
from brain_trainer.trainer import TrainingError


class Recorder:
    def __init__(self):
        self.released: list[str] = []
        self.errors: list[str] = []

    def release(self, name: str, error: Exception | None = None):
        def release() -> None:
            self.released.append(name)
            if error is not None:
                raise error

        return release


class Log(RunLog):
    def __init__(self, recorder: Recorder):
        super().__init__(enabled=False)
        self.recorder = recorder

    def error(self, line: str) -> None:
        self.recorder.errors.append(line)


def held(recorder: Recorder, close_error: Exception | None) -> ExitStack:
    stack = ExitStack()
    for name, error in (("lock", None), ("loader workers", None), ("checkpointer", close_error), ("tensorboard", None)):
        stack.push(build.releasing(recorder.release(name, error), Log(recorder)))
    return stack


def test_everything_is_released_in_reverse_order_and_the_lock_last_when_the_checkpointer_close_raises():
    recorder = Recorder()
    with pytest.raises(CheckpointError, match="could not write last"):
        with held(recorder, CheckpointError("could not write last")):
            pass
    assert recorder.released == ["tensorboard", "checkpointer", "loader workers", "lock"]
    assert recorder.errors == [], "with nothing failed before, the close's error is the run's error"


def test_the_loops_error_wins_over_the_writers_which_is_said_in_one_line():
    recorder = Recorder()
    with pytest.raises(TrainingError, match="loss is nan"):
        with held(recorder, CheckpointError("could not write last: disk full")):
            raise TrainingError("loss is nan at step 3")
    assert recorder.released == ["tensorboard", "checkpointer", "loader workers", "lock"]
    assert recorder.errors == ["⚠ Also, while closing after that: could not write last: disk full"]


def test_a_real_assembled_run_releases_its_folder_lock_when_the_checkpointers_close_raises(
    sample_root, tmp_path, monkeypatch
):
    runtime = Runtime.start("cpu")
    try:
        assembled = build.build(parse_args(run_args(sample_root, tmp_path)), runtime, RunLog(enabled=False))
        savedir = LocalStorage(str(tmp_path / "ckpt"))
        with pytest.raises(CheckpointError, match="--savedir .*another run"):
            claim_savedir(savedir, resume=None, overwrite=False, unreadable=[]).release()  # the run holds it

        def failing_close() -> None:
            raise CheckpointError("could not write last: the store is gone")

        monkeypatch.setattr(assembled.trainer.checkpointer.writer, "close", failing_close)
        with pytest.raises(TrainingError, match="the loop failed"):
            with assembled:
                raise TrainingError("the loop failed")
        claim_savedir(savedir, resume=None, overwrite=False, unreadable=[]).release()  # free again
    finally:
        runtime.close()
