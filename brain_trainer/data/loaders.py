"""A run's data: the splits and tokenizer, the image source of each split (the decode-once cache, or JPEGs),
and the loaders, sharded over the processes. Layouts (`layouts/`), images (`images.py`, `image_cache.py`),
datasets, the sampler and text live in their own modules; this one puts them together for a run.
"""

from __future__ import annotations

import multiprocessing
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from brain_trainer.config import ConfigError
from brain_trainer.data.annotations import SPLITS, DatasetError, Split
from brain_trainer.data.augment import TrainAugment
from brain_trainer.data.datasets import CaptionedImages, UniqueImages
from brain_trainer.data.image_cache import build_image_cache
from brain_trainer.data.images import CachedImages, ImageSource, JpegImages
from brain_trainer.data.layouts import DataSource, read_splits
from brain_trainer.data.sample_data import write_sample_dataset
from brain_trainer.data.sampler import ResumableSampler
from brain_trainer.data.shards_order import ShardSampler
from brain_trainer.data.shards_run import ShardData, train_dataset, val_split
from brain_trainer.data.text import CaptionCollator, pretrained_tokenizer, tokenizer_from_json, train_caption_tokenizer
from brain_trainer.run_log import RunLog
from brain_trainer.runtime import Runtime


@dataclass
class Data:
    splits: dict[str, Split]
    tokenizer: object
    tokenizer_json: str | None  # the scratch tokenizer, saved with the run
    record: dict  # where the data is and how it is split (`DataSource.record`), saved with the run
    shards: ShardData | None = None  # --train_shards: training (and with --val_shards, validation) from shards

    def train_samples(self) -> int:
        return len(self.shards.train) if self.shards else len(self.splits["train"])

    def fingerprint(self) -> dict:
        """Of the training data: tells whether a resume sees the same data."""
        return self.shards.train.fingerprint() if self.shards else self.splits["train"].fingerprint()


def load_data(
    *,
    root_dir: Path | None,
    annotations: str,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    demo: bool,
    text_encoder: str,
    vocab_size: int,
    saved_tokenizer: str | None,
    runtime: Runtime,
    log: RunLog,
    shards: ShardData | None = None,
) -> Data:
    """Read the annotations and make the tokenizer (from the checkpoint, trained on captions, or pretrained).
    The demo data is written by the main process, once; the others wait for it. With shards, training (and with
    --val_shards, validation) comes from them; --root_dir, when given, holds the other splits."""
    if demo:  # decided on the main process: a collective must not depend on what each process sees on disk
        runtime.on_main(lambda: write_demo_data(root_dir, log))
    splits, record = {name: Split(name, Path()) for name in SPLITS}, {}
    if root_dir is not None:
        source = DataSource(root_dir, annotations, val_fraction, test_fraction)
        splits, record = read_files(source, log), source.record()
    if shards is not None:
        record = {**record, **shards.record()}
    if shards is not None and shards.val is not None:
        splits["val"] = val_split(shards)
    if text_encoder != "scratch":
        return Data(splits, pretrained_tokenizer(text_encoder), None, record, shards)
    if saved_tokenizer is not None:
        try:
            return Data(splits, tokenizer_from_json(saved_tokenizer), saved_tokenizer, record, shards)
        except Exception as error:  # tokenizers raises its own exception type for malformed JSON
            raise ConfigError(
                f"the checkpoint's field 'tokenizer' cannot be read ({str(error).splitlines()[0]}); "
                f"the file is damaged: resume from another checkpoint"
            ) from None
    captions = shards.train.tokenizer_captions() if shards else splits["train"].captions
    tokenizer_json = train_caption_tokenizer(captions, vocab_size).backend_tokenizer.to_str()
    return Data(splits, tokenizer_from_json(tokenizer_json), tokenizer_json, record, shards)


def read_files(source: DataSource, log: RunLog) -> dict[str, Split]:
    """The splits of a data folder, with its summary line and the skip warning printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits, summary = read_splits(source)
    log.print(summary)
    for warning in caught:
        log.print(f"⚠ {warning.message}")
    return splits


def write_demo_data(root_dir: Path, log: RunLog) -> None:
    if not root_dir.exists():
        log.print(f"Writing the sample data set to {root_dir} ...")
        write_sample_dataset(root_dir)


def check_split_sizes(
    splits: dict[str, Split], *, batch_size: int, eval_split: str | None, folds: int = 1, train_samples: int
) -> None:
    """Enough samples for the run, said at startup: a global batch to train on, two captions and an image to
    evaluate (a contrastive loss needs a negative), an image for each of `eval --folds`."""
    if train_samples < batch_size:
        raise DatasetError(
            f"the train split has {train_samples} samples, fewer than one batch "
            f"(--batch_size {batch_size}); lower --batch_size or add data"
        )
    for name in ["val"] + ([eval_split] if eval_split and eval_split != "val" else []):
        split = splits[name]
        if len(split) < 2 or not split.images:
            raise DatasetError(
                f"the {name} split has {len(split.images)} images and {len(split)} captions; evaluation "
                f"needs at least 1 image and 2 captions: check its split list in --root_dir"
            )
    if eval_split and len(splits[eval_split].images) < folds:
        raise DatasetError(
            f"--folds {folds}: the {eval_split} split has {len(splits[eval_split].images)} images, fewer than one "
            f"per fold; use fewer folds"
        )


def image_source(
    split: Split, *, use_cache: bool, image_size: int, cache_dir: Path, num_workers: int, runtime: Runtime, log: RunLog
) -> tuple[ImageSource, bool]:
    """The split's images and whether they come from the cache. The main process builds the cache (the
    others wait, then map it); a cache that cannot be built is one ⚠ line and the run decodes JPEGs."""
    if use_cache:
        build = lambda: (
            build_image_cache(
                split.image_paths(),
                image_size,
                cache_dir,
                num_workers,
                progress=log.interactive,
                should_stop=lambda: bool(runtime.stop),
            ).folder
        )
        try:
            return CachedImages(runtime.on_main(build)), True  # the built folder, mapped by every process
        except OSError as error:
            log.print(
                f"⚠ Image cache could not be built ({error.strerror or error}); decoding JPEGs instead "
                f"(recorded as cache_images=False)"
            )
    return JpegImages(split.image_paths()), False


def split_images(data: Data, name: str, **cache) -> tuple[ImageSource | None, bool]:
    """The images of split `name` and whether they come from the cache (`image_source`'s arguments in `cache`):
    from the shards where they hold the split, none for training from shards (its dataset reads them)."""
    if data.shards is not None and name == "train":
        return None, cache["use_cache"]
    if data.shards is not None and data.shards.val is not None and name == "val":
        return data.shards.val_images(), cache["use_cache"]
    return image_source(data.splits[name], **cache)


def _ignore_stop_signals(worker_id: int) -> None:
    # Loader workers leave signals to the main process, which stops at a step boundary and shuts them down.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def end_loader_workers() -> None:
    """Kill the loader worker processes this process started and still holds. Called where the program ends,
    however it ends: a worker ignores SIGTERM (see above), so an interpreter leaving on an error, whose
    traceback keeps a started loader alive, would otherwise wait for it forever at exit (seen with torch 2.6,
    which does not shut persistent workers down at exit). A worker holds nothing that needs saving."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join()


def make_loader(
    dataset, *, batch_size: int, num_workers: int, device: torch.device, seed: int, **options
) -> DataLoader:
    # Each loader has its own generator: creating an iterator otherwise draws from the global torch RNG.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers else None,
        worker_init_fn=_ignore_stop_signals,
        generator=torch.Generator().manual_seed(seed),
        **options,
    )


def eval_loader(
    split: Split,
    images: ImageSource,
    *,
    image_size: int,
    batch_size: int,
    num_workers: int,
    runtime: Runtime,
    seed: int,
) -> DataLoader:
    """This process's shard of the split's unique images, as (pixels, readable) batches."""
    shard = Subset(UniqueImages(split, images, image_size), runtime.shard(len(split.images)))
    return make_loader(shard, batch_size=batch_size, num_workers=num_workers, device=runtime.device, seed=seed)


@dataclass
class TrainLoaders:
    train: DataLoader
    sampler: ResumableSampler | ShardSampler
    train_samples: int
    steps_per_epoch: int


def build_loaders(
    data: Data,
    collator: CaptionCollator,
    *,
    train_images: ImageSource | None,
    image_size: int,
    hflip: bool,
    batch_size: int,
    seed: int,
    num_workers: int,
    runtime: Runtime,
) -> TrainLoaders:
    """The training loader: this process's slice of each global batch (of files, or of shards)."""
    train_split = data.splits["train"]
    if data.shards is not None:
        dataset, sampler = train_dataset(
            data.shards, image_size=image_size, hflip=hflip, batch_size=batch_size, seed=seed, runtime=runtime
        )
    else:
        sampler = ResumableSampler(len(train_split), seed, batch_size, runtime.rank, runtime.world_size)
        dataset = CaptionedImages(train_split, train_images, TrainAugment(image_size, hflip=hflip), seed)
    train = make_loader(
        dataset,
        batch_size=runtime.per_process(batch_size),
        num_workers=num_workers,
        device=runtime.device,
        seed=seed,
        sampler=sampler,
        collate_fn=collator,
        drop_last=True,
    )
    return TrainLoaders(train, sampler, data.train_samples(), data.train_samples() // batch_size)
