"""Augmentation and the image batch's way to the device.

Training crops are keyed: the crop of sample i in epoch e is drawn from a generator seeded by (seed, e, i)
alone, so it does not depend on worker count, world size, the global RNG or where a run was resumed. Loaders
hand over uint8 pixels; normalisation runs on the device after the copy (a quarter of the bytes to move).
A device-side crop would replace `TrainAugment` here and nothing else.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

# Every torchvision classification weight set expects the ImageNet statistics.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TrainAugment:
    """CLIP-style random resized crop (mild scale range) and, only on request, a horizontal flip (captions
    say "left" and "right"), on uint8 pixels, drawing only from a generator seeded per sample.

    torchvision's random transforms draw from the global RNG, and reseeding it costs ~0.3 ms a sample, so
    the box is drawn here (torchvision's RandomResizedCrop algorithm) and torchvision does the resizing.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.6, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = False,
    ):
        self.size, self.scale, self.hflip = size, scale, hflip
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def crop_box(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        uniform = lambda low, high: low + (high - low) * torch.rand(1, generator=generator).item()
        for _ in range(10):
            area = height * width * uniform(*self.scale)
            aspect = math.exp(uniform(*self.log_ratio))
            crop_w, crop_h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
                return top, left, crop_h, crop_w
        side = min(height, width)  # fallback, as torchvision's: a central crop
        return (height - side) // 2, (width - side) // 2, side, side

    def __call__(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        top, left, crop_h, crop_w = self.crop_box(pixels.shape[1], pixels.shape[2], generator)
        # (3, h, w) -> (1, 3, h, w) in channels-last memory: torch's vectorised uint8 resize path, 2x faster
        crop = pixels[None, :, top : top + crop_h, left : left + crop_w].contiguous(memory_format=torch.channels_last)
        image = v2.functional.resize(crop, [self.size, self.size], antialias=True)[0]
        if self.hflip and torch.rand(1, generator=generator).item() < 0.5:
            image = v2.functional.horizontal_flip(image)
        return image


def eval_transform(size: int) -> v2.Compose:
    """uint8 (3, H, W) -> uint8 (3, size, size): shorter side to `size`, then the centre."""
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, normalised as torchvision's classification weights expect. Runs on the
    device after the copy, so loaders move a quarter of the bytes and do no float work."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def images_to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 batch from the loader -> normalised float on the device; channels-last on CUDA, as its CNN kernels
    prefer (on the CPU contiguous memory is faster)."""
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return normalize_images(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
