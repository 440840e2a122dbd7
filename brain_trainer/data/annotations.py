"""What every layout's parser shares: the splits, the parsed captions, the data error, reading text files,
the hash split of layouts without split lists, and the one summary of what was skipped."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")
KAGGLE_HELD_OUT = 1000  # val and test images each, on the full 8,091-image set; proportional below
FULL_SET_IMAGES = 8091
HELD_OUT_FRACTION = KAGGLE_HELD_OUT / FULL_SET_IMAGES  # the hash split's default val and test fraction


class DatasetError(Exception):
    """A user mistake with the data (missing folder, no layout, bad annotation file): one line."""


@dataclass
class Captions:
    """One annotation file, parsed: captions by image name (in file order), the split of each image where the
    file says it, what was skipped, lines for the split summary, and the folder the names are relative to
    where the file decides it (COCO's `filepath`, an imagefolder's metadata folder)."""

    by_image: dict[str, list[str]] = field(default_factory=dict)
    split_of: dict[str, str] | None = None
    skipped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    image_dir: Path | None = None

    def pairs(self) -> list[tuple[str, str]]:
        """(caption, image name) in file order, image by image."""
        return [(caption, image) for image, captions in self.by_image.items() for caption in captions]


@dataclass
class Split:
    """The samples of one split: caption i belongs to image `caption_image[i]` of `images`."""

    name: str
    image_dir: Path
    images: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caption_image: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    def image_paths(self) -> list[Path]:
        return [self.image_dir / name for name in self.images]

    def fingerprint(self) -> dict:
        """Sample count and a hash of (image name, caption) pairs: tells whether a resume sees the same data."""
        digest = hashlib.sha256()
        for caption, image in zip(self.captions, self.caption_image):
            digest.update(f"{self.images[image]}\t{caption}\n".encode())
        return {"samples": len(self), "sha256": digest.hexdigest()[:16]}


def read_text(path: Path) -> str:
    """The file as text; utf-8-sig drops a BOM. A byte that is not UTF-8 is one line naming the file and offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{path}: byte {error.start} (0x{data[error.start]:02x}) is not UTF-8 ({error.reason}); "
            f"re-save the file as UTF-8"
        ) from None


def read_lines(path: Path) -> list[str]:
    # splitlines() takes CRLF and LF alike; blank lines are not data.
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def hash_split(
    images: list[str], val_fraction: float = HELD_OUT_FRACTION, test_fraction: float = HELD_OUT_FRACTION
) -> dict[str, list[str]]:
    """Deterministic split by image: order by a hash of the name, hold out val then test (each its fraction of
    the images, at least 1 from 3 images on); the rest is train. An image lands in exactly one split."""
    ordered = sorted(images, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    enough = len(images) >= 3
    val = max(1, round(val_fraction * len(images))) if enough else 0
    test = max(1, round(test_fraction * len(images))) if enough else 0
    return {"val": ordered[:val], "test": ordered[val : val + test], "train": ordered[val + test :]}


def kaggle_split(images: list[str]) -> dict[str, list[str]]:
    """The Kaggle copy's split: 1,000 val and 1,000 test images on the full set, proportionally fewer below."""
    return hash_split(images)


def skip_summary(path: Path, skipped: Counter) -> str | None:
    """The one line that sums up what a file's reader skipped, or None."""
    skipped = +skipped  # counts above zero only
    if not skipped:
        return None
    return f"{path}: skipped " + ", ".join(f"{count} {what}" for what, count in sorted(skipped.items()))


def name_first(skipped: Counter, what: str, first: str | None) -> None:
    """Rename the count `what` to say its first instance: '2 malformed entries (first: images[0]: ...)'."""
    if first and what in skipped:
        skipped[f"{what} (first: {first})"] = skipped.pop(what)
