"""Evaluation: the val loss and image<->text retrieval over a split's unique images, its metrics, and the
picture of a few retrievals that TensorBoard shows.

With several processes each embeds its shard of the images and captions; the embeddings are gathered in
order, so the metrics and the val loss are the one-process values (every sample counted exactly once).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from brain_trainer.brain_model import BrainModel, ContrastiveLoss
from brain_trainer.data.annotations import Split
from brain_trainer.data.augment import eval_transform, images_to_device
from brain_trainer.data.images import ImageSource, UnreadableImage
from brain_trainer.data.text import CaptionCollator
from brain_trainer.runtime import Runtime

EVAL_LOSS_CHUNK = 32  # val loss is InfoNCE over fixed chunks of this many pairs, whatever --batch_size is
RECALL_AT = (1, 5, 10)
METRICS = ("loss", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")


def retrieval_metrics(similarity: torch.Tensor, caption_image: torch.Tensor) -> dict[str, float]:
    """Recall@1/5/10 (in %) and median rank both ways, from a (num_images, num_captions) similarity matrix.

    Image-to-text is a hit when any caption of the image is in its top K; text-to-image when the caption's
    own image is. Ties count against the model (rank = 1 + the number of wrong items scoring at least as
    high as the best right one), so a model that scores everything equally gets no credit, and a NaN score
    is the lowest of all: a model of NaN weights scores no hit at all.
    """
    similarity = torch.nan_to_num(similarity.float(), nan=-math.inf)
    num_images = similarity.shape[0]
    positive = caption_image.unsqueeze(0) == torch.arange(num_images, device=similarity.device).unsqueeze(1)
    best_right_i2t = similarity.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
    i2t_rank = 1 + ((similarity >= best_right_i2t) & ~positive).sum(dim=1)  # (num_images,)
    right_t2i = similarity.gather(0, caption_image.unsqueeze(0))  # (1, num_captions)
    t2i_rank = 1 + ((similarity >= right_t2i) & ~positive).sum(dim=0)  # (num_captions,)
    metrics = {}
    for direction, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in RECALL_AT:
            metrics[f"{direction}_R@{k}"] = 100.0 * (ranks <= k).float().mean().item()
        metrics[f"{direction}_median_rank"] = ranks.float().median().item()
    return metrics


def chance_recall_at(k: int, num_images: int, captions_per_image: int) -> tuple[float, float]:
    """Recall@k (in %) of a random ranking: image->text (any of its captions in the top k), text->image."""
    num_captions = num_images * captions_per_image
    miss = math.comb(num_captions - captions_per_image, k) / math.comb(num_captions, k)
    return 100 * (1 - miss), 100 * min(1.0, k / num_images)


@torch.no_grad()
def evaluate(
    *,
    model: BrainModel,
    split: Split,
    image_loader: DataLoader,
    collator: CaptionCollator,
    autocast: Callable,
    runtime: Runtime,
    caption_batch: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict | None:
    """Val loss and retrieval over the split's unique images; None when `should_stop` interrupts it.

    `image_loader` yields this process's shard of the images (`runtime.shard`), as (pixels, readable) batches.
    """
    was_training = model.training
    model.eval()
    try:
        embedded = _embed_shards(model, split, image_loader, collator, autocast, runtime, caption_batch, should_stop)
    finally:
        model.train(was_training)
    if embedded is None:
        return None
    image_embeddings, text_embeddings, unreadable = embedded
    width = model.config.d_shared
    image_emb = runtime.gather_shards(_concat(image_embeddings, width, runtime.device), len(split.images))
    text_emb = runtime.gather_shards(_concat(text_embeddings, width, runtime.device), len(split))
    caption_image = torch.tensor(split.caption_image, device=runtime.device)
    # Val loss over a fixed order in fixed chunks, so it is comparable across runs, batch sizes and world sizes.
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0)).to(runtime.device)
    loss = ContrastiveLoss()
    chunks = [chunk for chunk in order.split(EVAL_LOSS_CHUNK) if len(chunk) > 1]
    losses = [loss(image_emb[caption_image[chunk]], text_emb[chunk], model.logit_scale).item() for chunk in chunks]
    similarity = image_emb @ text_emb.T  # (num_images, num_captions)
    return {
        "loss": sum(losses) / len(losses),
        **retrieval_metrics(similarity, caption_image),
        "similarity": similarity,
        "unreadable_images": int(runtime.sum(unreadable)),
    }


def _embed_shards(
    model: BrainModel,
    split: Split,
    image_loader: DataLoader,
    collator: CaptionCollator,
    autocast: Callable,
    runtime: Runtime,
    caption_batch: int,
    should_stop: Callable[[], bool],
) -> tuple[list[torch.Tensor], list[torch.Tensor], int] | None:
    """This process's image and caption embeddings (in batches) and its unreadable images; None on a stop."""
    image_embeddings, unreadable = [], 0
    for images, readable in image_loader:
        if should_stop():
            return None
        unreadable += int((~readable).sum())
        with autocast():
            image_embeddings.append(model.encode_image(images_to_device(images, runtime.device)))
    captions = [split.captions[i] for i in runtime.shard(len(split))]
    text_embeddings = []
    for start in range(0, len(captions), caption_batch):
        if should_stop():
            return None
        tokens = collator.tokenize(captions[start : start + caption_batch])
        with autocast():
            text_embeddings.append(
                model.encode_text(tokens["input_ids"].to(runtime.device), tokens["attention_mask"].to(runtime.device))
            )
    return image_embeddings, text_embeddings, unreadable


def fold_metrics(similarity: torch.Tensor, caption_image: torch.Tensor, folds: int) -> dict[str, float]:
    """Recall@1/5/10 averaged over `folds` consecutive folds of the images, each fold's images against their own
    captions (COCO's "1K test": 5 folds of its 5,000 test images). Images beyond the last full fold are in none.
    Returns `folds`, `fold_images` and `folds_{i2t,t2i}_R@k`."""
    size = similarity.shape[0] // folds
    per_fold = []
    for fold in range(folds):
        low, high = fold * size, (fold + 1) * size
        captions = ((caption_image >= low) & (caption_image < high)).nonzero().squeeze(1)
        per_fold.append(retrieval_metrics(similarity[low:high][:, captions], caption_image[captions] - low))
    keys = [f"{direction}_R@{k}" for direction in ("i2t", "t2i") for k in RECALL_AT]
    return {
        "folds": folds,
        "fold_images": size,
        **{f"folds_{key}": sum(m[key] for m in per_fold) / folds for key in keys},
    }


@dataclass
class Evaluator:
    """One split's evaluation, as the epoch end and `eval` both run it: `evaluator()` is `evaluate` over the
    split, interrupted (None) by a stop this process can act on alone."""

    model: BrainModel
    split: Split
    images: ImageSource
    image_loader: DataLoader
    collator: CaptionCollator
    autocast: Callable
    runtime: Runtime
    caption_batch: int
    folds: int = 1  # `eval --folds K`: also recall averaged over K folds of the images

    def __call__(self) -> dict | None:
        metrics = evaluate(
            model=self.model,
            split=self.split,
            image_loader=self.image_loader,
            collator=self.collator,
            autocast=self.autocast,
            runtime=self.runtime,
            caption_batch=self.caption_batch,
            should_stop=self.runtime.stop_seen_alone,
        )
        if metrics is not None and self.folds > 1:
            caption_image = torch.tensor(self.split.caption_image, device=metrics["similarity"].device)
            metrics.update(fold_metrics(metrics["similarity"], caption_image, self.folds))
        return metrics


def _concat(embeddings: list[torch.Tensor], width: int, device: torch.device) -> torch.Tensor:
    return torch.cat(embeddings) if embeddings else torch.zeros(0, width, device=device)


def retrieval_picture(similarity: torch.Tensor, split: Split, images: ImageSource, count: int = 4) -> torch.Tensor:
    """A few val images beside their top-3 retrieved captions ([+] marks a right one), as (3, H, W)."""
    side, width = 128, 760
    canvas = Image.new("RGB", (width, side * count), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=15)
    thumbnail = eval_transform(side)
    for row in range(min(count, similarity.shape[0])):
        try:
            canvas.paste(v2.functional.to_pil_image(thumbnail(images.load(row))), (0, row * side))
        except UnreadableImage:
            pass  # an unreadable image leaves its square blank; its captions still show
        for rank, caption_index in enumerate(similarity[row].topk(3).indices.tolist()):
            right = split.caption_image[caption_index] == row
            text = f"{'[+]' if right else '[ ]'} {split.captions[caption_index]}"[:80]
            draw.text((side + 10, row * side + 15 + 35 * rank), text, fill="darkgreen" if right else "black", font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
