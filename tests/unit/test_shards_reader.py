"""Reading samples from shards: the same pixels for the same key, an undecodable image or a truncated shard
substituted and counted, the shard cache held to its bound, and ranged reads that fetch only a sample's bytes."""

from __future__ import annotations

import fsspec
import pytest
import torch
from shard_helpers import colour_shard, jpeg, truncate, write_tar

from brain_trainer.data.augment import TrainAugment
from brain_trainer.data.shards import load_index
from brain_trainer.data.shards_order import ShardOrder, ShardSampler
from brain_trainer.data.shards_reader import ShardDataset, ShardImages, ShardReader


def dataset(pattern: str, tmp_path, *, cache_bytes: int = 0, window: int = 2) -> ShardDataset:
    index = load_index(pattern, index_dir=tmp_path / "index")
    reader = ShardReader(index.shards, storage_options={}, cache_dir=tmp_path / "cache", cache_bytes=cache_bytes)
    order = ShardOrder(index.samples_per_shard(), seed=5, window=window)
    return ShardDataset(index, reader, order, TrainAugment(16), seed=5)


def epoch_keys(data: ShardDataset, epoch: int = 0) -> list[tuple[int, int, int]]:
    sampler = ShardSampler(data.order, global_batch=1)
    sampler.set_position(epoch)
    return list(sampler)


def test_a_key_gives_the_same_sample_on_every_read(tmp_path):
    for n in range(3):
        colour_shard(tmp_path / f"{n}.tar", first=10 * n, count=5)
    data = dataset(str(tmp_path / "{0..2}.tar"), tmp_path)
    key = epoch_keys(data)[7]
    first, second = data[key], data[key]
    assert torch.equal(first["image"], second["image"]) and first["caption"] == second["caption"]
    assert first["caption"] == data.index.captions[key[1]] and first["bad_files"] == []
    data.reader.close()


def test_an_undecodable_image_is_substituted_by_the_next_sample_and_reported(tmp_path):
    write_tar(
        tmp_path / "0.tar",
        {"a.jpg": b"not a jpeg", "a.txt": "broken", "b.jpg": jpeg((200, 0, 0)), "b.txt": "red"},
    )
    data = dataset(str(tmp_path / "0.tar"), tmp_path)
    sample = data[(0, 0, 0)]
    assert sample["caption"] == "red" and sample["bad_files"] == ["0.tar/a"]


def test_a_shard_truncated_after_indexing_substitutes_its_cut_samples(tmp_path):
    shard = colour_shard(tmp_path / "0.tar", first=0, count=4)
    data = dataset(str(shard), tmp_path)
    truncate(shard, int(data.index.offset[3]) + 5)  # the last image cut short; its index still names it
    sample = data[(0, 3, 0)]
    assert sample["bad_files"] == ["0.tar/000003"] and sample["caption"] == "image 0"
    data.reader.close()


@pytest.fixture
def memory_shards(tmp_path):
    """Eight shards on an fsspec store (memory://): remote to the reader, without a server."""
    store = fsspec.filesystem("memory")
    for n in range(8):
        store.pipe_file(f"/shards/{n}.tar", colour_shard(tmp_path / "src" / f"{n}.tar", 10 * n, 6).read_bytes())
    yield "memory://shards/{0..7}.tar"
    store.rm("/shards", recursive=True)


def test_the_shard_cache_stays_within_its_bound_and_downloads_each_shard_once_per_pass(tmp_path, memory_shards):
    shard_bytes = (tmp_path / "src" / "0.tar").stat().st_size
    data = dataset(memory_shards, tmp_path, cache_bytes=4 * shard_bytes + 100, window=2)  # two windows
    largest = 0
    for key in epoch_keys(data):
        data[key]
        with data.reader.cache.lock():  # a fetching thread may be evicting: look between its moves
            largest = max(largest, sum(path.stat().st_size for path in (tmp_path / "cache").glob("*.tar")))
    data.reader.close()
    total = sum((tmp_path / "src" / f"{n}.tar").stat().st_size for n in range(8))
    assert largest <= 4 * shard_bytes + 100
    assert data.reader.bytes_read == total  # every shard once: the window's samples all read from the cache


def test_without_a_cache_a_store_is_read_one_sample_range_at_a_time(tmp_path, memory_shards):
    data = dataset(memory_shards, tmp_path, cache_bytes=0)
    keys = epoch_keys(data)[:10]
    for key in keys:
        data[key]
    assert data.reader.bytes_read == sum(int(data.index.size[sample]) for _, sample, _ in keys)
    assert not (tmp_path / "cache").exists()


def test_evaluation_sees_each_image_of_the_shards_once(tmp_path):
    write_tar(
        tmp_path / "0.tar",
        {"a.jpg": jpeg((250, 0, 0)), "a.json": {"captions": ["x", "y"]}, "b.jpg": jpeg((0, 0, 250)), "b.txt": "z"},
    )
    index = load_index(str(tmp_path / "0.tar"), index_dir=tmp_path / "index")
    images = ShardImages(index, ShardReader(index.shards, storage_options={}, cache_dir=tmp_path, cache_bytes=0))
    assert list(index.image_of()) == [0, 0, 1] and len(images) == 2
    red, blue = images.load(0).float().mean((1, 2)), images.load(1).float().mean((1, 2))
    assert red[0] > 200 > red[2] and blue[2] > 200 > blue[0]
