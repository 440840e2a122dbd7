"""A run's shards: the indexes of `--train_shards` (and `--val_shards`) built on the main process and loaded by
every process, the startup checks, the validation split over shards, and the training dataset and sampler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from brain_trainer.data.annotations import Split
from brain_trainer.data.augment import TrainAugment
from brain_trainer.data.shards import ShardError, ShardIndex, is_remote, load_index
from brain_trainer.data.shards_order import WINDOW_SHARDS, ShardOrder, ShardSampler
from brain_trainer.data.shards_reader import ShardDataset, ShardImages, ShardReader, minimum_cache_bytes
from brain_trainer.run_log import RunLog
from brain_trainer.runtime import Runtime


@dataclass
class ShardData:
    train: ShardIndex
    train_pattern: str
    val: ShardIndex | None
    val_pattern: str | None
    storage_options: dict
    cache_dir: Path  # the index in cache_dir/shard_index, remote shards in cache_dir/shard_cache
    cache_bytes: int

    def reader(self, index: ShardIndex) -> ShardReader:
        return ShardReader(
            index.shards,
            storage_options=self.storage_options,
            cache_dir=self.cache_dir / "shard_cache",
            cache_bytes=self.cache_bytes,
        )

    def val_images(self) -> ShardImages:
        """The validation images' pixels, in `val_split`'s image order."""
        return ShardImages(self.val, self.reader(self.val))

    def record(self) -> dict:
        """Where the shards are, for the checkpoint: a resume finds them without the flags."""
        return {"train_shards": self.train_pattern, "val_shards": self.val_pattern}


def load_shards(
    *,
    train_shards: str,
    val_shards: str | None,
    storage_options: dict,
    cache_dir: Path,
    shard_cache_gb: float,
    runtime: Runtime,
    log: RunLog,
) -> ShardData:
    """The shards' indexes: built (or found up to date) by the main process, then read by every process. A
    missing shard or an unreachable store is one line on every process."""
    index_dir = Path(cache_dir) / "shard_index"
    patterns = [(train_shards, "--train_shards"), *([(val_shards, "--val_shards")] if val_shards else [])]

    def load(pattern: str, flag: str, progress: bool = False) -> ShardIndex:
        return load_index(pattern, index_dir=index_dir, storage_options=storage_options, flag=flag, progress=progress)

    runtime.on_main(lambda: [load(pattern, flag, log.interactive).built for pattern, flag in patterns])
    train = load(train_shards, "--train_shards")  # found up to date: read, not built again
    val = load(val_shards, "--val_shards") if val_shards else None
    for index, pattern in ((train, train_shards), (val, val_shards)):
        if index is None:
            continue
        for problem in index.problems:
            log.print(f"⚠ {problem}")
        log.print(f"Data: {pattern}: {len(index.shards)} shards, {len(index)} samples (one per caption)")
    data = ShardData(train, train_shards, val, val_shards, storage_options, Path(cache_dir), int(shard_cache_gb * 1e9))
    check_cache(data)
    return data


def check_cache(data: ShardData) -> None:
    """A shard cache that cannot hold what the loader reads at once is refused at startup, naming the minimum."""
    needed = minimum_cache_bytes(data.train.shards, WINDOW_SHARDS)
    if is_remote(data.train.shards[0].url) and data.cache_bytes and data.cache_bytes < needed:
        raise ShardError(
            f"--shard_cache_gb {data.cache_bytes / 1e9:g}: too small for three windows of {WINDOW_SHARDS} of the "
            f"largest shards; give at least {needed / 1e9:.2f}, or 0 to read each sample's bytes from the store"
        )


def val_split(data: ShardData) -> Split:
    """The validation split over `--val_shards`: its images (each once, named SHARD/KEY) and their captions."""
    index = data.val
    image_of = index.image_of()
    first = ShardImages.first_samples(image_of)
    names = [index.sample_name(int(sample)) for sample in first]
    return Split("val", Path(data.val_pattern), names, list(index.captions), image_of.tolist())


def train_dataset(
    data: ShardData, *, image_size: int, hflip: bool, batch_size: int, seed: int, runtime: Runtime
) -> tuple[ShardDataset, ShardSampler]:
    """The training samples over `--train_shards` and this process's sampler (slice r of each global batch)."""
    order = ShardOrder(data.train.samples_per_shard(), seed)
    sampler = ShardSampler(order, batch_size, runtime.rank, runtime.world_size)
    augment = TrainAugment(image_size, hflip=hflip)
    return ShardDataset(data.train, data.reader(data.train), order, augment, seed), sampler
