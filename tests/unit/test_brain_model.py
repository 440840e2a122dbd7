"""The brain model: config round trip, shapes, the contrastive loss, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from brain_trainer.brain_model import BrainConfig, BrainModel, ContrastiveLoss, UnsupportedEncoder

TINY = BrainConfig(
    image_encoder="mobilenet_v3_small",
    image_weights="none",
    image_size=32,
    text_encoder="scratch",
    text_vocab_size=50,
    scratch_text_width=32,
    scratch_text_layers=1,
    max_text_len=12,
    d_shared=32,
    brain_layers=1,
    brain_heads=2,
    dropout=0.0,
)


def tiny_batch(size: int = 6, length: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (size, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # one caption shorter than the rest
    return torch.randn(size, 3, 32, 32, generator=generator), ids, mask


def test_config_round_trips_through_a_plain_dict_and_ignores_other_settings():
    as_dict = TINY.to_dict()
    assert all(isinstance(v, (str, int, float)) for v in as_dict.values())
    assert BrainConfig.from_dict({**as_dict, "lr": 1e-3, "epochs": 5}) == TINY


def test_embeddings_are_unit_vectors_in_the_shared_space():
    torch.manual_seed(0)
    model = BrainModel(TINY, pretrained=False)
    images, ids, mask = tiny_batch()
    image_emb, text_emb = model.encode_image(images), model.encode_text(ids, mask)
    assert image_emb.shape == text_emb.shape == (6, 32)
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.allclose(text_emb.norm(dim=-1), torch.ones(6), atol=1e-5)
    loss = ContrastiveLoss()(*model(images, ids, mask))
    assert loss.shape == () and math.isfinite(loss.item())


def test_padding_does_not_change_a_caption_embedding():
    torch.manual_seed(0)
    model = BrainModel(TINY, pretrained=False).eval()
    ids = torch.tensor([[2, 9, 17, 3]])
    padded = torch.tensor([[2, 9, 17, 3, 0, 0]])
    short = model.encode_text(ids, torch.ones_like(ids))
    long = model.encode_text(padded, torch.tensor([[1, 1, 1, 1, 0, 0]]))
    assert torch.allclose(short, long, atol=1e-5)


def test_temperature_starts_at_clip_value_and_is_clamped_at_100():
    model = BrainModel(TINY, pretrained=False)
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    same = torch.nn.functional.normalize(torch.ones(2, 32), dim=-1)
    other = torch.nn.functional.normalize(torch.tensor([[1.0] * 16 + [-1.0] * 16] * 2), dim=-1)
    emb = torch.cat([same[:1], other[:1]])
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) >> 100
    loss = ContrastiveLoss()(emb, emb, model.logit_scale).item()
    expected = torch.nn.functional.cross_entropy(100.0 * emb @ emb.T, torch.arange(2)).item()
    assert loss == pytest.approx(expected)


def test_overfitting_one_batch_drives_the_loss_far_down():
    torch.manual_seed(0)
    model = BrainModel(TINY, pretrained=False)
    images, ids, mask = tiny_batch(size=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loss_of = ContrastiveLoss()
    first = loss_of(*model(images, ids, mask)).item()
    for _ in range(60):
        loss = loss_of(*model(images, ids, mask))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 1.5 and loss.item() < 0.1 * first


def test_image_trunk_keeps_torchvision_names_so_its_weight_files_load():
    model = BrainModel(BrainConfig(**{**TINY.to_dict(), "image_encoder": "resnet18"}), pretrained=False)
    reference = torchvision.models.resnet18()
    result = model.image_encoder.trunk.load_state_dict(reference.state_dict(), strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == ["fc.bias", "fc.weight"]


def test_a_transformer_classifier_is_refused_with_the_flag_named():
    with pytest.raises(UnsupportedEncoder, match="--image_encoder vit_b_16: not a convolutional classifier"):
        BrainModel(BrainConfig(**{**TINY.to_dict(), "image_encoder": "vit_b_16", "image_size": 224}), pretrained=False)


def test_the_loss_is_symmetric_infonce_with_the_positive_on_the_diagonal():
    generator = torch.Generator().manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    scale = torch.tensor(2.0)
    logits = scale.exp() * image @ text.T
    by_hand = (
        torch.nn.functional.cross_entropy(logits, torch.arange(5))
        + torch.nn.functional.cross_entropy(logits.T, torch.arange(5))
    ) / 2
    assert ContrastiveLoss()(image, text, scale).item() == pytest.approx(by_hand.item(), rel=1e-6)
