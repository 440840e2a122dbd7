"""COCO at scale: how long reading a COCO-sized Karpathy file takes, and the decode-once cache's build rate
and memory as the image count grows.

Data: a generated `dataset_coco.json` with COCO's Karpathy split sizes (82,783 train + 30,504 restval in
train2014/val2014 `filepath` folders, 5,000 val, 5,000 test: 123,287 images, 5 captions each = 616,435,
with `tokens` as the real file has them), its image files as empty files (the read only checks that each
exists); then caches built from 640x480 photo-like JPEGs (a few distinct files, hard-linked under many
names) at 224 px, in this process (no loader workers), for N and 4N images. Prints one JSON object.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/coco_scale.py [--cache_images 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from brain_trainer.data.image_cache import build_image_cache
from brain_trainer.data.layouts import DataSource, read_splits
from brain_trainer.data.layouts.karpathy import read_karpathy_file

SPLITS = (
    ("train", "train2014", 82_783),
    ("restval", "val2014", 30_504),
    ("val", "val2014", 5_000),
    ("test", "val2014", 5_000),
)
WORDS = "a man woman dog cat sitting standing on the in with of red blue street table plate food near two".split()


def coco_like(root: Path) -> Path:
    rng, entries, image = random.Random(0), [], 0
    for split, folder, count in SPLITS:
        for _ in range(count):
            sentences = []
            for _ in range(5):
                tokens = [rng.choice(WORDS) for _ in range(rng.randint(8, 14))]
                sentences.append({"tokens": tokens, "raw": " ".join(tokens).capitalize() + "."})
            name = f"COCO_{folder}_{image:012d}.jpg"
            entries.append(
                {"filepath": folder, "filename": name, "split": split, "sentences": sentences, "cocoid": image}
            )
            image += 1
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    for folder in ("train2014", "val2014"):
        (root / folder).mkdir()
    for entry in entries:  # empty files: the read only checks that each image exists
        (root / entry["filepath"] / entry["filename"]).touch()
    return root / "dataset_coco.json"


def photo_paths(root: Path, count: int, distinct: int = 20) -> list[Path]:
    rng = np.random.default_rng(0)
    sources = []
    for index in range(distinct):
        path = root / f"source_{index}.jpg"
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
        sources.append(path)
    paths = [root / f"image_{index:06d}.jpg" for index in range(count)]
    for index, path in enumerate(paths):
        os.link(sources[index % distinct], path)
    return paths


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(action) -> tuple[object, float, float]:
    """(result, wall seconds, CPU seconds of this process): on a shared machine the CPU time is what a quiet one
    would take as wall time (the work is single-threaded)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = action()
    return result, round(time.perf_counter() - wall, 2), round(time.process_time() - cpu, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_images", type=int, default=1000, help="N: caches of N and 4N images are built")
    args = parser.parse_args()
    result = {}
    for count in (args.cache_images, 4 * args.cache_images):  # first: the peak RSS would hide the cache's own
        with tempfile.TemporaryDirectory() as folder:
            paths = photo_paths(Path(folder), count)
            cache = Path(folder) / "cache"
            _, wall, cpu = timed(partial(build_image_cache, paths, 224, cache, num_workers=0, progress=False))
            result[f"cache_{count}"] = {
                "images_per_s": round(count / wall, 1),
                "images_per_cpu_s": round(count / cpu, 1),
                "peak_rss_mib": round(max_rss_mib()),
            }
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "coco"
        root.mkdir()
        annotations = coco_like(root)
        result["annotation_mib"] = round(annotations.stat().st_size / 2**20, 1)
        captions, result["parse_s"], result["parse_cpu_s"] = timed(lambda: read_karpathy_file(annotations, root))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # parse, split, a stat per image
            (_, summary), result["read_splits_s"], result["read_splits_cpu_s"] = timed(
                lambda: read_splits(DataSource(root))
            )
        result["captions"] = sum(len(c) for c in captions.by_image.values())
        result["summary"] = summary.split("(karpathy layout): ")[1]
        result["peak_rss_mib"] = round(max_rss_mib())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
