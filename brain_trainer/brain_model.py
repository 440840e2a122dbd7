"""The multimodal brain: a torchvision image encoder and a transformers text encoder whose token
features are projected into one shared space, pass through one shared transformer core ("the brain",
told apart only by a learned modality embedding), and are pooled into L2-normalised embeddings that
a CLIP-style symmetric InfoNCE loss pulls together. Architecture and loss only: no files, no optimisers,
no processes (the loss gets its gather from the runtime).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

IMAGE, TEXT = 0, 1
# Children of a torchvision classifier that come after its convolutional trunk.
CLASSIFIER_HEADS = {"avgpool", "fc", "classifier", "head", "heads"}


class UnsupportedEncoder(ValueError):
    """The named torchvision model has no convolutional trunk to take token features from."""


@dataclass
class BrainConfig:
    image_encoder: str = "resnet50"
    image_weights: str = "DEFAULT"  # a torchvision weights name, DEFAULT, a local file, or none
    image_size: int = 224
    text_encoder: str = "distilbert-base-uncased"  # a Hugging Face name, a local folder, or scratch
    text_vocab_size: int = 0  # scratch only: the size of the tokenizer trained on the captions
    scratch_text_width: int = 256
    scratch_text_layers: int = 4
    max_text_len: int = 32
    d_shared: int = 512
    brain_layers: int = 2
    brain_heads: int = 8
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> BrainConfig:
        """Takes the architecture keys of any dict (a checkpoint's run config holds more)."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def is_weights_file(image_weights: str) -> bool:
    """`--image_weights` names a local torchvision weights file (loaded by the trainer, not here)."""
    return image_weights.endswith((".pt", ".pth"))


def torchvision_weights(config: BrainConfig, pretrained: bool):
    """The torchvision weights enum to build with, or None (no weights, or a local file loaded later)."""
    name = config.image_weights
    if not pretrained or name.lower() == "none" or is_weights_file(name):
        return None
    weights = torchvision.models.get_model_weights(config.image_encoder)
    return weights.DEFAULT if name == "DEFAULT" else weights[name.split(".")[-1]]  # IMAGENET1K_V1 or its full name


class ImageEncoder(nn.Module):
    """A torchvision CNN classifier without its pooling and classifier: image -> a grid of token features."""

    def __init__(self, config: BrainConfig, pretrained: bool):
        super().__init__()
        classifier = torchvision.models.get_model(config.image_encoder, weights=torchvision_weights(config, pretrained))
        trunk = OrderedDict()
        for name, child in classifier.named_children():  # keeps torchvision's names, so its weight files load
            if name in CLASSIFIER_HEADS:
                break
            trunk[name] = child
        self.trunk = nn.Sequential(trunk)
        refusal = (
            f"--image_encoder {config.image_encoder}: not a convolutional classifier; use a resnet, "
            f"shufflenet, mobilenet, efficientnet, convnext or regnet model"
        )
        with torch.no_grad():  # one probe, in eval mode, tells the feature width and grid size
            try:
                grid = self.trunk.eval()(torch.zeros(1, 3, config.image_size, config.image_size))
            except (AssertionError, RuntimeError) as error:  # e.g. a ViT's encoder wants a token sequence
                raise UnsupportedEncoder(f"{refusal} ({str(error).splitlines()[0]})") from None
            self.trunk.train()
        if grid.dim() != 4:
            raise UnsupportedEncoder(f"{refusal} (its trunk gives shape {tuple(grid.shape)})")
        self.width, self.num_tokens = grid.shape[1], grid.shape[2] * grid.shape[3]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.trunk(images)  # (B, C, h, w)
        return grid.flatten(2).transpose(1, 2)  # (B, h*w, C)


def scratch_text_heads(width: int) -> int:
    """Attention heads of the scratch text encoder: one per 64 channels, at least one."""
    return max(1, width // 64)


def build_text_backbone(config: BrainConfig, pretrained: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel

    if config.text_encoder == "scratch":
        return BertModel(
            BertConfig(
                vocab_size=config.text_vocab_size,
                hidden_size=config.scratch_text_width,
                num_hidden_layers=config.scratch_text_layers,
                num_attention_heads=scratch_text_heads(config.scratch_text_width),
                intermediate_size=4 * config.scratch_text_width,
                max_position_embeddings=max(config.max_text_len, 8),
                hidden_dropout_prob=config.dropout,
                attention_probs_dropout_prob=config.dropout,
            ),
            add_pooling_layer=False,
        )
    if pretrained:
        return AutoModel.from_pretrained(config.text_encoder)
    return AutoModel.from_config(AutoConfig.from_pretrained(config.text_encoder))


class BrainModel(nn.Module):
    """Image and text encoders meeting in a shared `d_shared` space through one shared transformer core.

    `pretrained=False` builds the same architecture with random weights (tests, or before a checkpoint's
    weights are loaded, which then need no download).
    """

    def __init__(self, config: BrainConfig, pretrained: bool = True):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config, pretrained)
        self.text_encoder = build_text_backbone(config, pretrained)
        d = config.d_shared
        self.image_proj = nn.Linear(self.image_encoder.width, d)
        self.text_proj = nn.Linear(self.text_encoder.config.hidden_size, d)
        # Image tokens come from a fixed grid, so a learned position per cell tells "left" from "right".
        self.image_pos = nn.Parameter(torch.zeros(1, self.image_encoder.num_tokens, d))
        self.modality = nn.Embedding(2, d)
        layer = nn.TransformerEncoderLayer(
            d, config.brain_heads, 4 * d, config.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.brain = nn.TransformerEncoder(layer, config.brain_layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        nn.init.normal_(self.image_pos, std=0.02)

    def _pool(self, tokens: torch.Tensor, modality: int, padding: torch.Tensor | None) -> torch.Tensor:
        """Tokens of one modality through the shared core, mean-pooled over the real tokens, L2-normalised."""
        tokens = tokens + self.modality.weight[modality]
        hidden = self.brain(tokens, src_key_padding_mask=padding)  # (B, T, d)
        if padding is None:
            pooled = hidden.mean(dim=1)
        else:
            keep = (~padding).unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        return F.normalize(pooled.float(), dim=-1)  # (B, d)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.image_proj(self.image_encoder(images)) + self.image_pos  # (B, h*w, d)
        return self._pool(tokens, IMAGE, None)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        return self._pool(self.text_proj(hidden), TEXT, attention_mask == 0)

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image and text embeddings of a batch of pairs, and the loss's temperature (as open_clip returns it)."""
        return self.encode_image(images), self.encode_text(input_ids, attention_mask), self.logit_scale


def identity_gather(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class ContrastiveLoss:
    """CLIP's symmetric InfoNCE over the global batch: row i of each modality is the positive pair of row i of
    the other, every other row of the global batch a negative.

    With several processes, `gather` concatenates every process's rows in rank order *with gradient*
    (the runtime's `all_gather`), and each process scores its own rows against all columns, its labels offset
    by `rank`: open_clip's `--gather-with-grad --local-loss`. The mean of the processes' losses is then the
    single-process loss of the global batch, and so is the gradient once DDP has averaged it. A gather without
    gradient would keep only 1/world_size of it (open_clip#616).
    """

    def __init__(self, gather: Callable[[torch.Tensor], torch.Tensor] = identity_gather, rank: int = 0):
        self.gather, self.rank = gather, rank

    def __call__(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        scale = logit_scale.exp().clamp(max=100.0)  # CLIP's clamp: temperature never below 0.01
        all_image, all_text = self.gather(image_emb), self.gather(text_emb)
        logits_image = scale * image_emb @ all_text.T  # (B_local, B_global)
        logits_text = scale * text_emb @ all_image.T
        labels = torch.arange(len(image_emb), device=image_emb.device) + self.rank * len(image_emb)
        return (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2
