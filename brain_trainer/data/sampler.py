"""The resumable sampler: an epoch's order as a function of (seed, epoch), its state (epoch, samples_seen)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from brain_trainer.runtime.seeding import derive_seed


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields this process's (epoch, index) keys of one epoch, starting `samples_seen` samples into its order.

    The order of epoch e is a permutation drawn from (seed, e). Its whole state is (epoch, samples_seen),
    counted in samples over all processes, not in batches, so a resume with another batch size or world size
    starts at the right sample; skipped samples are never loaded. The rest of the order is cut into global
    batches of `global_batch` samples (a short last one is dropped), and process r takes slice r of each:
    gathered in rank order, the processes' rows are the one-process batch, row for row.
    """

    def __init__(self, num_samples: int, seed: int, global_batch: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not divide by {world_size} processes")
        self.num_samples, self.seed, self.global_batch = num_samples, seed, global_batch
        self.rank, self.local_batch = rank, global_batch // world_size
        self.epoch, self.samples_seen = 0, 0

    def set_position(self, epoch: int, samples_seen: int = 0) -> None:
        self.epoch, self.samples_seen = epoch, samples_seen

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def steps_left(self) -> int:
        return max(0, self.num_samples - self.samples_seen) // self.global_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        remaining = self.epoch_order(self.epoch)[self.samples_seen :]
        for step in range(self.steps_left()):
            start = step * self.global_batch + self.rank * self.local_batch
            for index in remaining[start : start + self.local_batch].tolist():
                yield self.epoch, index

    def __len__(self) -> int:
        return self.steps_left() * self.local_batch
