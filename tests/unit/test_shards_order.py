"""The order over shards is a pure function of (seed, epoch), local to a window of shards, and its position is a
sample count: every world size reads the same global batches, and a resume starts at the same sample."""

from __future__ import annotations

import numpy as np
import pytest

from brain_trainer.data.shards_order import ShardOrder, ShardSampler

SIZES = np.array([7, 3, 10, 0, 5, 9, 4, 6, 8])  # uneven, one empty


def test_an_epoch_order_is_a_permutation_and_a_pure_function_of_seed_and_epoch():
    order = ShardOrder(SIZES, seed=3)
    epoch0 = order.epoch_order(0)
    assert sorted(epoch0.tolist()) == list(range(SIZES.sum()))
    assert np.array_equal(ShardOrder(SIZES, seed=3).epoch_order(0), epoch0)
    assert not np.array_equal(order.epoch_order(1), epoch0)
    assert not np.array_equal(ShardOrder(SIZES, seed=4).epoch_order(0), epoch0)


def test_each_window_reads_only_its_own_shards():
    order = ShardOrder(SIZES, seed=0, window=2)
    shard_of = np.repeat(np.arange(len(SIZES)), SIZES)
    position = 0
    for window, shards in enumerate(order.windows(5)):
        samples = order.window_samples(5, window)
        assert set(shard_of[samples]) <= set(shards.tolist())
        assert np.array_equal(order.epoch_order(5)[position : position + len(samples)], samples)
        position += len(samples)


@pytest.mark.parametrize("start", [0, 1, 9, 10, 33, 61, 62])
def test_iterating_from_a_position_is_the_rest_of_the_order(start):
    order = ShardOrder(SIZES, seed=1, window=3)
    rest = [sample for sample, _ in order.iterate(2, start)]
    assert rest == order.epoch_order(2)[start:].tolist()


def _steps(sampler: ShardSampler) -> list[list[int]]:
    keys = [sample for _, sample, _ in sampler]
    return [keys[i : i + sampler.local_batch] for i in range(0, len(keys), sampler.local_batch)]


def _global_batches(order: ShardOrder, world_size: int, epoch: int, samples_seen: int) -> list[list[int]]:
    """Each step's global batch, gathered from every process's slice in rank order."""
    per_rank = []
    for rank in range(world_size):
        sampler = ShardSampler(order, global_batch=8, rank=rank, world_size=world_size)
        sampler.set_position(epoch, samples_seen)
        per_rank.append(_steps(sampler))
    return [sum((steps[step] for steps in per_rank), []) for step in range(len(per_rank[0]))]


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_gathered_slices_are_the_one_process_batches_at_any_world_size(world_size):
    order = ShardOrder(SIZES, seed=7, window=2)
    whole = order.epoch_order(1).tolist()
    batches = _global_batches(order, world_size, epoch=1, samples_seen=0)
    assert batches == [whole[i : i + 8] for i in range(0, len(whole) - 7, 8)]  # the short last batch dropped


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_a_resume_at_any_world_size_continues_at_the_same_sample(world_size):
    order = ShardOrder(SIZES, seed=7, window=2)
    uninterrupted = _global_batches(order, 1, epoch=3, samples_seen=0)
    resumed = _global_batches(order, world_size, epoch=3, samples_seen=3 * 8)
    assert resumed == uninterrupted[3:]
    sampler = ShardSampler(order, global_batch=8, rank=0, world_size=world_size)
    sampler.set_position(3, 3 * 8)
    assert len(sampler) == len(resumed) * 8 // world_size


def test_a_global_batch_that_does_not_divide_by_the_processes_is_refused():
    with pytest.raises(ValueError, match="does not divide"):
        ShardSampler(ShardOrder(SIZES, seed=0), global_batch=6, rank=0, world_size=4)
