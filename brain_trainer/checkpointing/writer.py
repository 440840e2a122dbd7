"""Saves that do not stall training: `CheckpointWriter.save` snapshots the state into CPU buffers at the step
boundary and a background thread persists it through the storage (write once, publish the other names,
rotate), whatever the storage is."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from brain_trainer.checkpointing.base import Storage
from brain_trainer.checkpointing.folder import rotate_snapshots
from brain_trainer.checkpointing.format import SNAPSHOT, CheckpointError, summary_of
from brain_trainer.checkpointing.storage import locate


class CheckpointWriter:
    """A snapshot at the step boundary and the persist behind it (the run's `Checkpointer` decides what and when).

    `save` copies the whole state into CPU memory (buffers reused across saves; pinned when it lives on a
    GPU) and returns; a background writer then persists it with `storage.write` (whole or not at all), so
    training goes on while the bytes reach the disk or the store. At most one persist is in flight: the next
    save waits for it. The first name is written once; the others (best, a kept epoch snapshot) are
    published from it, and rotation runs only after the new file is durable. A persist that fails is
    reported by `failed()` and raised by `wait()`. Its thread starts at the first background save, so a
    writer that is never asked to save (on processes other than the main one) holds none.
    """

    def __init__(self, *, storage: Storage, keep_last: int = 0, background: bool = True):
        self.storage, self.keep_last = storage, keep_last
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer") if background else None
        self._pending: Future | None = None
        self._buffers: dict[tuple, torch.Tensor] = {}

    def save(self, checkpoint: dict, names: list[str]) -> float:
        """Snapshot `checkpoint` and persist it under `names`; returns how long the caller was blocked (s)."""
        started = time.perf_counter()
        self.wait()
        snapshot = self._snapshot(checkpoint, ())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the non-blocking copies into pinned memory have landed
        if self._executor is None:
            self._persist(snapshot, names)
        else:
            self._pending = self._executor.submit(self._persist, snapshot, names)
        return time.perf_counter() - started

    def location(self, name: str) -> str:
        return self.storage.location(name)

    def _snapshot(self, value, key: tuple):
        if isinstance(value, torch.Tensor):
            buffer = self._buffers.get(key)
            if buffer is None or (buffer.shape, buffer.stride(), buffer.dtype) != (
                value.shape,
                value.stride(),
                value.dtype,
            ):
                # the same strides (channels-last weights stay channels-last in the file), in pinned memory on CUDA
                buffer = torch.empty_like(value, device="cpu", pin_memory=value.is_cuda)
                self._buffers[key] = buffer
            return buffer.copy_(value.detach(), non_blocking=value.is_cuda)
        if isinstance(value, dict):
            return {name: self._snapshot(item, (*key, name)) for name, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._snapshot(item, (*key, index)) for index, item in enumerate(value))
        return value  # numbers, strings, None: immutable

    def _persist(self, snapshot: dict, names: list[str]) -> None:
        self.storage.write(names[0], lambda handle: torch.save(snapshot, handle), summary=summary_of(snapshot))
        for name in names[1:]:
            self.storage.publish(names[0], name)
        kept = [name for name in names if SNAPSHOT.match(name)]
        if kept:
            try:
                rotate_snapshots(self.storage, self.keep_last, keep=kept[0])
            except OSError as error:
                raise CheckpointError(
                    f"could not remove an old epoch snapshot in {self.storage.url} "
                    f"({error.strerror or error}); the new checkpoints are written; check the "
                    f"folder's permissions or pass --keep_last 0"
                ) from None

    def failed(self) -> bool:
        """Whether the persist in flight has failed (without waiting for it)."""
        return self._pending is not None and self._pending.done() and self._pending.exception() is not None

    def wait(self) -> None:
        """Block until the last save is durable; raises its CheckpointError if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the persist in flight and stop the writer thread (also on an exception's way out)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)


def save_checkpoint(checkpoint: dict, location: str) -> None:
    """Write one checkpoint file atomically, in the calling thread (`ckpt convert`, tests, benchmarks)."""
    storage, name = locate(location)
    storage.write(name, lambda handle: torch.save(checkpoint, handle), summary=summary_of(checkpoint))
