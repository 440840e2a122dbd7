"""The generated look-alike as WebDataset shards, laid out as img2dataset writes them: `train-00000.tar`, ...,
`val-00000.tar`, each sample `KEY.jpg` + `KEY.txt` (its first caption) + `KEY.json` (key, caption, and all its
captions under `captions`, so a sample with five captions trains as five, like Flickr8k)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

from brain_trainer.data.sample_data import captions_for, draw_scene, random_scene


def _jpeg(image: Image.Image, rng: random.Random, photo_like: bool) -> bytes:
    if photo_like:  # sensor-like noise: JPEGs of a photo's size and decoding cost, not of flat drawings
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 18, (image.height, image.width, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_sample_shards(
    folder: Path,
    images: int = 600,
    val: int = 100,
    per_shard: int = 100,
    size: tuple[int, int] = (320, 240),
    seed: int = 0,
    photo_like: bool = False,
    all_captions: bool = True,
) -> tuple[str, str]:
    """Write `images` drawn scenes (the last `val` held out) as train and val shards of `per_shard` images
    under `folder`; returns the (train, val) brace patterns. Without `all_captions` a sample has one caption
    (its `txt`), as web-scale sets have."""
    import webdataset as wds

    if not 0 < val < images:
        raise ValueError(f"val ({val}) must leave training images out of {images}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    writers = {
        split: wds.ShardWriter(str(folder / f"{split}-%05d.tar"), maxcount=per_shard, verbose=0)
        for split in ("train", "val")
    }
    for index in range(images):
        scene = random_scene(rng)
        image, captions = draw_scene(scene, size, rng), captions_for(scene, rng)
        key = f"{index:09d}"
        writers["train" if index < images - val else "val"].write(
            {
                "__key__": key,
                "jpg": _jpeg(image, rng, photo_like),
                "txt": captions[0],
                "json": {
                    "key": key,
                    "caption": captions[0],
                    **({"captions": captions} if all_captions else {}),
                    "width": size[0],
                    "height": size[1],
                },
            }
        )
    patterns = []
    for split, writer in writers.items():
        last = writer.shard - 1  # the number of the shard being written (read before closing it)
        writer.close()
        patterns.append(str(folder / f"{split}-{{00000..{last:05d}}}.tar"))
    return patterns[0], patterns[1]
