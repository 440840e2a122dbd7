"""Weights & Biases (`--report_to wandb`): W&B's own settings apply (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE,
offline included, WANDB_DIR, `wandb login`); the project is the run's folder name unless WANDB_PROJECT names one.

One W&B run per training run: the checkpoint records its id and a resume reattaches it (`id=...,
resume="allow"`). W&B keeps a run's steps increasing: a step below the run's current one is dropped (W&B's rule,
applied here before logging so that a resume after a kill prints no warning a step). The steps a resume replays
hold the values already logged, bit for bit, so nothing is lost.
"""

from __future__ import annotations

import os
from pathlib import Path

from brain_trainer.config import ConfigError
from brain_trainer.tracking import TrackedRun, Tracker, Warn, one_line


class WandbTracker(Tracker):
    name, title = "wandb", "W&B"

    def __init__(self, handle, *, reattached: bool):
        self.handle, self.run_id, self.reattached = handle, handle.id, reattached

    @classmethod
    def open(cls, run: TrackedRun, warn: Warn) -> WandbTracker:
        try:
            import wandb
        except ImportError as error:
            raise ConfigError(f"--report_to wandb: {one_line(error)}: pip install 'brain-trainer[wandb]'") from None
        saved = run.run_ids.get("wandb")
        try:
            handle = wandb.init(
                project=None if os.environ.get("WANDB_PROJECT") else run.folder,
                name=run.run_name,
                id=saved,
                resume="allow" if saved else None,
            )
        except Exception as error:  # not logged in, no answer from the server, a bad setting
            raise ConfigError(
                f"--report_to wandb: could not start a W&B run ({one_line(error)}); log in (`wandb login` or "
                f"WANDB_API_KEY), or set WANDB_MODE=offline, or leave wandb out of --report_to"
            ) from None
        return cls(handle, reattached=saved is not None)

    def log(self, values: dict[str, float], step: int, epoch: int) -> None:
        if step >= self.handle.step:
            self.handle.log(values, step=step)

    def config(self, config: dict, step: int) -> None:
        if not self.reattached:  # once per W&B run
            self.handle.config.update(config)

    def summary(self, values: dict[str, float | str]) -> None:
        self.handle.summary.update(values)

    def where(self) -> str:
        if self.handle.offline:
            every_start = Path(self.handle.settings.sync_dir).parent / f"offline-run-*-{self.run_id}"
            return f"W&B: offline run {self.run_id} (upload each start of it with: wandb sync {every_start})"
        return f"W&B: {self.handle.url}"

    def close(self, outcome: str) -> None:
        if outcome == "stopped":
            self.handle.mark_preempting()  # resumed later: W&B shows it preempted, not failed
        self.handle.finish(exit_code=0 if outcome == "finished" else 1)
