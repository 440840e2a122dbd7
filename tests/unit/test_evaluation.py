"""Evaluation: retrieval metrics by hand (ties and NaN count against the model), chance levels, and the
evaluation of a split on one process."""

from __future__ import annotations

import math

import pytest
import torch

from brain_trainer.evaluation import chance_recall_at, retrieval_metrics


def test_perfect_similarity_gives_full_recall_and_rank_one():
    caption_image = torch.tensor([0, 0, 1, 1, 2, 2])
    similarity = (caption_image.unsqueeze(0) == torch.arange(3).unsqueeze(1)).float()  # (3 images, 6 captions)
    metrics = retrieval_metrics(similarity, caption_image)
    assert metrics["i2t_R@1"] == metrics["t2i_R@1"] == 100.0
    assert metrics["i2t_median_rank"] == metrics["t2i_median_rank"] == 1.0


def test_ties_count_against_the_model():
    caption_image = torch.tensor([0, 1, 2, 3])
    metrics = retrieval_metrics(torch.zeros(4, 4), caption_image)
    assert metrics["i2t_R@1"] == metrics["t2i_R@1"] == 0.0
    assert metrics["i2t_median_rank"] == metrics["t2i_median_rank"] == 4.0


def test_duplicate_captions_score_by_the_hand_computed_ranks():
    # Image 0 owns captions 0 and 1; image 1 owns caption 2, a duplicate of caption 0 (same column).
    similarity = torch.tensor([[0.9, 0.2, 0.9], [0.5, 0.1, 0.5]])
    metrics = retrieval_metrics(similarity, torch.tensor([0, 0, 1]))
    # i2t: image 0's best right caption (0.9) ties with caption 2 (wrong): rank 2. Image 1's right caption (0.5)
    # ties with caption 0 (wrong): rank 2.
    assert metrics["i2t_R@1"] == 0.0 and metrics["i2t_R@5"] == 100.0
    # t2i: caption 0 -> image 0 (0.9 > 0.5) rank 1; caption 1 -> image 0 (0.2 > 0.1) rank 1;
    # caption 2 -> image 1 (0.5 < 0.9) rank 2.
    assert metrics["t2i_R@1"] == pytest.approx(200 / 3)
    assert metrics["t2i_median_rank"] == 1.0


def test_five_captions_per_image_any_one_in_the_top_k_is_an_image_to_text_hit():
    torch.manual_seed(0)
    num_images = 20
    caption_image = torch.arange(num_images).repeat_interleave(5)
    similarity = torch.rand(num_images, 5 * num_images)
    # Image i's fourth caption is ranked (i % 12 + 1)-th: ahead of all but (i % 12) wrong captions.
    ranks = []
    for image in range(num_images):
        wrong = similarity[image][caption_image != image].sort(descending=True).values
        rank = image % 12 + 1
        similarity[image, 5 * image : 5 * image + 5] = -1.0
        similarity[image, 5 * image + 3] = (wrong[rank - 2] - 1e-3) if rank > 1 else wrong[0] + 1e-3
        ranks.append(rank)
    metrics = retrieval_metrics(similarity, caption_image)
    for k in (1, 5, 10):
        assert metrics[f"i2t_R@{k}"] == pytest.approx(100 * sum(r <= k for r in ranks) / num_images)


def test_a_nan_similarity_is_a_miss_never_a_hit():
    caption_image = torch.tensor([0, 1, 2, 3])
    metrics = retrieval_metrics(torch.full((4, 4), float("nan")), caption_image)
    assert metrics["i2t_R@1"] == metrics["t2i_R@1"] == 0.0
    assert metrics["i2t_median_rank"] == metrics["t2i_median_rank"] == 4.0
    right_is_nan = torch.eye(4)
    right_is_nan[0, 0] = float("nan")
    assert retrieval_metrics(right_is_nan, caption_image)["i2t_R@1"] == 75.0


def test_chance_recall_matches_the_closed_forms():
    i2t, t2i = chance_recall_at(5, 100, 5)
    assert t2i == pytest.approx(5.0)
    assert i2t == pytest.approx(100 * (1 - math.comb(495, 5) / math.comb(500, 5)))
