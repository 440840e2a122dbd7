"""Shard loader: ours (index, order by (seed, epoch), shard cache) against webdataset's streaming pipeline as
open_clip builds it, on a local disk and on the local S3 server (moto), interleaved.

Data: photo-like 500x375 JPEGs (drawn scenes with sensor-like noise, ~90 KB each), one caption each, as
img2dataset lays shards out. Both loaders decode, crop and resize with the same code (`TrainAugment`) in 2
loader workers. Figures: samples/s and their ratio; time to the first batch when resuming at 90% of an epoch
against a fresh start (ours skips by index: the median of 7 interleaved pairs; the streaming pipeline has to
read through the 90%); bytes each process reads from the storage in one epoch at 1, 2 and 4 processes.
Prints one JSON object.

    python bench/shards.py [--images 1500] [--per_shard 100] [--workers 2] [--image_size 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from brain_trainer.data.augment import TrainAugment
from brain_trainer.data.shards import expand_pattern, load_index
from brain_trainer.data.shards_order import ShardOrder, ShardSampler
from brain_trainer.data.shards_reader import ShardDataset, ShardReader
from brain_trainer.data.shards_sample import write_sample_shards
from brain_trainer.testing import local_s3_server

BATCH = 32


def collate(samples: list[dict]) -> dict:
    return {"images": torch.stack([s["image"] for s in samples]), "captions": [s["caption"] for s in samples]}


def our_loader(pattern: str, work: Path, args, *, storage_options: dict, position: float = 0.0) -> DataLoader:
    index = load_index(pattern, index_dir=work / "index", storage_options=storage_options)
    reader = ShardReader(
        index.shards, storage_options=storage_options, cache_dir=work / "cache", cache_bytes=int(args.cache_gb * 1e9)
    )
    order = ShardOrder(index.samples_per_shard(), seed=0)
    sampler = ShardSampler(order, BATCH)
    sampler.set_position(0, int(position * len(index)) // BATCH * BATCH)
    dataset = ShardDataset(index, reader, order, TrainAugment(args.image_size), seed=0)
    return DataLoader(dataset, BATCH, sampler=sampler, num_workers=args.workers, collate_fn=collate, drop_last=True)


def their_loader(pattern: str, args):
    """open_clip's `get_wds_dataset` (training, no resampling): shard shuffle, split by node and worker, tar
    samples, a sample shuffle buffer, decode, crop, batch; s3:// through fsspec (open_clip pipes `aws s3 cp`)."""
    import fsspec
    import webdataset as wds
    from torchvision.transforms import v2
    from webdataset.gopen import gopen_schemes

    gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open()
    augment, counter = TrainAugment(args.image_size), iter(range(10**12))
    crop = lambda image: augment(v2.functional.to_image(image), next(counter))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(expand_pattern(pattern)),
        wds.detshuffle(bufsize=2000, initial=500, seed=0),  # open_clip's _SHARD_SHUFFLE_SIZE, _INITIAL
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(bufsize=5000, initial=1000),  # open_clip's _SAMPLE_SHUFFLE_SIZE, _INITIAL
        wds.decode("pilrgb"),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=crop),
        wds.to_tuple("image", "text"),
        wds.batched(BATCH, partial=False),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=args.workers)


def epoch(loader, skip_batches: int = 0) -> dict:
    """Samples/s over an epoch (from the first batch on), and the seconds to the first batch used."""
    started = time.perf_counter()
    first, samples = None, 0
    for number, batch in enumerate(loader):
        if number < skip_batches:
            continue
        if first is None:
            first = time.perf_counter()
        samples += len(batch["images"] if isinstance(batch, dict) else batch[0])
    return {"first_batch_s": first - started, "samples_per_s": samples / (time.perf_counter() - first)}


def bytes_per_process(pattern: str, work: Path, *, storage_options: dict, world: int, cache_gb: float) -> list[int]:
    """Bytes each of `world` processes reads from the storage in one epoch: its slices of the global batches,
    read as training reads them (each process with its own cache folder: a machine's processes sharing one
    folder read a shard once between them)."""
    index = load_index(pattern, index_dir=work / "index", storage_options=storage_options)
    order = ShardOrder(index.samples_per_shard(), seed=0)
    counts = []
    for rank in range(world):
        cache = Path(tempfile.mkdtemp(dir=work))
        reader = ShardReader(
            index.shards, storage_options=storage_options, cache_dir=cache, cache_bytes=int(cache_gb * 1e9)
        )
        dataset = ShardDataset(index, reader, order, TrainAugment(8), seed=0)
        for key in ShardSampler(order, BATCH, rank, world):
            if dataset._window != (key[0], key[2]):
                dataset._entering(key[0], key[2])
            reader.read(int(index.shard_of[key[1]]), int(index.offset[key[1]]), int(index.size[key[1]]))
        reader.close()
        counts.append(reader.bytes_read)
    return counts


def first_batch_s(loader) -> float:
    started = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - started


def measure(where: str, pattern: str, work: Path, args, storage_options: dict, results: dict) -> None:
    figures = results[where]
    for _ in range(args.rounds):  # interleaved, so drift in the machine's load hits both alike
        figures.setdefault("ours", []).append(epoch(our_loader(pattern, work, args, storage_options=storage_options)))
        figures.setdefault("webdataset", []).append(epoch(their_loader(pattern, args)))
        their_batches = sum(1 for _ in their_loader(pattern, args))
        skipped = epoch(their_loader(pattern, args), skip_batches=int(0.9 * their_batches))
        figures.setdefault("webdataset_at_90_first_batch_s", []).append(skipped["first_batch_s"])
    for _ in range(args.latency_rounds):  # the first batch alone, fresh and at 90%, interleaved
        for name, position in (("first_batch_s", 0.0), ("at_90_first_batch_s", 0.9)):
            loader = our_loader(pattern, work, args, storage_options=storage_options, position=position)
            figures.setdefault(name, []).append(first_batch_s(loader))
    best = lambda name: max(f["samples_per_s"] for f in figures[name])
    figures["samples_per_s_ratio"] = best("ours") / best("webdataset")
    median = lambda name: float(np.median(figures[name]))
    figures["resume_at_90_first_batch_ratio"] = median("at_90_first_batch_s") / median("first_batch_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--per_shard", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency_rounds", type=int, default=7)
    parser.add_argument("--cache_gb", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, local_s3_server() as server:
        work = Path(folder)
        pattern, _ = write_sample_shards(
            work / "shards",
            args.images + 1,
            val=1,
            per_shard=args.per_shard,
            size=(500, 375),
            photo_like=True,
            all_captions=False,
        )
        os.environ.update(server.env)
        server.bucket("bench")
        store = server.filesystem()
        for path in sorted((work / "shards").glob("train-*.tar")):
            store.put_file(str(path), f"bench/shards/{path.name}")
        s3_pattern = f"s3://bench/shards/{Path(pattern).name}"
        results = {"images": args.images, "shards": len(expand_pattern(pattern)), "local": {}, "s3": {}}
        results["data_bytes"] = sum(p.stat().st_size for p in (work / "shards").glob("train-*.tar"))
        measure("local", pattern, work / "local", args, {}, results)
        measure("s3", s3_pattern, work / "s3", args, {}, results)
        results["bytes_per_process"] = {
            f"{where}_{world}": bytes_per_process(
                p, work / f"bytes-{where}", storage_options={}, world=world, cache_gb=gb
            )
            for where, p, gb in (
                ("local", pattern, 0),
                ("s3_cached", s3_pattern, args.cache_gb),
                ("s3_ranged", s3_pattern, 0),
            )
            for world in (1, 2, 4)
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
