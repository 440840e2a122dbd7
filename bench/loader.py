"""Loader throughput: samples/s from JPEG files against the decode-once cache, side by side.

Data: Flickr8k-sized JPEGs (500x375, five captions each), drawn scenes with Gaussian noise added so
that each file has a photo's entropy (~130 KB, like Flickr8k's) rather than a drawing's (~6 KB).
Prints one JSON object.

    python bench/loader.py [--images 200] [--workers 2] [--image_size 224]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from brain_trainer.data.augment import TrainAugment
from brain_trainer.data.datasets import CaptionedImages
from brain_trainer.data.image_cache import build_image_cache
from brain_trainer.data.images import JpegImages
from brain_trainer.data.layouts import load_splits
from brain_trainer.data.sample_data import write_sample_dataset
from brain_trainer.data.sampler import ResumableSampler
from brain_trainer.data.text import CaptionCollator, train_caption_tokenizer


def photo_like_dataset(root: Path, images: int) -> Path:
    write_sample_dataset(root, "token", images=images, val=10, test=10, size=(500, 375))
    rng = np.random.default_rng(0)
    for path in (root / "Flicker8k_Dataset").iterdir():
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        noisy = np.clip(pixels + rng.normal(0, 25, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(path, quality=90)
    return root


def samples_per_second(dataset: CaptionedImages, collate, workers: int, batch_size: int = 32) -> float:
    sampler = ResumableSampler(len(dataset), seed=0, global_batch=batch_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
    for _ in loader:  # one pass to start the workers and warm the page cache
        break
    started, samples = time.perf_counter(), 0
    for batch in loader:
        samples += len(batch["images"])
    return samples / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--device", default="cpu", help="ignored: the loader runs on CPU cores")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as folder:
        root = photo_like_dataset(Path(folder) / "flickr8k", args.images)
        split = load_splits(root)["train"]
        collate = CaptionCollator(train_caption_tokenizer(split.captions, 1000), max_text_len=32)
        augment = TrainAugment(args.image_size)
        started = time.perf_counter()
        cache = build_image_cache(
            split.image_paths(), args.image_size, Path(folder) / "cache", args.workers, progress=False
        )
        build_seconds = time.perf_counter() - started
        jpeg = samples_per_second(
            CaptionedImages(split, JpegImages(split.image_paths()), augment), collate, args.workers
        )
        cached = samples_per_second(CaptionedImages(split, cache, augment), collate, args.workers)
        jpeg_bytes = sum(p.stat().st_size for p in split.image_paths()) / len(split.images)
    print(
        json.dumps(
            {
                "bench": "loader",
                "images": len(split.images),
                "samples": len(split),
                "workers": args.workers,
                "image_size": args.image_size,
                "mean_jpeg_kb": round(jpeg_bytes / 1024),
                "jpeg_samples_per_s": round(jpeg),
                "cache_samples_per_s": round(cached),
                "cache_over_jpeg": round(cached / jpeg, 2),
                "cache_build_s": round(build_seconds, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
