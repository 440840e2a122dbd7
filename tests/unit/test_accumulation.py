"""`--accum_steps`: the global batch's InfoNCE taken in micro-batches (GradientCache) gives the one-big-batch
gradient in float64 (one process here, two under torchrun); each micro-batch's re-run forward draws the same
random numbers as its first; BatchNorm's running statistics are updated once per micro-batch; the setting is
checked; and a run with it stops and resumes bit for bit."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from helpers import check
from workers.global_batch_gradient import GLOBAL_BATCH, TwoTowers, gradient

from brain_trainer.accumulation import GradientCache, accumulation_note
from brain_trainer.brain_model import ContrastiveLoss
from brain_trainer.config import ConfigError


def cache_for(model: torch.nn.Module) -> GradientCache:
    return GradientCache(
        forward=model,
        plain=model,
        loss=ContrastiveLoss(),
        autocast=nullcontext,
        no_sync=nullcontext,
        device=torch.device("cpu"),
    )


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def two_tower_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(GLOBAL_BATCH, 5, generator=generator), torch.randn(GLOBAL_BATCH, 7, generator=generator)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_micro_batches_give_the_whole_batch_gradient_and_loss_in_float64(float64, steps):
    images, texts = two_tower_batch()
    torch.manual_seed(1)
    reference = TwoTowers()
    expected_loss = ContrastiveLoss()(*reference(images, texts))
    expected_loss.backward()
    torch.manual_seed(1)
    model = TwoTowers()
    loss = cache_for(model).backward((images, texts), steps, lambda value: value.backward())
    error = (gradient(model) - gradient(reference)).abs().max() / gradient(reference).abs().max()
    assert error < 1e-10
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    assert model.logit_scale.grad.abs() > 0, "the temperature gets its gradient"


def test_a_per_micro_batch_loss_is_not_the_big_batch_gradient(float64):
    """What the usual accumulation would give (each micro-batch its own negatives): the test above could tell."""
    images, texts = two_tower_batch()
    torch.manual_seed(1)
    reference = TwoTowers()
    ContrastiveLoss()(*reference(images, texts)).backward()
    torch.manual_seed(1)
    model = TwoTowers()
    for part in range(2):
        rows = slice(part * GLOBAL_BATCH // 2, (part + 1) * GLOBAL_BATCH // 2)
        (ContrastiveLoss()(*model(images[rows], texts[rows])) / 2).backward()
    assert (gradient(model) - gradient(reference)).abs().max() / gradient(reference).abs().max() > 1e-3


class RecordingDropout(TwoTowers):
    """Two towers with dropout on the image features, recording every mask it draws."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def forward(self, images, texts):
        mask = (torch.rand_like(images) > 0.3).to(images.dtype)
        self.masks.append(mask)
        return super().forward(images * mask / 0.7, texts)


def test_each_re_run_forward_draws_the_masks_of_its_first_forward_and_the_rng_ends_as_after_one_pass():
    images, texts = two_tower_batch()
    model = RecordingDropout()
    torch.manual_seed(3)
    cache_for(model).backward((images, texts), 4, lambda value: value.backward())
    after = torch.get_rng_state()
    first, rerun = model.masks[:4], model.masks[4:]
    assert len(rerun) == 4 and all(torch.equal(a, b) for a, b in zip(first, rerun))
    assert not torch.equal(first[0], first[1]), "the micro-batches draw different masks"
    torch.manual_seed(3)
    with torch.no_grad():
        for part in images.chunk(4):
            torch.rand_like(part)
    assert torch.equal(after, torch.get_rng_state()), "the draws after the step are those of one pass"


def test_batchnorm_running_statistics_are_updated_once_per_micro_batch():
    class Normed(TwoTowers):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(5)

        def forward(self, images, texts):
            return super().forward(self.norm(images), texts)

    images, texts = two_tower_batch()
    model = Normed()
    cache_for(model).backward((images, texts), 4, lambda value: value.backward())
    assert model.norm.num_batches_tracked.item() == 4
    reference = Normed()
    for part in images.chunk(4):
        reference.norm(part)
    assert torch.equal(model.norm.running_mean, reference.norm.running_mean)
    assert (
        accumulation_note(model, 4).startswith("⚠ --accum_steps 4: BatchNorm") and accumulation_note(model, 1) is None
    )
    assert accumulation_note(TwoTowers(), 4) is None


def test_accum_steps_is_checked_against_the_batch_and_the_processes():
    with pytest.raises(ConfigError, match=r"--accum_steps 0: must be a positive integer"):
        check("--accum_steps", "0")
    with pytest.raises(ConfigError, match=r"--accum_steps 3: --batch_size 8 must divide into 1 process\(es\) x 3"):
        check("--batch_size", "8", "--accum_steps", "3")
    with pytest.raises(
        ConfigError,
        match=r"--accum_steps 4: --batch_size 8 must divide into 4 process\(es\) x 4 "
        r"micro-batches; use a batch size that is a multiple of 16",
    ):
        check("--batch_size", "8", "--accum_steps", "4", world_size=4)
    check("--batch_size", "16", "--accum_steps", "4", world_size=4)
