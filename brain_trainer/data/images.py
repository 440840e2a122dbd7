"""Images: one decoder (`decode_image`, EXIF-upright RGB) with one error for every file that cannot be an image
of the set (`UnreadableImage`, an OSError), and the two image sources: JPEGs decoded on every access, or the
decode-once cache's memory-mapped pixels (`image_cache.py` builds it)."""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2


class UnreadableImage(OSError):
    """A file that cannot be decoded as an image of the set, whatever the decoder raised: every reader catches
    this one name and substitutes, scores black or leaves out the image."""


# What PIL and its plugins raise on a damaged, truncated or hostile file (SyntaxError: some plugins' parsers).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class ImageSource(Protocol):
    def load(self, image_index: int) -> torch.Tensor:
        """The image as a uint8 (3, H, W) tensor; raises UnreadableImage when it cannot be read."""


def decode_image(path: Path | BinaryIO, shorter_side: int | None = None) -> torch.Tensor:
    """Decode a file (or an open binary file: a shard member's bytes) to uint8 RGB (3, H, W), optionally resized
    so its shorter side is `shorter_side`.

    Raises UnreadableImage for every file that cannot be an image of the set, a decompression bomb (a small file
    that claims more pixels than PIL's limit) included."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(path, shorter_side)
    except (*DECODE_ERRORS, Image.DecompressionBombWarning) as error:
        name = Path(path).name if isinstance(path, (str, os.PathLike)) else "image bytes"
        raise UnreadableImage(f"{name}: {error}") from error


def _decode(path: Path, shorter_side: int | None) -> torch.Tensor:
    with Image.open(path) as image:
        if shorter_side is not None:
            image.draft("RGB", (shorter_side, shorter_side))  # JPEG DCT scaling: decode at >= the size we keep
        # Cameras store rotation as an EXIF tag: turn the pixels upright, as every viewer shows them.
        pixels = v2.functional.to_image(ImageOps.exif_transpose(image).convert("RGB"))
    if shorter_side is not None:
        pixels = v2.functional.resize(pixels, [shorter_side], antialias=True)
    return pixels


class JpegImages:
    """Decodes each image from its file on every access."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def load(self, image_index: int) -> torch.Tensor:
        return decode_image(self.paths[image_index])


class CachedImages:
    """Decoded uint8 pixels in one memory-mapped file, shared by all loader workers through the page cache."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.index = np.load(folder / "index.npy")  # (N, 3): byte offset, height, width; height 0 = unreadable
        self.names = json.loads((folder / "meta.json").read_text())["images"]
        self._pixels: np.memmap | None = None  # opened lazily, so each worker process maps it itself

    def load(self, image_index: int) -> torch.Tensor:
        if self._pixels is None:
            self._pixels = np.memmap(self.folder / "pixels.u8", dtype=np.uint8, mode="r")
        offset, height, width = (int(v) for v in self.index[image_index])
        if height == 0:
            raise UnreadableImage(f"{self.names[image_index]} could not be decoded when the cache was built")
        hwc = self._pixels[offset : offset + height * width * 3].reshape(height, width, 3)
        return torch.from_numpy(np.array(hwc)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W), a private copy
