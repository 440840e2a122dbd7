"""Augmentation: keyed crops and flips, normalisation, the batch's way to the device."""

from __future__ import annotations

import torch

from brain_trainer.data.augment import IMAGENET_MEAN, IMAGENET_STD, TrainAugment, images_to_device, normalize_images


def drawn_image(height: int = 60, width: int = 80) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def test_the_crop_is_a_function_of_its_seed_alone():
    pixels = drawn_image()
    torch.manual_seed(1)
    first = TrainAugment(32)(pixels, seed=42)
    torch.manual_seed(2)
    assert torch.equal(first, TrainAugment(32)(pixels, seed=42))
    assert not torch.equal(first, TrainAugment(32)(pixels, seed=43))


def test_flips_happen_only_when_asked_and_leave_the_crop_unchanged():
    pixels = drawn_image()
    flipped = 0
    for seed in range(20):
        plain = TrainAugment(32)(pixels, seed)
        maybe = TrainAugment(32, hflip=True)(pixels, seed)
        assert plain.shape == (3, 32, 32) and plain.dtype == torch.uint8
        assert torch.equal(maybe, plain) or torch.equal(maybe, plain.flip(-1))
        flipped += not torch.equal(maybe, plain)
    assert 3 <= flipped <= 17


def test_normalisation_uses_the_imagenet_statistics_on_the_device():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    normalised = images_to_device(images, torch.device("cpu"))
    for channel in range(3):
        expected = (1.0 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        assert torch.allclose(normalised[:, channel], torch.full((2, 4, 4), expected))
    assert torch.equal(normalised, normalize_images(images))
