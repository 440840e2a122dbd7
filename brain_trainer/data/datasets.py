"""The datasets over a split: training samples (image and caption, augmented by key) and each unique image
once (for retrieval). Unreadable images are substituted (training) or scored black (evaluation), never fatal.

Randomness here is a function, not a stream: the augmentation of sample i in epoch e is drawn from
(seed, e, i), so it depends on neither the worker count, the global RNG nor where a run was resumed.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from brain_trainer.data.annotations import DatasetError, Split
from brain_trainer.data.augment import TrainAugment, eval_transform
from brain_trainer.data.images import ImageSource, UnreadableImage
from brain_trainer.runtime.seeding import derive_seed


class CaptionedImages(Dataset):
    """Training samples of one split. A key is (epoch, index) from `ResumableSampler` (or a bare index, for
    epoch 0): the augmentation of sample i in epoch e is seeded by (seed, e, i) alone.

    An image that cannot be read is replaced by the next readable sample (image and caption together), and
    the sample reports the file in `bad_files`, so the trainer can warn once and count it.
    """

    def __init__(self, split: Split, images: ImageSource, augment: TrainAugment, seed: int = 0):
        self.split, self.images, self.augment, self.seed = split, images, augment, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        bad_files = []
        for candidate in range(index, index + len(self)):
            sample = candidate % len(self)
            image_index = self.split.caption_image[sample]
            if self.split.images[image_index] in bad_files:
                continue  # the same unreadable image under its next caption
            try:
                pixels = self.images.load(image_index)
                break
            except UnreadableImage:
                bad_files.append(self.split.images[image_index])
        else:
            raise DatasetError(f"{self.split.image_dir}: no image of the {self.split.name} split can be read")
        return {
            "image": self.augment(pixels, derive_seed(self.seed, epoch, index)),
            "caption": self.split.captions[sample],
            "bad_files": bad_files,
        }


class UniqueImages(Dataset):
    """Each image of a split once, resized and centre-cropped (for retrieval over unique images)."""

    def __init__(self, split: Split, images: ImageSource, size: int):
        self.split, self.images, self.transform = split, images, eval_transform(size)

    def __len__(self) -> int:
        return len(self.split.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        """(pixels, readable): an unreadable image is scored as black, and counted by the evaluation."""
        try:
            return self.transform(self.images.load(index)), True
        except UnreadableImage:
            return self.transform(torch.zeros(3, 8, 8, dtype=torch.uint8)), False
