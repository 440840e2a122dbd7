"""The decode-once image cache: every image of a split decoded at the run's size into one raw file, written as
a stream (memory stays one image per loader worker, whatever the data set's size), found again by a key of its
inputs, and published by a rename only when complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from brain_trainer.data import images
from brain_trainer.data.images import CachedImages, UnreadableImage

CACHE_FORMAT = 2


class Interrupted(Exception):
    """A stop signal arrived while the image cache was being built: nothing to save."""


class _DecodeForCache(Dataset):
    def __init__(self, paths: list[Path], shorter_side: int):
        self.paths, self.shorter_side = paths, shorter_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        try:
            pixels = images.decode_image(self.paths[index], self.shorter_side)  # looked up here: tests slow it down
        except UnreadableImage:
            return None
        return pixels.permute(1, 2, 0).contiguous()  # (H, W, 3)


def cache_key(paths: list[Path], shorter_side: int) -> str:
    digest = hashlib.sha256(f"format={CACHE_FORMAT} side={shorter_side}\n".encode())
    for path in paths:
        stat = path.stat() if path.exists() else None  # a replaced file has a new mtime, even at the same size
        digest.update(f"{path.name}\t{stat.st_size if stat else -1}\t{stat.st_mtime_ns if stat else -1}\n".encode())
    return digest.hexdigest()[:16]


def build_image_cache(
    paths: list[Path],
    shorter_side: int,
    cache_dir: Path,
    num_workers: int = 0,
    progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
) -> CachedImages:
    """Return the cache of `paths` at `shorter_side`, building it first if no complete one exists.

    The folder name is a hash of the cache format, the size and the image list (names and file sizes), so
    a change of any of them builds a new cache. It is built under a temporary name and renamed into place
    when complete, so a half-built cache is never found. Raises OSError when it cannot be written, and
    Interrupted (leaving no partial cache) when `should_stop()` turns true.
    """
    final = Path(cache_dir) / f"images_{shorter_side}px_{cache_key(paths, shorter_side)}"
    if (final / "meta.json").is_file():
        return CachedImages(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    building = final.parent / f".{final.name}.tmp-{os.getpid()}"
    building.mkdir()
    try:
        _write_pixels(building, paths, shorter_side, num_workers, progress, should_stop)
        (building / "meta.json").write_text(
            json.dumps({"format": CACHE_FORMAT, "shorter_side": shorter_side, "images": [path.name for path in paths]})
        )
        if final.exists():  # another process finished the same cache first
            shutil.rmtree(building)
        else:
            os.rename(building, final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return CachedImages(final)


def _write_pixels(
    folder: Path, paths: list[Path], shorter_side: int, num_workers: int, progress: bool, should_stop
) -> None:
    """pixels.u8 (each image's (H, W, 3) bytes, streamed) and index.npy (offset, height, width; 0 = unreadable)."""
    index = np.zeros((len(paths), 3), dtype=np.int64)
    offset = 0
    # Its own generator: an iterator would otherwise draw from the global torch RNG, and only on the run that
    # builds the cache, so two runs of one command would no longer match bit for bit.
    loader = DataLoader(
        _DecodeForCache(paths, shorter_side),
        batch_size=None,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )
    with open(folder / "pixels.u8", "wb") as pixels_file:
        bar = tqdm(loader, desc=f"Caching images at {shorter_side}px", disable=not progress, unit="img")
        for image_index, pixels in enumerate(bar):
            if should_stop():
                raise Interrupted("the image cache build")
            if pixels is not None:
                pixels_file.write(pixels.numpy().tobytes())
                index[image_index] = (offset, pixels.shape[0], pixels.shape[1])
                offset += pixels.numel()
        pixels_file.flush()
        os.fsync(pixels_file.fileno())
    np.save(folder / "index.npy", index)
