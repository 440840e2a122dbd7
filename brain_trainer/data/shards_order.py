"""The order of an epoch over shards, a pure function of (seed, epoch), and the sampler whose state is a sample count.

The order of epoch e: the shards in a permutation drawn from (seed, e), cut into windows of `window` shards;
the samples of window w (every sample of its shards) in a permutation drawn from (seed, e, w); the windows one
after another. Reads stay within a few shards at a time (the cache holds a window and reads the next one
ahead) while a sample meets others from `window` shards; memory is one window's sample ids. Nothing in it
depends on the world size: the sampler cuts global batches from this one order and process r takes slice r,
exactly as `ResumableSampler` does for files, so a resume at any world size starts at the same sample.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from brain_trainer.runtime.seeding import derive_seed

WINDOW_SHARDS = 4  # shards whose samples are shuffled together (the cache holds two windows)


def _permutation(n: int, *keys: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(derive_seed(*keys))
    return torch.randperm(n, generator=generator).numpy()


class ShardOrder:
    """Epoch orders over shards of `samples_per_shard` samples (global sample ids run through each shard)."""

    def __init__(self, samples_per_shard: np.ndarray, seed: int, window: int = WINDOW_SHARDS):
        self.sizes = np.asarray(samples_per_shard, dtype=np.int64)
        self.starts = np.cumsum(self.sizes) - self.sizes
        self.seed, self.window = seed, window
        self.num_samples = int(self.sizes.sum())

    def windows(self, epoch: int) -> list[np.ndarray]:
        """The shards of each window of the epoch, in reading order."""
        shards = _permutation(len(self.sizes), self.seed, epoch)
        return [shards[start : start + self.window] for start in range(0, len(shards), self.window)]

    def window_samples(self, epoch: int, window: int) -> np.ndarray:
        """The sample ids of one window, in the epoch's order."""
        shards = self.windows(epoch)[window]
        ids = np.concatenate([np.arange(self.starts[s], self.starts[s] + self.sizes[s]) for s in shards])
        return ids[_permutation(len(ids), self.seed, epoch, window)]

    def iterate(self, epoch: int, start: int = 0) -> Iterator[tuple[int, int]]:
        """(sample id, window) from position `start` of the epoch's order on; windows before it are never drawn."""
        windows = self.windows(epoch)
        ends = np.cumsum([int(self.sizes[shards].sum()) for shards in windows])
        first = int(np.searchsorted(ends, start, side="right"))
        for window in range(first, len(windows)):
            skip = start - (int(ends[window - 1]) if window else 0)
            for sample in self.window_samples(epoch, window)[max(0, skip) :].tolist():
                yield sample, window

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The whole order of an epoch (for tests and small data; training iterates)."""
        return np.array([sample for sample, _ in self.iterate(epoch)], dtype=np.int64)


class ShardSampler(Sampler[tuple[int, int, int]]):
    """Yields this process's (epoch, sample id, window) keys of one epoch, `samples_seen` samples into its order.

    Its whole state is (epoch, samples_seen), counted in samples over all processes: the rest of the order is
    cut into global batches of `global_batch` (a short last one is dropped) and process r takes slice r of
    each, so the processes' rows gathered in rank order are the one-process batch, at any world size.
    """

    def __init__(self, order: ShardOrder, global_batch: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not divide by {world_size} processes")
        self.order, self.global_batch = order, global_batch
        self.rank, self.local_batch = rank, global_batch // world_size
        self.epoch, self.samples_seen = 0, 0

    def set_position(self, epoch: int, samples_seen: int = 0) -> None:
        self.epoch, self.samples_seen = epoch, samples_seen

    def steps_left(self) -> int:
        return max(0, self.order.num_samples - self.samples_seen) // self.global_batch

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        steps, batch = self.steps_left(), []
        first, last = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        for sample, window in self.order.iterate(self.epoch, self.samples_seen):
            if steps == 0:
                return
            batch.append((sample, window))
            if len(batch) == self.global_batch:
                for sample_id, window_id in batch[first:last]:
                    yield self.epoch, sample_id, window_id
                batch, steps = [], steps - 1

    def __len__(self) -> int:
        return self.steps_left() * self.local_batch
