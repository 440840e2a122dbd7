"""Where a run's scalars go besides the printed lines: TensorBoard, `metrics.jsonl`, MLflow, Weights & Biases
(`--report_to`). One interface, `Tracker`; the run log hands every scalar to `Trackers`, which fans it out, so
nothing in the trainer knows which trackers are on. Only the main process opens them.

A tracker is never a reason to lose training: one that cannot start stops the run before it trains (one line,
exit 2); one that fails mid-run is dropped with one ⚠ line and the run goes on without it.

This module imports no tracker library: config.py reads the names from it, and a tracker's module is imported
only when a run asks for it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# --report_to's names and where each tracker lives; the libraries the optional ones need, with their extras.
TRACKERS = {
    "tensorboard": "brain_trainer.tracking.files:TensorBoardTracker",
    "jsonl": "brain_trainer.tracking.files:JsonlTracker",
    "mlflow": "brain_trainer.tracking.mlflow_tracker:MLflowTracker",
    "wandb": "brain_trainer.tracking.wandb_tracker:WandbTracker",
}
LIBRARIES = {"mlflow": "MLflow", "wandb": "Weights & Biases"}  # the module and the extra share the name
DEFAULT_REPORT_TO = ("tensorboard", "jsonl")
OUTCOMES = ("finished", "stopped", "failed")  # how a run ended, for the trackers that record it

Warn = Callable[[str], None]


def missing_library(name: str) -> str | None:
    """The line for a --report_to tracker whose library is not installed; None when it is (or needs none)."""
    if name not in LIBRARIES or importlib.util.find_spec(name) is not None:
        return None
    return f"{LIBRARIES[name]} is not installed: pip install 'brain-trainer[{name}]'"


def one_line(error: BaseException) -> str:
    """An exception as one short line: the first line of its message, or its type."""
    text = str(error).strip().splitlines()
    return (text[0][:200] if text else "") or type(error).__name__


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker needs to open."""

    logdir: str
    folder: str  # the run's folder name: MLflow's experiment and W&B's project unless their variables name one
    run_name: str | None
    purge_step: int  # what an earlier start logged at this step or later is dropped (0 on a fresh run), as TensorBoard
    run_ids: dict[str, str] = field(default_factory=dict)  # the checkpoint's tracker runs: a resume reattaches them
    stop: object = None  # the run's stop flag: a --logdir write failure stops the run (TensorBoard's EventFiles)


class Tracker:
    """One place a run's scalars go. `log` is the only method every tracker needs; the rest default to nothing.
    `run_id` names the tracker's own run, recorded in the checkpoint so that a resume continues it."""

    name = ""
    title = ""  # as the lines name it
    run_id: str | None = None
    failure: str | None = None  # a local write failure that stops the run (exit 2) rather than the tracker

    @classmethod
    def open(cls, run: TrackedRun, warn: Warn) -> Tracker:
        """Start or reattach; raises ConfigError (one line naming the tracker and how to leave it out)."""
        raise NotImplementedError

    def log(self, values: dict[str, float], step: int, epoch: int) -> None:
        raise NotImplementedError

    def config(self, config: dict, step: int) -> None:
        """The run's settings (what the checkpoint saves); trackers that keep them do so once per tracker run."""

    def image(self, tag: str, image, step: int) -> None:
        """A CHW image tensor; trackers without images ignore it."""

    def summary(self, values: dict[str, float | str]) -> None:
        """The run's summary: the latest epoch's retrieval figures, the checkpoints' locations."""

    def where(self) -> str | None:
        """The line of the closing summary that says where this tracker's record is."""
        return None

    def flush(self) -> None:
        pass

    def close(self, outcome: str) -> None:
        pass


class Trackers:
    """The run's trackers, fed from one place. A call that raises drops that tracker with one ⚠ line; the
    others go on. Each call keeps Python's global RNG as it was (MLflow draws from it), so a run with trackers
    trains, and saves, exactly as one without."""

    def __init__(self, trackers: list[Tracker] | None = None, *, warn: Warn = print):
        self.trackers, self.warn = list(trackers or []), warn

    @property
    def names(self) -> list[str]:
        return [tracker.name for tracker in self.trackers]

    @property
    def failure(self) -> str | None:
        return next((tracker.failure for tracker in self.trackers if tracker.failure), None)

    def run_ids(self) -> dict[str, str]:
        return {tracker.name: tracker.run_id for tracker in self.trackers if tracker.run_id}

    def log(self, values: dict[str, float], step: int, epoch: int) -> None:
        self._each(lambda tracker: tracker.log(values, step, epoch))

    def config(self, config: dict, step: int) -> None:
        self._each(lambda tracker: tracker.config(config, step))

    def image(self, tag: str, image, step: int) -> None:
        self._each(lambda tracker: tracker.image(tag, image, step))

    def summary(self, values: dict[str, float | str]) -> None:
        self._each(lambda tracker: tracker.summary(values))

    def where(self) -> list[str]:
        return [line for tracker in self.trackers if (line := tracker.where())]

    def flush(self) -> None:
        self._each(lambda tracker: tracker.flush())

    def close(self, outcome: str) -> None:
        self._each(lambda tracker: tracker.close(outcome))
        self.trackers = []

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                with python_rng_kept():
                    call(tracker)
            except Exception as error:  # whatever a tracker's library raises: never a reason to lose training
                self.trackers.remove(tracker)
                rest = ", ".join(other.title for other in self.trackers)
                self.warn(
                    f"⚠ {tracker.title} failed ({one_line(error)}): the run goes on without it"
                    + (f", logging to {rest}" if rest else "")
                )


@contextlib.contextmanager
def python_rng_kept() -> Iterator[None]:
    """Python's global RNG as it was before, whatever the block draws from it."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


def open_trackers(names: tuple[str, ...], run: TrackedRun, *, warn: Warn = print) -> Trackers:
    """Open the trackers named (--report_to), in order; if one cannot start, those already open are closed and
    its ConfigError goes on."""
    opened = Trackers(warn=warn)
    try:
        for name in names:
            module, _, cls = TRACKERS[name].partition(":")
            with python_rng_kept():
                opened.trackers.append(getattr(importlib.import_module(module), cls).open(run, warn))
    except BaseException:
        opened.close("failed")
        raise
    return opened
