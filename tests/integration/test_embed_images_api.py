"""`load_brain(...).embed_images` as docs/inference.md shows it: file paths, PIL images and uint8 pixels give the
same rows as the evaluation's preprocessing, and anything else is one InferenceError naming what it takes."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from brain_trainer import load_brain
from brain_trainer.data.images import UnreadableImage
from brain_trainer.data.layouts import load_splits
from brain_trainer.inference import InferenceError

pytestmark = pytest.mark.slow


@pytest.fixture
def brain_and_pngs(one_epoch_run, sample_root, tmp_path):
    """The shared tiny run's brain, and three val images saved as PNGs (no JPEG draft decoding to differ)."""
    pngs = []
    for path in load_splits(sample_root)["val"].image_paths()[:3]:
        pngs.append(tmp_path / f"{path.stem}.png")
        Image.open(path).save(pngs[-1])
    return load_brain(one_epoch_run / "ckpt" / "last_brain_v2.pt"), pngs


def test_paths_pil_images_and_pixels_give_the_evaluations_rows(brain_and_pngs):
    brain, pngs = brain_and_pngs
    from_paths = brain.embed_images([str(pngs[0]), *pngs[1:]])
    assert from_paths.shape == (3, brain.width) and torch.allclose(from_paths.norm(dim=1), torch.ones(3))
    assert torch.equal(from_paths, brain.embed_images(brain.preprocess_batch(pngs)))  # the pixels passed as they are
    assert torch.equal(from_paths, brain.embed_images([Image.open(png) for png in pngs]))
    decoded = [v2.functional.to_image(Image.open(png).convert("RGB")) for png in pngs]  # uint8 (3, H, W), any size
    assert torch.equal(from_paths, brain.embed_images(decoded))
    alone = brain.embed_images(pngs[0])  # one image, not a list (a batch of one: float sums in another order)
    assert alone.shape == (1, brain.width) and torch.allclose(alone, from_paths[:1], atol=1e-6)


def test_other_inputs_are_one_error_naming_what_it_takes(brain_and_pngs):
    brain, pngs = brain_and_pngs
    pixels = brain.preprocess_batch(pngs)
    for wrong in (pixels.float() / 255, pixels[:, :1], 7):
        with pytest.raises(InferenceError, match="pass file paths, PIL images or uint8 RGB pixels"):
            brain.embed_images(wrong)
    with pytest.raises(UnreadableImage, match="missing.png"):
        brain.embed_images([pngs[0].with_name("missing.png")])


def test_embed_texts_takes_a_caption_or_a_list_of_them_and_nothing_else(brain_and_pngs):
    brain, _ = brain_and_pngs
    pair = brain.embed_texts(["a dog runs", "two people"])
    assert pair.shape == (2, brain.width)
    assert torch.allclose(brain.embed_texts("a dog runs"), pair[:1], atol=1e-6)
    for wrong in (42, None, [], ["a dog", 7]):
        with pytest.raises(InferenceError, match="pass a caption or a list of captions"):
            brain.embed_texts(wrong)
