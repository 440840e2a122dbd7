"""The run's checkpoints, owned by one object (torchtitan's CheckpointManager, timm's CheckpointSaver): the
`Checkpointer` is given the stateful parts and the policy, and at a step boundary its `save` decides the names,
gathers every process's RNG, builds the format-3 dict and hands it to the writer on the main process only. The
loop asks it whether a save is due and calls it; it knows no file name and no schema.

Every process calls every method here at the same step boundary: the RNG gather is a collective, and the
main-only part goes through `runtime.on_main`, which hands its error to every process. That is the one place
deciding that only the main process writes: a sharded or per-process writer changes this module (and the
writer under it), not the loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from brain_trainer.checkpointing.base import Storage
from brain_trainer.checkpointing.folder import checkpoint_names
from brain_trainer.checkpointing.format import (
    BEST,
    LAST,
    CheckpointError,
    capture_rng_state,
    make_checkpoint,
    snapshot_name,
)
from brain_trainer.checkpointing.writer import CheckpointWriter


@dataclass(frozen=True)
class RunRecord:
    """What every checkpoint of this run carries besides tensors and the train state."""

    config: dict  # every setting of the run
    tokenizer_json: str | None
    fingerprint: dict  # of the training data
    lineage: dict  # this run's id, its parent's, when it started
    data: dict  # where the data is (root_dir, annotations): eval and a resume find it without --root_dir


@dataclass(frozen=True)
class SavePolicy:
    every_steps: int = 0  # --save_every_steps: also save `last` every N optimizer steps (0: epoch ends and stops)
    keep_last: int = 0  # --keep_last: epoch snapshots kept (0: none written)
    background: bool = True  # persist in a writer thread (--sync_saves: in the loop)


@dataclass(frozen=True)
class Saved:
    location: str  # the path or URL written (its first name)
    stall: float  # seconds the loop was blocked
    improved: bool = False  # a new best validation loss (epoch ends)


class State(Protocol):
    """Where the run is (`trainer.TrainState`): its fields by name, and the best validation loss so far."""

    best_val: float | None

    def state_dict(self) -> dict: ...


class Collectives(Protocol):
    """What the checkpointer needs of the runtime."""

    def gather_objects(self, value: object) -> list: ...
    def on_main(self, action): ...


class Checkpointer:
    """The run's saves: when (`due`), under which names (`save`, `save_epoch_end`), what (the whole state, from
    the parts it was given), and who writes (the main process, through a `CheckpointWriter`)."""

    def __init__(
        self,
        *,
        storage: Storage,
        runtime: Collectives,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        state: State,
        record: RunRecord,
        policy: SavePolicy,
    ):
        self.storage, self.runtime, self.policy, self.record = storage, runtime, policy, record
        self.model, self.optimizer, self.scaler, self.state = model, optimizer, scaler, state  # the plain model
        self.writer = CheckpointWriter(storage=storage, keep_last=policy.keep_last, background=policy.background)
        self.last_saved: str | None = None  # the path or URL of the latest save
        self.last = storage.location(LAST)  # where the latest state is (what a second Ctrl-C names)

    def due(self, global_step: int) -> bool:
        """Whether the policy saves at this step boundary (besides epoch ends and stops)."""
        return bool(self.policy.every_steps) and global_step % self.policy.every_steps == 0

    def save(self) -> Saved:
        """Save where the run stands as `last` (a periodic save, a stop)."""
        return self._save([LAST])

    def save_epoch_end(self, epoch: int, val_loss: float) -> Saved:
        """At the end of `epoch` (the state already at the next one): `last`, `best` when `val_loss` beats the
        best so far (recorded in the state first, so the file carries it), and the epoch's snapshot when kept."""
        improved = self.state.best_val is None or val_loss < self.state.best_val
        if improved:
            self.state.best_val = val_loss
        kept = [snapshot_name(epoch)] if self.policy.keep_last else []
        saved = self._save([LAST] + ([BEST] if improved else []) + kept)
        return Saved(saved.location, saved.stall, improved)

    def _save(self, names: list[str]) -> Saved:
        checkpoint = self.checkpoint(self.runtime.gather_objects(capture_rng_state()))  # every process: a collective
        stall = self.runtime.on_main(lambda: self.writer.save(checkpoint, names))  # its error on every process
        self.last_saved = self.storage.location(names[0])
        return Saved(self.last_saved, stall)

    def checkpoint(self, rng_states: list[dict]) -> dict:
        """The format-3 dict of the run as it stands (tensors by reference: the writer snapshots them)."""
        return make_checkpoint(
            model=self.model,
            optimizer=self.optimizer,
            scaler=self.scaler,
            train_state=self.state.state_dict(),
            fingerprint=self.record.fingerprint,
            config=self.record.config,
            tokenizer=self.record.tokenizer_json,
            data=self.record.data,
            rng_states=rng_states,
            run=self.record.lineage,
        )

    def failed(self) -> bool:
        """Whether the persist in flight has failed (only the main process persists: elsewhere always False);
        agreed over the processes at the step boundary."""
        return self.writer.failed()

    def wait(self) -> None:
        """Wait until the save in flight is durable; the main process's CheckpointError is raised on every
        process, which all leave here together (none waits in a collective for one that has gone)."""
        self.runtime.on_main(self.writer.wait)

    def raise_failure(self) -> None:
        """After the processes agreed that a persist failed: its error, on every process."""
        self.wait()
        raise CheckpointError("the main process could not write a checkpoint (it says which and why)")

    def files(self) -> list[str]:
        """The checkpoint files in the folder now (for the closing summary)."""
        return checkpoint_names(self.storage)

    def close(self) -> None:
        """Wait for the persist in flight and stop the writer thread; raises the persist's error, if any."""
        self.writer.close()
