"""The trackers that write into --logdir: TensorBoard's event files (through the run log's EventFiles, which
refuses a linked folder and stops the run on a write error) and `metrics.jsonl`."""

from __future__ import annotations

import errno
import json
import os
import shlex
import stat
from pathlib import Path

from brain_trainer.config import ConfigError
from brain_trainer.run_log import EventFiles
from brain_trainer.tracking import TrackedRun, Tracker, Warn

METRICS_FILE = "metrics.jsonl"


class TensorBoardTracker(Tracker):
    """Event files; `purge_step` drops events an earlier start logged past this checkpoint, so curves never
    overlap. A write error is not dropped like another tracker's: EventFiles stops the run (`failure`)."""

    name, title = "tensorboard", "TensorBoard"

    def __init__(self, logdir: str, events: EventFiles):
        self.logdir, self.events = logdir, events

    @classmethod
    def open(cls, run: TrackedRun, warn: Warn) -> TensorBoardTracker:
        events = EventFiles(stop=run.stop)
        events.open(run.logdir, run.purge_step)
        return cls(run.logdir, events)

    @property
    def failure(self) -> str | None:
        return self.events.failure

    def log(self, values: dict[str, float], step: int, epoch: int) -> None:
        self.events.write(lambda writer: [writer.add_scalar(tag, value, step) for tag, value in values.items()])

    def config(self, config: dict, step: int) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(config.items()))
        self.events.write(lambda writer: writer.add_text("config", text, step))

    def image(self, tag: str, image, step: int) -> None:
        self.events.write(lambda writer: writer.add_image(tag, image, step))

    def where(self) -> str:
        return f"TensorBoard: {self.logdir} (view it with: {shlex.join(['tensorboard', '--logdir', str(self.logdir)])})"

    def flush(self) -> None:
        self.events.write(lambda writer: writer.flush())

    def close(self, outcome: str) -> None:
        self.events.write(lambda writer: writer.close())
        self.events.writer = None


class JsonlTracker(Tracker):
    """`metrics.jsonl`: one JSON object a step at which anything is logged (`step`, `epoch`, then every scalar by
    its TensorBoard name): each --log_every step, each epoch end's evaluation. What is logged later at the same
    step (the save's stall, the evaluation) joins that step's row, which is rewritten in place. Each write goes
    straight to the file (no buffer), so a killed run's file ends at its last logged step; a resume first drops
    the rows past its checkpoint, as TensorBoard's purge does, so the file equals the uninterrupted run's."""

    name, title = "jsonl", METRICS_FILE

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd
        self.row: dict | None = None  # the last row, and where it starts in the file
        self.row_at = self.end = 0

    @classmethod
    def open(cls, run: TrackedRun, warn: Warn) -> JsonlTracker:
        path = Path(run.logdir) / METRICS_FILE
        try:  # never through a link planted at the name, and never into something other than a regular file
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            reason = (
                "is a symbolic link; remove it"
                if error.errno == errno.ELOOP
                else f"cannot be opened ({error.strerror})"
            )
            raise ConfigError(
                f"--logdir {run.logdir}: {METRICS_FILE} {reason} (or leave jsonl out of --report_to)"
            ) from None
        tracker = cls(path, fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"--logdir {run.logdir}: {METRICS_FILE} is not a regular file; remove it")
            tracker.keep_before(run.purge_step, warn)
        except BaseException:
            os.close(fd)
            raise
        return tracker

    def keep_before(self, purge_step: int, warn: Warn) -> None:
        """Drop the rows at `purge_step` or later (on a fresh run, 0: all of them). The last row kept stays the
        open one, so that a step logged again after a resume (an evaluation after a stop at the epoch's last
        step) joins its row."""
        with open(self.fd, "rb", closefd=False) as file:
            lines = file.read().splitlines(keepends=True)
        for number, line in enumerate(lines, 1):
            row = _row(line)
            if row is None:
                warn(
                    f"⚠ {self.path}: line {number} is not a whole row (a crash while it was written?): "
                    f"dropped, with the {len(lines) - number} after it"
                )
                break
            if row["step"] >= purge_step:
                break
            self.row, self.row_at, self.end = row, self.end, self.end + len(line)
        os.ftruncate(self.fd, self.end)

    def log(self, values: dict[str, float], step: int, epoch: int) -> None:
        if self.row is not None and self.row["step"] == step:
            self.row.update(values)
        else:
            self.row, self.row_at = {"step": step, "epoch": epoch, **values}, self.end
        line = (json.dumps(self.row) + "\n").encode()
        if os.pwrite(self.fd, line, self.row_at) != len(line):
            raise OSError(errno.ENOSPC, f"{self.path}: a short write")
        self.end = self.row_at + len(line)
        os.ftruncate(self.fd, self.end)  # a rewritten row may be shorter than before

    def where(self) -> str:
        return f"Metrics: {self.path} (a JSON object a logged step)"

    def close(self, outcome: str) -> None:
        os.close(self.fd)


def _row(line: bytes) -> dict | None:
    """A whole row of the file, or None (a line cut short, or not one of this file's rows)."""
    if not line.endswith(b"\n"):
        return None
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None
